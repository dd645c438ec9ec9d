"""Building and loading the project's C kernels (AVX-512): one way, shared by every C file.

`inference/attention_kernel.c` (sink attention for 16-dimensional heads) and
`inference/select_kernel.c` (AbsTopK selection) need what numba, the project's other kernel
compiler, does not give on these CPUs: 512-bit registers (numba's LLVM prefers 256-bit vectors
here), masked lanes, compress and in-register transposes. They have no dependency but a C
compiler. Each is compiled on first use with the system's compiler (`cc`, else `gcc` / `clang`;
`-O3 -march=native`) into `__pycache__` beside this file when writable, else a per-user directory
under the temp dir; the library's name carries a hash of the source, the flags and the host CPU, so
a changed source or another CPU builds anew, and the write is atomic (a temp file, then a rename).
It is loaded with ctypes, which releases the GIL during a call, so worker threads run kernels in
parallel.

No compiler, no AVX-512 (the intrinsics do not compile: a warning), or an unwritable cache:
`library()` returns None and each caller runs its own fallback (numba or torch), which the tests
run too. `ENABLED = False` switches every C kernel off (tests, A/B benchmarks).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

ENABLED = True
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c11"]

_BUILT: dict[str, ctypes.CDLL | None] = {}
_LOCK = threading.Lock()


def library(source: str, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The compiled `inference/<source>` with its functions typed by `declare(lib)`, or None when
    switched off or it cannot be built here (a warning, once per process)."""
    if not ENABLED:
        return None
    if source not in _BUILT:
        with _LOCK:
            if source not in _BUILT:
                lib = _build(Path(__file__).with_name(source))
                if lib is not None:
                    declare(lib)
                _BUILT[source] = lib
    return _BUILT[source]


def compiler() -> str | None:
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _host_id() -> str:
    """What `-march=native` compiles for: the machine and its CPU's name and features."""
    try:
        import llvmlite.binding as ll  # numba's LLVM binding: present wherever numba is

        return f"{platform.machine()} {ll.get_host_cpu_name()} {ll.get_host_cpu_features().flatten()}"
    except Exception:  # noqa: BLE001 (no llvmlite: the processor string, less precise)
        return f"{platform.machine()} {platform.processor()}"


def cache_dirs() -> list[Path]:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return [Path(__file__).parent / "__pycache__", Path(tempfile.gettempdir()) / f"circuits-kernels-{uid}"]


def _build(source: Path) -> ctypes.CDLL | None:
    cc = compiler()
    what = f"inference.native: {source.name}"
    if cc is None:
        warnings.warn(f"{what}: no C compiler found; using the fallback", stacklevel=4)
        return None
    # the source and every header beside it (a changed header rebuilds its includers)
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join([cc, *FLAGS, _host_id()]).encode()).hexdigest()[:16]
    errors = []
    for directory in cache_dirs():
        lib_path = directory / f"{source.stem}-{key}.so"
        try:
            if not lib_path.exists():
                directory.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
                os.close(fd)
                try:
                    run = subprocess.run([cc, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True)
                    if run.returncode != 0:  # e.g. no AVX-512 on this CPU: the intrinsics do not compile
                        last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
                        warnings.warn(f"{what}: {cc} could not build it here ({last}); using the fallback", stacklevel=4)
                        return None
                    os.replace(tmp, lib_path)  # atomic: another process sees the whole library or none
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            return ctypes.CDLL(str(lib_path))
        except OSError as e:  # unwritable directory, unloadable file: try the next place
            errors.append(f"{directory}: {e}")
    warnings.warn(f"{what}: no place to build it ({'; '.join(errors)}); using the fallback", stacklevel=4)
    return None
