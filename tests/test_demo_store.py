"""The embedded store, part 1 (tokenizer, models, build mechanics), on the `tiny` profile.

Numbers are checked against computations written here: a naive BPE over the data-gym
files, the kept-weight counts from the profile, a unigram baseline counted from the train
split, cross-entropy from the loaded model's logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import regex
import torch
import torch.nn.functional as F

from pipeline.demo.build import MANIFEST, StoreBuilder, StoreBuildError, build_store
from pipeline.demo.corpus import corpus_for_profile, load_corpus, split_of
from pipeline.demo.profiles import get_profile

TINY = get_profile("tiny")
PART1_DIRS = ("tinypython", "models", "train_curves")


def gpt2_bytes_to_unicode() -> dict[int, str]:
    # GPT-2's encoder.py, written out independently of pipeline.demo.bpe.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def part1_files(store: Path) -> dict[str, bytes]:
    """Part 1's files: everything under PART1_DIRS but what the circuits stage wrote there
    (`models/<model>/node_means.pt`), as the store's manifest records it."""
    stages = json.loads((store / MANIFEST).read_text())["stages"]
    part2 = set(stages.get("circuits", {}).get("files", {}))
    files = (p for d in PART1_DIRS for p in sorted((store / d).rglob("*")) if p.is_file())
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in files if p.relative_to(store).as_posix() not in part2}


def load_tokenizer(store: Path):
    from inference.tokenizer import get_tokenizer

    return get_tokenizer(str(store / "tinypython"))


def load_model(model_dir: Path):
    from inference import load_model

    return load_model(str(model_dir))


# ---- corpus ----------------------------------------------------------------------------


def test_corpus_is_sorted_and_split_by_path_hash():
    corpus = load_corpus(max_files=50)
    paths = [f.relpath for f in corpus.files]
    assert paths == sorted(paths)
    assert all(not p.startswith(("test/", "site-packages/")) for p in paths)
    # The split of a file depends on its path only: the same under another file selection.
    full = {f.relpath: f.split for f in load_corpus().files}
    assert all(full[f.relpath] == f.split == split_of(f.relpath, 0.1) for f in corpus.files)
    share = sum(s == "test" for s in full.values()) / len(full)
    assert 0.05 < share < 0.15


# ---- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_files_are_data_gym(tiny_store):
    enc_json = json.loads((tiny_store / "tinypython/encoder.json").read_text(encoding="utf-8"))
    lines = (tiny_store / "tinypython/vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version") and lines[-1] == ""
    merges = lines[1:-1]
    assert len(enc_json) == TINY.vocab_size == 256 + len(merges) + 1
    assert enc_json["<|endoftext|>"] == TINY.vocab_size - 1
    b2u = gpt2_bytes_to_unicode()
    # ids 0..255: the single bytes, printable ones first (data-gym order); then one per merge.
    assert [enc_json[b2u[b]] for b in b2u] == list(range(256))
    for rank, line in enumerate(merges):
        a, b = line.split(" ")
        assert enc_json[a + b] == 256 + rank


