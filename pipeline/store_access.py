"""How the pipeline reaches a store's files, models and tokenizer (through `inference`).

The pipeline uses `inference.store.Store` (fsspec + download cache + single-tensor reads),
`inference.load_model` and `inference.tokenizer` when they are present. Until they land in a
checkout, a minimal local-or-fsspec fallback with the same method names keeps the pipeline usable;
it caches nothing for local stores and downloads remote files into the cache directory keyed by
path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import fsspec

TOKENIZER_DIR = "tinypython"


class FallbackStore:
    """`Store(url, cache_dir)` with ls / exists / open / local / sha256 over fsspec."""

    def __init__(self, url: str, cache_dir: str | None = None) -> None:
        self.url = str(url).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.cache_dir = Path(cache_dir or os.path.join(tempfile.gettempdir(), "circuits-cache"))

    def _p(self, rel: str) -> str:
        return self.root.rstrip("/") + "/" + rel.strip("/") if rel.strip("/") else self.root

    def ls(self, rel: str) -> list[str]:
        return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self._p(rel), detail=False))

    def isdir(self, rel: str) -> bool:
        return self.fs.isdir(self._p(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self._p(rel), mode)

    def local(self, rel: str) -> Path:
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
            return Path(self._p(rel))
        info = self.fs.info(self._p(rel))
        key = hashlib.sha256(f"{self.url}/{rel}|{info.get('size')}|{info.get('mtime') or info.get('ETag') or info.get('LastModified')}".encode()).hexdigest()[:16]
        target = self.cache_dir / key / os.path.basename(rel)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            self.fs.get_file(self._p(rel), str(tmp))
            os.replace(tmp, target)
        return target

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with open(self.local(rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def open_store(url: str, cache_dir: str | None = None):
    try:
        from inference.store import Store
    except ImportError:
        return FallbackStore(url, cache_dir)
    store = Store(url, cache_dir=cache_dir)
    if not hasattr(store, "url"):  # the pipeline names files in messages by the store's URL
        store.url = str(url).rstrip("/")
    return store


def list_dir(store, rel: str) -> list[str]:
    """Child names (not paths) of a store directory; [] when it does not exist."""
    try:
        names = store.ls(rel)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted({os.path.basename(str(n).rstrip("/")) for n in names})


def load_model(store, model: str, device: str = "cpu"):
    """The store's `models/<model>` as an eval-mode GPT on `device`."""
    try:
        from inference import load_model as _load

        return _load(store.url.rstrip("/") + f"/models/{model}", device=device).eval()
    except (ImportError, ModuleNotFoundError):
        pass
    import torch

    from inference import GPT, GPTConfig

    cfg_rel = f"models/{model}/beeg_config.json"
    cfg = GPTConfig.from_json(store.local(cfg_rel).read_bytes(), source=cfg_rel)
    m = GPT(cfg)
    sd = torch.load(store.local(f"models/{model}/final_model.pt"), map_location="cpu", weights_only=True)
    m.load_state_dict(sd, strict=False)
    return m.to(device).eval()


def read_tensor(store, model: str, key: str):
    """One tensor of `models/<model>/final_model.pt` (ranged reads when inference.store provides them)."""
    try:
        from inference.store import read_tensor as _read

        return _read(store.url.rstrip("/") + f"/models/{model}", key)
    except ImportError:
        pass
    import torch

    sd = torch.load(store.local(f"models/{model}/final_model.pt"), map_location="cpu", weights_only=True, mmap=True)
    if key not in sd:
        raise KeyError(f"models/{model}/final_model.pt has no tensor {key!r}")
    return sd[key]


def load_tokenizer(store):
    """The store's `tinypython/` tokenizer as a tiktoken Encoding."""
    try:
        from inference.tokenizer import get_tokenizer

        return get_tokenizer(store.url.rstrip("/") + "/" + TOKENIZER_DIR)
    except ImportError:
        pass
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    bpe = store.local(f"{TOKENIZER_DIR}/vocab.bpe")
    enc_json = store.local(f"{TOKENIZER_DIR}/encoder.json")
    ranks = data_gym_to_mergeable_bpe_ranks(str(bpe), str(enc_json))
    specials = {k: v for k, v in json.loads(enc_json.read_text()).items() if k.startswith("<|")}
    pat = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("tinypython_2k_store", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)


def token_bytes_list(enc) -> tuple[list[bytes], dict[int, str]]:
    """Every token's bytes (index = id) and the special tokens {id: name}."""
    special = {i: s for s, i in getattr(enc, "_special_tokens", {}).items()}
    out = []
    for i in range(enc.n_vocab):
        if i in special:
            out.append(special[i].encode())
            continue
        try:
            out.append(enc.decode_single_token_bytes(i))
        except KeyError:
            out.append(b"")
    return out, special
