"""The download cache under faults: truncation, missing sizes, MD5s, stale versions, killed downloads.

The remote is `memory://` with a fault-injecting `_open` / `info`, or a local HTTP server that
omits Content-Length, as the hostile-store run of issue 15 did."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.server
import os
import threading
import time
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from inference.store import Store, StoreError, clean_stale_downloads

DATA = bytes(range(256)) * 40  # 10 KiB


@pytest.fixture
def mem():
    root = f"memory://cache-{uuid.uuid4().hex}"
    fsspec.filesystem("memory").pipe(f"{root}/viz/a.pt", DATA)
    yield root
    fsspec.filesystem("memory").rm(root, recursive=True)


def cached_files(cache) -> list:
    return sorted(p for p in cache.rglob("*") if p.is_file())


class Short:
    """A remote file that ends early: `limit` bytes, then EOF (no error: a silently cut stream)."""

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_truncated_download_is_refused_by_size_and_never_cached(mem, tmp_path, monkeypatch):
    original = MemoryFileSystem._open
    monkeypatch.setattr(MemoryFileSystem, "_open", lambda self, p, mode="rb", **kw: Short(original(self, p, mode, **kw), 1000))
    store = Store(mem, cache_dir=tmp_path)
    with pytest.raises(StoreError, match=r"viz/a.pt: download stopped after 1000 of 10240 bytes"):
        store.local("viz/a.pt")
    assert cached_files(tmp_path) == []
    monkeypatch.setattr(MemoryFileSystem, "_open", original)
    assert store.local("viz/a.pt").read_bytes() == DATA


def with_info(monkeypatch, extra: dict):
    original = MemoryFileSystem.info
    monkeypatch.setattr(MemoryFileSystem, "info", lambda self, p, **kw: {**original(self, p, **kw), **extra})


def test_md5_from_the_listing_is_checked(mem, tmp_path, monkeypatch):
    store = Store(mem, cache_dir=tmp_path)
    with_info(monkeypatch, {"content_settings": {"content_md5": bytearray(hashlib.md5(b"other").digest())}})
    with pytest.raises(StoreError, match="MD5"):
        store.local("viz/a.pt")
    assert cached_files(tmp_path) == []
    # HTTP's Content-MD5 (base64) and Azure's content_md5 (bytes) of the right content both pass.
    monkeypatch.undo()
    with_info(monkeypatch, {"Content-MD5": base64.b64encode(hashlib.md5(DATA).digest()).decode()})
    assert store.local("viz/a.pt").read_bytes() == DATA
    monkeypatch.undo()
    with_info(monkeypatch, {"content_settings": {"content_md5": bytearray(hashlib.md5(DATA).digest())}})
    assert store.local("viz/a.pt").read_bytes() == DATA


@pytest.mark.parametrize("field", ["etag", "ETag", "content_md5"])
def test_changed_file_with_same_size_and_mtime_is_fetched_again(mem, tmp_path, monkeypatch, field):
    fs = fsspec.filesystem("memory")
    fixed = {"created": 1.0, "mtime": 1.0, "last_modified": "Thu, 01 Jan 2026 00:00:00 GMT"}

    def version(data):
        tag = hashlib.md5(data).digest()
        return {field: bytearray(tag) if field == "content_md5" else f'"{tag.hex()}"'}

    store = Store(mem, cache_dir=tmp_path)
    with_info(monkeypatch, {**fixed, **version(DATA)})
    assert store.local("viz/a.pt").read_bytes() == DATA
    new = DATA[::-1]  # same size
    fs.pipe(f"{mem}/viz/a.pt", new)
    monkeypatch.undo()
    with_info(monkeypatch, {**fixed, **version(new)})
    assert store.local("viz/a.pt").read_bytes() == new


@pytest.fixture
def no_length_server(tmp_path):
    """HTTP/1.0 without Content-Length (the body ends when the connection closes); while
    `state["cut"]`, bodies are cut short, as a dropped connection would leave them."""
    state = {"cut": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(DATA[:1000] if state["cut"] else DATA)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_download_without_size_is_never_served_from_the_cache(no_length_server, tmp_path):
    url, state = no_length_server
    store = Store(url, cache_dir=tmp_path)
    assert store.info("viz/a.pt").get("size") is None
    with pytest.warns(UserWarning, match="does not report its size"):
        first = store.local("viz/a.pt")
    assert first.read_bytes() == DATA[:1000]  # truncated, and nothing could tell
    state["cut"] = False  # the connection is fine again: the retry must not reuse the cut copy
    with pytest.warns(UserWarning, match="does not report its size"):
        again = store.local("viz/a.pt")
    assert again.read_bytes() == DATA  # fetched again, not reused
    assert store.cached("viz/a.pt") is None
    assert not list(tmp_path.rglob("*-a.pt"))  # never under a cache key


def test_killed_download_parts_are_removed_at_the_next_run(mem, tmp_path):
    Store(mem, cache_dir=tmp_path).local("viz/a.pt")
    entry = next(p for p in (tmp_path / "files").iterdir())
    stale, fresh, live = (entry / f".tmp-x-a.pt.{n}.part" for n in ("stale", "fresh", "live"))
    for p in (stale, fresh, live):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    with open(live, "rb") as holder:  # another process still downloading
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert clean_stale_downloads(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists() and live.exists()
    os.utime(live, (old, old))
    # A new Store on the same cache (the next run) cleans once, with a warning naming the file.
    from inference import store as store_module

    store_module._CLEANED.discard(tmp_path.resolve())
    with pytest.warns(UserWarning, match="interrupted download"):
        Store(mem, cache_dir=tmp_path)
    assert not live.exists() and fresh.exists()


def test_download_shows_a_progress_bar(mem, tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Recording:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    Store(mem, cache_dir=tmp_path).local("viz/a.pt")
    (bar,) = bars
    assert bar.kw["total"] == len(DATA) and bar.kw["unit"] == "B" and "viz/a.pt" in bar.kw["desc"] and bar.n == len(DATA)
