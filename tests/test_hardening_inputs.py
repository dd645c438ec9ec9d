"""Hostile data files (issue 15): refused before large allocations, with errors naming the file and
the key; silently accepted nonsense (negative or duplicate channels) refused; protocol-2 pickles read."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from fixtures_viz import FIXTURE_CONFIG, FIXTURE_RUNS
from test_model import tiny_model

from inference.loader import load_model, save_model
from inference.store import CheckpointError, read_tensor
from inference.tokenizer import TokenizerError, mergeable_ranks
from pipeline.formats import VizDataError, read_viz_data

PT_RUN = "fixture_a/quotes/prune_v4/4"
PKL_RUN = "fixture_a/quotes/prune_v4/k_optim"


def _raw(viz_store, run_id):
    path = viz_store / "viz" / run_id / FIXTURE_RUNS[run_id]["file"]
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            return pickle.load(f)  # the test's own fixture: trusted
    return torch.load(path, weights_only=False)


def _first_act(raw):
    acts = raw["importances"]["task_samples"][1]
    loc = next(iter(acts))
    return acts, loc, next(iter(acts[loc]))


def _deflate(src, dst):
    """Rewrite a torch zip with every record deflate-compressed (a zip bomb's trick)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))


# ---- large allocations from small files ----------------------------------------------------------


def test_compressed_record_is_refused_before_inflating(viz_store, tmp_path):
    raw = _raw(viz_store, PT_RUN)
    raw["importances"]["big"] = torch.zeros(20_000_000)  # 80 MB of zeros deflate to ~80 KB
    torch.save(raw, tmp_path / "plain.pt")
    bad = tmp_path / "viz_data.pt"
    _deflate(tmp_path / "plain.pt", bad)
    assert bad.stat().st_size < 1_000_000
    with pytest.raises(VizDataError, match=r"viz_data\.pt: zip entry .*/data/\d+ is compressed"):
        read_viz_data(bad)


def test_zero_stride_activations_are_refused_naming_the_key(viz_store, tmp_path):
    """A (n_docs, ctx) activation that is one float broadcast: fine to mmap, a huge copy later."""
    raw = _raw(viz_store, PT_RUN)
    acts, loc, ch = _first_act(raw)
    acts[loc][ch] = torch.zeros(1).as_strided(raw["importances"]["task_samples"][0].shape, (0, 0))
    path = tmp_path / "viz_data.pt"
    torch.save(raw, path)
    with pytest.raises(
        VizDataError,
        match=r"viz_data\.pt: tensor importances\['task_samples'\]\[1\]\['"
        + loc.replace(".", r"\.")
        + rf"'\]\[{ch}\].*over a storage of 1",
    ):
        read_viz_data(path)

    huge = {"x": torch.zeros(4).as_strided((4, 100_000_000_000), (1, 0))}  # 1.6 TB as float32, 16 bytes stored
    torch.save(huge, tmp_path / "huge.pt")
    with pytest.raises(
        VizDataError, match=r"huge\.pt: tensor x: shape \(4, 100000000000\).*400,000,000,000 elements over a storage of 4"
    ):
        read_viz_data(tmp_path / "huge.pt")


def test_zero_stride_in_a_pickle_is_refused_naming_the_key(viz_store, tmp_path):
    raw = _raw(viz_store, PKL_RUN)
    acts, loc, ch = _first_act(raw)
    acts[loc][ch] = torch.zeros(1).as_strided(tuple(raw["importances"]["task_samples"][0].shape), (0, 0))
    path = tmp_path / "viz_data.pkl"
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(VizDataError, match=r"viz_data\.pkl: tensor importances\['task_samples'\]\[1\].*over a storage of 1"):
        read_viz_data(path)


def test_legacy_storage_declaring_more_than_its_bytes():
    from inference.safe_load import UnsafeFileError, check_legacy_torch

    b = io.BytesIO()
    torch.save({"w": torch.arange(1000.0)}, b, _use_new_zipfile_serialization=False)
    check_legacy_torch(io.BytesIO(b.getvalue()), "ok")
    with pytest.raises(UnsafeFileError, match=r"short\.pt: storage .* declares 4,000 bytes"):
        check_legacy_torch(io.BytesIO(b.getvalue()[:-100]), "short.pt")


def test_checkpoint_with_a_compressed_or_broadcast_tensor_is_refused(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    pt = tmp_path / "m" / "final_model.pt"
    state = torch.load(pt, weights_only=True)
    _deflate(pt, tmp_path / "c.pt")
    os.replace(tmp_path / "c.pt", pt)
    with pytest.raises(CheckpointError, match=r"final_model\.pt: zip entry .* is compressed"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"final_model\.pt.*compressed zip record"):
        read_tensor(tmp_path / "m", "transformer.wte.weight")
    w = state["transformer.wte.weight"]
    state["transformer.wte.weight"] = torch.zeros(1).as_strided(w.shape, (0, 0))
    torch.save(state, pt)
    with pytest.raises(CheckpointError, match=r"final_model\.pt: tensor transformer\.wte\.weight: .*over a storage of 1"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"final_model\.pt: tensor 'transformer\.wte\.weight': .*over a storage of 1"):
        read_tensor(tmp_path / "m", "transformer.wte.weight")


# ---- refusals that name what they refuse ----------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unsafe_checkpoint_refusal_names_the_global_without_torchs_advice(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    pt = tmp_path / "m" / "final_model.pt"
    state = torch.load(pt, weights_only=True)
    state["evil"] = _Evil()
    torch.save(state, pt)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "m")
    msg = str(e.value)
    assert "final_model.pt" in msg and "posix.system" in msg
    assert "weights_only" not in msg


def test_nan_weight_names_the_file_and_key(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    pt = tmp_path / "m" / "final_model.pt"
    state = torch.load(pt, weights_only=True)
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(state, pt)
    with pytest.raises(CheckpointError, match=r"final_model\.pt: tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' holds 1 NaN"):
        load_model(tmp_path / "m")


def test_protocol_2_pickle_is_read(viz_store, tmp_path):
    raw = _raw(viz_store, PKL_RUN)
    path = tmp_path / "viz_data.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=2))
    got = read_viz_data(path)
    want = read_viz_data(viz_store / "viz" / PKL_RUN / "viz_data.pkl")
    assert got.n_nodes == want.n_nodes == FIXTURE_RUNS[PKL_RUN]["n_nodes"]
    assert np.array_equal(got.docs, want.docs)
    loc, ch, _ = next(got.nodes())
    assert np.array_equal(got.node_acts(loc, ch), want.node_acts(loc, ch))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    with pytest.raises(VizDataError, match=r"evil\.pkl.*posix\.system"):
        read_viz_data(evil)


# ---- content that used to pass silently or fail without a file name ----------------------------------


def _write(raw, tmp_path, name="viz_data.pt"):
    path = tmp_path / name
    torch.save(raw, path)
    return path


def test_negative_and_duplicate_channels_are_refused(viz_store, tmp_path):
    raw = _raw(viz_store, PT_RUN)
    loc = max(raw["circuit_data"], key=lambda k: len(raw["circuit_data"][k]))
    chans = raw["circuit_data"][loc]
    assert len(chans) >= 2
    raw["circuit_data"][loc] = torch.cat([chans[:-1], torch.tensor([-1])])
    with pytest.raises(VizDataError, match=rf"viz_data\.pt: circuit_data\['{loc}'\] has the negative channel id -1"):
        read_viz_data(_write(raw, tmp_path))
    raw["circuit_data"][loc] = torch.cat([chans[:-1], chans[:1]])
    with pytest.raises(
        VizDataError, match=rf"viz_data\.pt: circuit_data\['{loc}'\] lists channel\(s\) \[{int(chans[0])}\] more than once"
    ):
        read_viz_data(_write(raw, tmp_path))


def test_negative_pair_data_names_are_refused(viz_store, tmp_path):
    raw = _raw(viz_store, PT_RUN)
    block = raw["importances"]["pair_data"][0]
    names = list(block[1])
    names[0] = -3
    raw["importances"]["pair_data"][0] = [block[0], names, block[2], block[3]]
    with pytest.raises(VizDataError, match=r"viz_data\.pt: importances\['pair_data'\]\[0\] names has the negative channel id -3"):
        read_viz_data(_write(raw, tmp_path))


def test_channel_beyond_the_width_names_the_file(viz_store, tmp_path):
    from inference.config import GPTConfig
    from pipeline.formats import check_against_model

    raw = _raw(viz_store, PT_RUN)
    loc = next(iter(raw["circuit_data"]))
    raw["circuit_data"][loc] = torch.cat([raw["circuit_data"][loc][:-1], torch.tensor([10_000])])
    path = _write(raw, tmp_path)
    with pytest.raises(
        VizDataError,
        match=rf"viz_data\.pt: circuit_data\['{loc}'\] has channel id 10000 outside \[0, \d+\) of the file's beeg_model_config",
    ):
        read_viz_data(path)
    del raw["importances"]["beeg_model_config"]  # then the store's model is the judge (recompute asset)
    viz = read_viz_data(_write(raw, tmp_path))
    with pytest.raises(VizDataError, match=r"viz_data\.pt: .*channel id 10000 outside .* of the model fixture_a"):
        check_against_model(viz, GPTConfig.from_dict(FIXTURE_CONFIG), "the model fixture_a")


def test_context_longer_than_the_block_and_token_ids_beyond_the_vocab(viz_store, tmp_path):
    raw = _raw(viz_store, PT_RUN)
    raw["importances"]["beeg_model_config"]["block_size"] = 4
    with pytest.raises(VizDataError, match=r"viz_data\.pt: task_samples docs have \d+ positions, more than the block size 4"):
        read_viz_data(_write(raw, tmp_path))
    raw = _raw(viz_store, PT_RUN)
    raw["importances"]["task_samples"][0][0, 0] = 5000
    with pytest.raises(
        VizDataError, match=r"viz_data\.pt: task_samples docs hold token id 5000, outside the vocabulary \[0, 2048\)"
    ):
        read_viz_data(_write(raw, tmp_path))


def test_overflowing_ints_name_the_file(viz_store, tmp_path):
    raw = _raw(viz_store, PKL_RUN)
    loc = next(iter(raw["circuit_data"]))
    raw["circuit_data"][loc] = [2**70] + [int(c) for c in raw["circuit_data"][loc][1:]]
    path = tmp_path / "viz_data.pkl"
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(VizDataError, match=r"viz_data\.pkl: "):
        read_viz_data(path)
    raw = _raw(viz_store, PKL_RUN)
    raw["all_loss"] = [(2**70, 1.0)]
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(VizDataError, match=r"viz_data\.pkl: "):
        read_viz_data(path)


def test_bad_vocab_bpe_names_the_file(viz_store, tmp_path):
    enc, bpe = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    enc.write_bytes((viz_store / "tinypython" / "encoder.json").read_bytes())
    bpe.write_bytes(b"#version: 0.2\n\xff\xfe a\n")
    with pytest.raises(TokenizerError, match=r"vocab\.bpe: not UTF-8"):
        mergeable_ranks(enc, bpe)


class _UninitialisedArray:
    """Pickles as numpy's `_reconstruct(ndarray, (10**9,), b'b')` with no data: a 1 GB empty array."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (10**9,), b"b"))


def test_uninitialised_numpy_array_is_refused_before_allocating(tmp_path):
    torch.save({"circuit_data": {}, "x": _UninitialisedArray()}, tmp_path / "viz_data.pt")
    with pytest.raises(
        VizDataError,
        match=r"viz_data\.pt: numpy array x is created with shape \(1000000000,\) \(1,000,000,000 uninitialised bytes\)",
    ):
        read_viz_data(tmp_path / "viz_data.pt")
    (tmp_path / "viz_data.pkl").write_bytes(pickle.dumps({"x": _UninitialisedArray()}, protocol=2))
    with pytest.raises(VizDataError, match=r"viz_data\.pkl: numpy array #1 .* is created with shape \(1000000000,\)"):
        read_viz_data(tmp_path / "viz_data.pkl")


def test_a_real_state_dict_passes_the_checks(tmp_path):
    """torch's own state dicts (OrderedDict with `_metadata`, parameters, views) are not refused."""
    from inference.safe_load import check_torch_zip

    model = tiny_model()
    save_model(model, tmp_path / "m")
    check_torch_zip(tmp_path / "m" / "final_model.pt", "m")
    torch.save(model.state_dict(), tmp_path / "sd.pt")  # with _metadata, as train scripts save it
    check_torch_zip(tmp_path / "sd.pt", "sd")
    assert torch.equal(load_model(tmp_path / "m").transformer.wte.weight, model.transformer.wte.weight)
