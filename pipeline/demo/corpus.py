"""The demo corpus: the `.py` files of the running interpreter's standard library.

Deterministic: files are listed in sorted order of their POSIX path relative to the stdlib
root, and each file goes to the train or the test split by a stable hash of that relative
path (so a file's split never depends on which other files exist, the interpreter's
install location, or the process's hash seed).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Directories skipped: third-party code, and the stdlib's own test suites (huge, repetitive,
# and full of deliberately malformed source).
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class SourceFile:
    relpath: str  # POSIX path relative to the stdlib root, e.g. "json/decoder.py"
    text: str
    split: str  # "train" | "test"

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class Corpus:
    root: str
    files: tuple[SourceFile, ...]

    def split(self, name: str) -> list[SourceFile]:
        return [f for f in self.files if f.split == name]

    def summary(self) -> dict:
        out = {"root": self.root, "num_files": len(self.files)}
        for name in ("train", "test"):
            files = self.split(name)
            out[f"{name}_files"] = len(files)
            out[f"{name}_bytes"] = sum(f.nbytes for f in files)
        return out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str, test_fraction: float) -> str:
    """'test' for a stable pseudo-random `test_fraction` of relative paths, else 'train'."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def load_corpus(
    test_fraction: float = 0.1,
    max_files: int | None = None,
    max_file_bytes: int | None = None,
    root: str | Path | None = None,
) -> Corpus:
    """Read the stdlib `.py` files (UTF-8 only; undecodable files are skipped).

    `max_files` keeps every n-th file of the sorted list (a spread-out sample, still
    deterministic); `max_file_bytes` drops larger files. Both exist for the tiny profile.
    """
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise FileNotFoundError(f"stdlib directory {base} does not exist")
    paths = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # never descend into them
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and path.is_file():
                paths.append((path.relative_to(base).as_posix(), path))
    paths.sort()
    files = []
    for rel, path in paths:
        raw = path.read_bytes()
        if max_file_bytes is not None and len(raw) > max_file_bytes:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        files.append(SourceFile(rel, text, split_of(rel, test_fraction)))
    if max_files is not None and len(files) > max_files:
        step = len(files) / max_files
        files = [files[int(i * step)] for i in range(max_files)]
    if not any(f.split == "test" for f in files) or not any(f.split == "train" for f in files):
        raise ValueError(f"corpus from {base} has an empty train or test split ({len(files)} files)")
    return Corpus(str(base), tuple(files))


def corpus_for_profile(profile) -> Corpus:
    """The corpus a store profile (`pipeline.demo.profiles.Profile`) is built from."""
    return load_corpus(profile.test_fraction, profile.corpus_max_files, profile.corpus_max_file_bytes)


def corpus_digest(corpus: Corpus) -> str:
    """sha256 over every file's relative path, split and content: identifies the corpus."""
    h = hashlib.sha256()
    for f in corpus.files:
        for part in (f.relpath, f.split, f.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()
