"""Local files written atomically, and hashed: the one home of both, for every layer.

A reader sees the old file or the new one, never half: content goes to a temporary name in
the target's directory (same filesystem, so the final `os.replace` is atomic) and is renamed
over the target only once complete. A crash leaves at most a temporary, named
`.tmp-<name>.<random>.part` (TMP_PREFIX, TMP_SUFFIX), which cleanups remove.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".part"
_CHUNK = 1 << 20


def write_atomic(target: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], Any], fsync: bool = True) -> Path:
    """Write `content` (bytes, text as UTF-8, or a function filling a binary file) to `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            if fsync:  # the rename must not reach the disk before the data does
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target` as a whole.

    (Two renames when `target` exists: a reader may briefly find no directory, never a mixed one.)"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        if target.exists():
            old = target.parent / f"{TMP_PREFIX}{target.name}.old{TMP_SUFFIX}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
