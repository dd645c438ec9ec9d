"""load_model from local, file:// and memory:// stores, the cache, and every bad input of issue 2."""

import json
import socket
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from test_model import tiny_model

from inference import ConfigError, load_model
from inference.loader import save_model
from inference.store import CheckpointError, StoreError

IDX = torch.tensor([[1, 5, 2, 9, 3], [0, 0, 7, 7, 1]])


@pytest.fixture(scope="module")
def model():
    return tiny_model(sink=True, d_pos_emb=4, rms_norm=True, tied_unembed=False)


@pytest.fixture
def saved(model, tmp_path):
    save_model(model, tmp_path / "m")
    return tmp_path / "m"


def logits(m):
    with torch.no_grad():
        return m(IDX)


def test_local_and_file_url(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["beeg_config.json", "final_model.pt"]  # no temp files left
    for location in (saved, str(saved), f"file://{saved}"):
        m = load_model(location)
        assert not m.training
        assert torch.equal(logits(m), logits(model))


def test_memory_url_second_load_from_cache(model, tmp_path, monkeypatch):
    root = f"memory://loader-{uuid.uuid4().hex}/models/tiny"
    save_model(model, root)
    opens = []
    original = MemoryFileSystem._open
    monkeypatch.setattr(
        MemoryFileSystem, "_open", lambda self, p, mode="rb", **kw: opens.append(p) or original(self, p, mode, **kw)
    )
    first = load_model(root, cache_dir=tmp_path)
    assert torch.equal(logits(first), logits(model))
    n_first = len(opens)
    assert n_first == 2  # config + weights, each downloaded once
    second = load_model(root, cache_dir=tmp_path)
    assert len(opens) == n_first  # served from the cache
    assert torch.equal(logits(second), logits(model))


def test_tied_checkpoint_and_missing_final_logits_bias(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path)
    state = torch.load(tmp_path / "final_model.pt", weights_only=True)
    del state["final_logits_bias"]
    torch.save(state, tmp_path / "final_model.pt")
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.final_logits_bias, torch.zeros(37))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_weights_are_the_mapped_file_not_a_copy(model, saved):
    """The parameters are the memory-mapped checkpoint (assign=True): no second dense copy; an
    in-place edit of a weight copies that page privately and leaves the file as it was."""
    before = (saved / "final_model.pt").read_bytes()
    m = load_model(saved)
    w = m.transformer.h[0].mlp.c_fc.weight
    # backed by a mapping of the file (/proc/self/maps), not by a heap copy
    maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(str(saved / "final_model.pt"))]
    spans = [tuple(int(x, 16) for x in f[0].split("-")) for f in maps]
    assert any(lo <= w.data_ptr() < hi for lo, hi in spans)
    with torch.no_grad():
        w.mul_(2.0)
    assert (saved / "final_model.pt").read_bytes() == before
    assert torch.equal(logits(load_model(saved)), logits(model))


def test_dtype_argument(saved):
    assert load_model(saved).transformer.wte.weight.dtype == torch.float32
    assert load_model(saved, dtype=torch.bfloat16).transformer.wte.weight.dtype == torch.bfloat16


# ---- bad input ------------------------------------------------------------------------
def test_missing_files(saved):
    (saved / "final_model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="final_model.pt"):
        load_model(saved)
    (saved / "beeg_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="beeg_config.json"):
        load_model(saved)


def test_truncated_and_non_zip_checkpoint(saved):
    pt = saved / "final_model.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"final_model\.pt.*not a zip"):
        load_model(saved)
    pt.write_text("hello")
    with pytest.raises(CheckpointError, match=r"final_model\.pt.*not a zip"):
        load_model(saved)


def test_wrong_shape_names_key_and_shapes(saved):
    state = torch.load(saved / "final_model.pt", weights_only=True)
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(3, 5)
    torch.save(state, saved / "final_model.pt")
    with pytest.raises(CheckpointError, match=r"final_model\.pt.*transformer\.h\.1\.mlp\.c_fc\.weight.*\(3, 5\).*\(20, 16\)"):
        load_model(saved)


def test_missing_and_unexpected_keys(saved):
    state = torch.load(saved / "final_model.pt", weights_only=True)
    del state["transformer.h.0.ln_1.weight"]
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 12, 12)  # mask buffer: tolerated
    state["mystery"] = torch.zeros(1)
    torch.save(state, saved / "final_model.pt")
    with pytest.raises(
        CheckpointError,
        match=r"final_model\.pt.*missing keys \['transformer\.h\.0\.ln_1\.weight'\].*unexpected keys \['mystery'\]",
    ):
        load_model(saved)


def test_config_wrong_type_bad_json_unknown_keys(saved):
    cfg_path = saved / "beeg_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "n_layer": "2"}))
    with pytest.raises(ConfigError, match=r"beeg_config\.json.*n_layer"):
        load_model(saved)
    cfg_path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"beeg_config\.json.*not valid JSON"):
        load_model(saved)
    cfg_path.write_text(json.dumps({**cfg, "pfrac": 0.1, "rtopk": True}))
    with pytest.warns(UserWarning, match=r"beeg_config\.json.*\['pfrac', 'rtopk'\]"):
        load_model(saved)


