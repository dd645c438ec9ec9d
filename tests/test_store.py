"""Store access through fsspec, the download cache, and single-tensor checkpoint reads."""

import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from inference.store import CheckpointError, Store, StoreError, cache_dir, read_tensor


class Counter:
    """Counts opens and bytes read of memory:// files (the 'remote' in these tests)."""

    def __init__(self):
        self.opens, self.bytes = 0, 0


@pytest.fixture
def counted(monkeypatch):
    counter = Counter()
    original = MemoryFileSystem._open

    class CountingFile:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            counter.bytes += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def counting_open(self, path, mode="rb", **kwargs):
        f = original(self, path, mode, **kwargs)
        if "r" in mode:
            counter.opens += 1
            return CountingFile(f)
        return f

    monkeypatch.setattr(MemoryFileSystem, "_open", counting_open)
    monkeypatch.setattr(MemoryFileSystem, "cat_file", lambda *a, **k: pytest.fail("cat_file bypasses the counter"))
    return counter


@pytest.fixture
def mem():
    root = f"memory://store-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "env"))
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("CIRCUITS_CACHE")
    assert cache_dir() == Path("~/.cache/circuits").expanduser()


def test_local_store(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    (tmp_path / "models" / "b").mkdir()
    (tmp_path / "models" / "a" / "x.json").write_text("{}")
    for url in (str(tmp_path), f"file://{tmp_path}"):
        store = Store(url)
        assert store.ls("models") == ["a", "b"]
        assert store.exists("models/a/x.json") and not store.exists("models/a/y.json")
        assert store.local("models/a/x.json") == tmp_path / "models" / "a" / "x.json"  # the file itself, no copy
        assert store.info("models/a/x.json")["size"] == 2
        with store.open("models/a/x.json") as f:
            assert f.read() == b"{}"
        assert store.sha256("models/a/x.json") == hashlib.sha256(b"{}").hexdigest()
        assert store.path("models/a/x.json").endswith("/models/a/x.json")
        with pytest.raises(FileNotFoundError, match="models/a/y.json"):
            store.local("models/a/y.json")


def test_remote_download_is_cached_and_refetched_when_changed(mem, counted, tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{mem}/tinypython/vocab.bpe", b"#version: 0.2\n")
    store = Store(mem, cache_dir=tmp_path)
    first = store.local("tinypython/vocab.bpe")
    assert first.read_bytes() == b"#version: 0.2\n" and tmp_path in first.parents
    assert counted.opens == 1
    again = Store(mem, cache_dir=tmp_path).local("tinypython/vocab.bpe")
    assert again == first and counted.opens == 1  # cache hit: only `info`, no read
    fs.pipe(f"{mem}/tinypython/vocab.bpe", b"#version: 0.2\na b\n")
    changed = store.local("tinypython/vocab.bpe")
    assert changed.read_bytes() == b"#version: 0.2\na b\n" and counted.opens == 2


def test_interrupted_download_leaves_no_file(mem, tmp_path, monkeypatch):
    fsspec.filesystem("memory").pipe(f"{mem}/big.bin", b"x" * 10_000)
    store = Store(mem, cache_dir=tmp_path)

    class Broken:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 1:
                raise ConnectionError("connection reset")
            return self.f.read(100)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    original = MemoryFileSystem._open
    monkeypatch.setattr(MemoryFileSystem, "_open", lambda self, path, mode="rb", **kw: Broken(original(self, path, mode, **kw)))
    with pytest.raises(StoreError, match="big.bin"):
        store.local("big.bin")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # neither a partial file nor a temp file
    monkeypatch.setattr(MemoryFileSystem, "_open", original)
    assert store.local("big.bin").read_bytes() == b"x" * 10_000


def test_missing_remote_file_named(mem, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{mem}/nope.json"):
        Store(mem, cache_dir=tmp_path).local("nope.json")


def _checkpoint(**tensors) -> dict:
    torch.manual_seed(0)
    base = {"transformer.wte.weight": torch.randn(32, 8), "big": torch.randn(300, 300), "half": torch.randn(5, 3).half()}
    base["view"] = base["big"][10:20, ::3]  # a view: shares the big storage, with offset and stride
    return {**base, **tensors}


@pytest.mark.parametrize("via_path", [True, False])
def test_read_tensor_local_equals_full_load(tmp_path, via_path):
    state = _checkpoint()
    pt = tmp_path / "final_model.pt"
    if via_path:
        torch.save(state, pt)  # top-level folder named after the file
    else:
        with open(pt, "wb") as f:
            torch.save(state, f)  # top-level folder "archive"
    full = torch.load(pt, weights_only=True)
    for key in state:
        for location in (tmp_path, pt, f"file://{pt}"):
            got = read_tensor(location, key)
            assert got.dtype == full[key].dtype and torch.equal(got, full[key]), key


def test_read_tensor_remote_reads_small_fraction(mem, counted, tmp_path):
    fs = fsspec.filesystem("memory")
    with fs.open(f"{mem}/models/m/final_model.pt", "wb") as f:
        torch.save(_checkpoint(), f)
    size = fs.size(f"{mem}/models/m/final_model.pt")
    got = read_tensor(f"{mem}/models/m", "transformer.wte.weight", cache_dir=tmp_path)
    assert torch.equal(got, _checkpoint()["transformer.wte.weight"])
    assert counted.bytes < 0.05 * size, (counted.bytes, size)
    assert not any(tmp_path.rglob("*.pt"))  # nothing downloaded


def test_read_tensor_bad_input(tmp_path):
    pt = tmp_path / "final_model.pt"
    torch.save(_checkpoint(), pt)
    with pytest.raises(KeyError, match="nope"):
        read_tensor(tmp_path, "nope")
    pt.write_bytes(pt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="final_model.pt.*not a zip"):
        read_tensor(tmp_path, "big")
    pt.write_text(json.dumps({"not": "a checkpoint"}))
    with pytest.raises(CheckpointError, match="final_model.pt"):
        read_tensor(tmp_path, "big")


def test_read_tensor_refuses_code_in_pickle(tmp_path):
    """A data.pkl that would run code under plain pickle is refused, and nothing runs."""
    import pickle
    import zipfile

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pt = tmp_path / "final_model.pt"
    with zipfile.ZipFile(pt, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"transformer.wte.weight": Evil()}))
    with pytest.raises(CheckpointError, match="refusing"):
        read_tensor(pt, "transformer.wte.weight")
    assert not marker.exists()


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server over tmp_path/www that honours Range requests (as blob stores do)."""
    import http.server
    import re
    import threading

    www = tmp_path / "www"
    www.mkdir()
    served = {"bytes": 0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

        def do_GET(self):
            path = www / self.path.lstrip("/")
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if not path.is_file() or not m:
                return super().do_GET()
            data = path.read_bytes()
            start, end = int(m.group(1)), int(m.group(2) or len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            served["bytes"] += len(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def test_http_store_ranged_tensor_read_and_cache(http_root, tmp_path):
    www, url, served = http_root
    (www / "models" / "m").mkdir(parents=True)
    torch.save(_checkpoint(), www / "models" / "m" / "final_model.pt")
    size = (www / "models" / "m" / "final_model.pt").stat().st_size
    got = read_tensor(f"{url}/models/m", "transformer.wte.weight", cache_dir=tmp_path / "c")
    assert torch.equal(got, _checkpoint()["transformer.wte.weight"])
    assert 0 < served["bytes"] < 0.05 * size
    store = Store(url, cache_dir=tmp_path / "c")
    local = store.local("models/m/final_model.pt")
    assert local.read_bytes() == (www / "models" / "m" / "final_model.pt").read_bytes()
    with pytest.raises(FileNotFoundError, match=f"{url}/models/m/nope.json"):
        store.local("models/m/nope.json")