def test_tokenizer_round_trips_every_test_file_and_matches_naive_bpe(tiny_store):
    enc = load_tokenizer(tiny_store)
    assert enc.n_vocab == TINY.vocab_size and enc.eot_token == TINY.vocab_size - 1
    test_files = load_corpus().split("test")  # the whole stdlib test split, not only tiny's sample
    assert len(test_files) > 20
    for f in test_files:
        ids = enc.encode_ordinary(f.text)
        assert enc.decode_bytes(ids) == f.text.encode("utf-8"), f.relpath
    # tiktoken's encoding equals a naive BPE (merge the lowest-ranked adjacent pair) over the files.
    u2b = {u: b for b, u in gpt2_bytes_to_unicode().items()}
    ranks = {
        bytes(u2b[c] for c in tok): i
        for tok, i in json.loads((tiny_store / "tinypython/encoder.json").read_text("utf-8")).items()
        if tok != "<|endoftext|>"
    }
    pat = regex.compile(r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
    for f in test_files[:3]:
        text = f.text[:3000]
        naive = []
        for piece in pat.findall(text):
            parts = [bytes([b]) for b in piece.encode("utf-8")]
            while len(parts) > 1:
                best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")))
                if parts[best] + parts[best + 1] not in ranks:
                    break
                parts[best : best + 2] = [parts[best] + parts[best + 1]]
            naive.extend(ranks[p] for p in parts)
        assert enc.encode_ordinary(text) == naive, f.relpath


def test_tokenizer_loads_through_tiktoken_plugin(tiny_store, monkeypatch):
    import subprocess
    import sys

    # In a subprocess: tiktoken caches plugin encodings for the life of a process.
    code = "import tiktoken; e = tiktoken.get_encoding('tinypython_2k'); print(e.n_vocab, e.decode(e.encode('x = [1]')))"
    monkeypatch.setenv("CIRCUITS_TOKENIZER_DIR", str(tiny_store / "tinypython"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(TINY.vocab_size) and " ".join(out[1:]) == "x = [1]"


# ---- models --------------------------------------------------------------------------------


def test_sparse_model_has_target_density_and_beats_unigram(tiny_store):
    name = TINY.sparse_model
    model = load_model(tiny_store / "models" / name)
    cfg = model.config
    assert (cfg.n_layer, cfg.d_model, cfg.vocab_size, cfg.afrac) == (TINY.n_layer, TINY.d_model, TINY.vocab_size, 0.25)
    assert not cfg.tied_unembed

    # Every weight matrix (embeddings and unembedding too) keeps round(target * size) entries
    # (at least min_nonzero_per_row per row), and no row is empty.
    sd = torch.load(tiny_store / "models" / name / "final_model.pt", weights_only=True)
    matrices = {k: v for k, v in sd.items() if v.ndim == 2}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.mlp.c_fc.weight"} <= set(matrices)
    for key, w in matrices.items():
        rows, cols = w.shape
        want = max(rows * TINY.min_nonzero_per_row, round(TINY.target_density * rows * cols))
        assert int((w != 0).sum()) == want, key
        assert int((w != 0).sum(1).min()) >= TINY.min_nonzero_per_row, key
    total = sum(w.numel() for w in matrices.values())
    assert abs(sum(int((w != 0).sum()) for w in matrices.values()) / total - TINY.target_density) < 0.01

    # Held-out cross-entropy below a unigram model counted here from the train split.
    enc = load_tokenizer(tiny_store)
    corpus = corpus_for_profile(TINY)
    counts = torch.zeros(enc.n_vocab)
    for f in corpus.split("train"):
        counts += torch.bincount(torch.tensor(enc.encode_ordinary(f.text) + [enc.eot_token]), minlength=enc.n_vocab)
    logp_unigram = ((counts + 1) / (counts + 1).sum()).log()
    test_ids = []
    for f in corpus.split("test"):
        test_ids += enc.encode_ordinary(f.text) + [enc.eot_token]
    T = cfg.block_size
    windows = torch.tensor(test_ids[: (len(test_ids) // (T + 1)) * (T + 1)]).view(-1, T + 1)[:48]
    with torch.no_grad():
        logits = model(windows[:, :-1])
    xent = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))
    unigram = float(-logp_unigram[windows[:, 1:]].mean())
    uniform = float(torch.log(torch.tensor(float(enc.n_vocab))))
    assert xent < unigram - 0.5 < uniform, (xent, unigram)


def test_train_curve_has_release_keys(tiny_store):
    lines = [json.loads(s) for s in (tiny_store / "train_curves" / TINY.sparse_model / "progress.json").read_text().splitlines()]
    assert [d["step"] for d in lines] == list(range(TINY.eval_every, TINY.steps + 1, TINY.eval_every))
    for d in lines:
        for key in ("test_xent", "L0", "L0_non_embed", "lr", "train_loss", "density", "unigram_xent"):
            assert key in d
        assert all(0 < d[f"num_alive_neurons/c_fc/layer_{i}"] <= TINY.d_mlp for i in range(TINY.n_layer))
    assert lines[-1]["density"] == TINY.target_density
    assert lines[-1]["test_xent"] < lines[-1]["unigram_xent"]
    manifest = json.loads((tiny_store / MANIFEST).read_text())
    info = manifest["stages"][f"model:{TINY.sparse_model}"]["info"]
    assert info["weight_density"] == pytest.approx(TINY.target_density, abs=0.01)
    assert info["final_test_xent"] < info["unigram_xent"]


# ---- build mechanics -------------------------------------------------------------------------


def build_part1(out: Path, profile=TINY) -> StoreBuilder:
    b = StoreBuilder(out, profile, progress=False)
    b.build_corpus()
    b.build_tokenizer()
    b.build_model("sparse")
    return b


def test_rebuild_is_byte_identical(tiny_store, tmp_path):
    build_part1(tmp_path / "again")
    assert part1_files(tmp_path / "again") == part1_files(tiny_store)


def test_interrupted_build_leaves_no_partial_files_and_rerun_completes(tmp_path, monkeypatch):
    import dataclasses

    import pipeline.demo.build as build_mod

    quick = dataclasses.replace(TINY, steps=6, eval_every=3, warmup_steps=2)  # the mechanics, not the model
    out = tmp_path / "store"

    def crash_midway(model, directory):
        (directory / "beeg_config.json").write_text("{}")  # one file written, then the "crash"
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(build_mod, "save_model", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        build_part1(out, quick)
    monkeypatch.undo()
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert not (out / "models").exists() or not any((out / "models").iterdir())
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["stages"]) == {"corpus", "tokenizer"}  # the model stage is not recorded

    build_part1(out, quick)  # resumes: corpus and tokenizer are skipped, the model is trained again
    assert f"model:{TINY.sparse_model}" in json.loads((out / MANIFEST).read_text())["stages"]
    build_part1(tmp_path / "clean", quick)
    assert part1_files(out) == part1_files(tmp_path / "clean")


def test_refuses_a_different_store_unless_forced(tiny_store, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((tiny_store / MANIFEST).read_text())
    manifest["identity"]["profile"] = "demo"
    (other / MANIFEST).write_text(json.dumps(manifest))
    (other / "models").mkdir()
    (other / "models" / "keep.txt").write_text("someone's model")
    with pytest.raises(StoreBuildError, match="different store"):
        build_store(other, "tiny", progress=False)
    assert (other / "models" / "keep.txt").read_text() == "someone's model"

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a store")
    with pytest.raises(StoreBuildError, match="not empty"):
        build_store(plain, "tiny", progress=False)

    # force: the store's directories are replaced (here: only claimed, no stage run); other files stay.
    (other / "notes.txt").write_text("mine")
    StoreBuilder(other, "tiny", force=True, progress=False)
    assert not (other / "models").exists() and (other / "notes.txt").read_text() == "mine"
    assert json.loads((other / MANIFEST).read_text())["stages"] == {}


def test_finished_store_is_skipped_and_tampering_is_rebuilt(tiny_store, tmp_path):
    store = tmp_path / "copy"
    shutil.copytree(tiny_store, store)
    curve = store / "train_curves" / TINY.sparse_model / "progress.json"
    b = StoreBuilder(store, "tiny", progress=False)
    assert all(b.stage_done(s) is not None for s in ("corpus", "tokenizer", f"model:{TINY.sparse_model}"))
    curve.write_text("tampered\n")
    assert b.stage_done(f"model:{TINY.sparse_model}") is None


def test_dagster_assets_materialize_a_finished_store(tiny_store, tmp_path):
    import dagster as dg

    from pipeline.assets.demo_store import demo_store_assets

    store = tmp_path / "copy"
    shutil.copytree(tiny_store, store)
    cfg = {"config": {"profile": "tiny", "out": str(store)}}
    ops = {a.node_def.name: cfg for a in demo_store_assets}
    result = dg.materialize(demo_store_assets, run_config={"ops": ops})  # every stage is done: all skipped
    assert result.success
    meta = {a.key.path[-1]: result.asset_materializations_for_node(a.node_def.name)[0].metadata for a in demo_store_assets[:4]}
    assert meta["sparse_model"]["num_params"].value > 0
    assert meta["tokenizer"]["vocab_size"].value == TINY.vocab_size
    assert meta["dense_model"]["skipped"].value is True
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"prompt_sets_disjoint": True, "targets_above_full_loss": True}