def test_sink_refused_on_explicit_path(saved):
    with pytest.raises(ConfigError, match=r"beeg_config\.json.*sink.*sdpa"):
        load_model(saved, attention="explicit")


def test_unreachable_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/models/tiny"
    with pytest.raises(StoreError, match=f"{url}/beeg_config.json"):
        load_model(url)


def test_memory_store_missing_model():
    fsspec.filesystem("memory")  # registered
    with pytest.raises(FileNotFoundError, match="memory://nowhere-.*/beeg_config.json"):
        load_model(f"memory://nowhere-{uuid.uuid4().hex}")


def test_release_mapped_pages_keeps_values_and_written_pages(tmp_path):
    """`inference.memory.release_mapped_pages` lowers the resident size of a memory-mapped
    state dict without changing a value; a mapping with a page written in place is left alone
    (dropping it would lose the write)."""
    import sys

    import pytest
    import torch

    from inference.memory import release_mapped_pages

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/self/smaps is Linux's")

    def rss_file_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))

    path = tmp_path / "w.pt"
    torch.save({"a": torch.randn(4096, 1024), "b": torch.arange(10.0)}, path)  # 16 MB
    want = torch.load(path, weights_only=True)
    state = torch.load(path, weights_only=True, mmap=True)
    assert torch.equal(state["a"], want["a"])  # every page read: resident
    before = rss_file_kb()
    assert release_mapped_pages(state.values()) >= 16 * 2**20
    assert before - rss_file_kb() >= 12 * 1024  # most of the 16 MB left the resident set
    assert torch.equal(state["a"], want["a"]) and torch.equal(state["b"], want["b"])
    state["b"][0] = 42.0  # a private mapping: this page is now the process's own copy
    assert release_mapped_pages(state.values()) == 0
    assert state["b"][0].item() == 42.0
    assert release_mapped_pages([torch.randn(1000)]) == 0  # anonymous memory: never


def test_release_mapped_pages_of_one_tensor_only(tmp_path):
    """`whole_mappings=False` drops only the pages inside the given tensors' bytes."""
    import sys

    import pytest
    import torch

    from inference.memory import release_mapped_pages

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/self/smaps is Linux's")
    path = tmp_path / "w.pt"
    torch.save({"a": torch.randn(2048, 1024), "b": torch.randn(2048, 1024)}, path)
    want = torch.load(path, weights_only=True)
    state = torch.load(path, weights_only=True, mmap=True)
    assert torch.equal(state["a"], want["a"]) and torch.equal(state["b"], want["b"])
    got = release_mapped_pages([state["a"]], whole_mappings=False)
    assert 8 * 2**20 - 2 * 4096 <= got <= 8 * 2**20  # a's 8 MB (whole pages), not b's
    assert torch.equal(state["a"], want["a"]) and torch.equal(state["b"], want["b"])


def test_trim_heap_runs_on_glibc():
    """`inference.memory.trim_heap` reaches glibc's malloc_trim on Linux (the recompute calls it
    between chunks: without it the resident size crept up by ~0.1 GB per chunk at release scale)."""
    import platform
    import sys

    from inference.memory import trim_heap

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert trim_heap() is True
    else:
        assert trim_heap() in (True, False)


def test_heap_kept_blocks_on_several_threads_set_and_restore_once(monkeypatch):
    """`inference.memory.heap_kept` changes process-wide malloc settings; the ablation modes run
    side by side, each in such a block: the settings go on at the first entry and back at the last
    exit (a thread leaving early must not restore them under the other's passes)."""
    import threading

    import inference.memory as memory

    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda: lambda param, value: calls.append((param, value)))
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append("trim"))
    inside, leave = threading.Barrier(2), threading.Event()

    def block(wait: bool) -> None:
        with memory.heap_kept():
            inside.wait()
            if wait:
                leave.wait()

    first = threading.Thread(target=block, args=(True,))
    first.start()
    second = threading.Thread(target=block, args=(False,))
    second.start()
    second.join()  # one block exited while the other is still open
    assert calls == [(memory._M_MMAP_MAX, 0), (memory._M_TRIM_THRESHOLD, 2**31 - 1)]
    leave.set()
    first.join()
    assert calls[2:] == [
        (memory._M_MMAP_MAX, memory._M_MMAP_MAX_DEFAULT),
        (memory._M_MMAP_THRESHOLD, memory._MMAP_THRESHOLD_AFTER),
        (memory._M_TRIM_THRESHOLD, memory._TRIM_THRESHOLD_AFTER),
        "trim",
    ]
