"""Building the C kernels (`inference.native`): once per source, flags and CPU, cached, written
atomically; a failed compile or no place to write falls back with a warning; switched off, none."""

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from test_attention_kernel import CAN_BUILD

from inference import native


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Kernels built into tmp_path/cache (the first place, a file where a directory should be, fails)."""
    (tmp_path / "blocked").write_text("a file where a directory would go")
    monkeypatch.setattr(native, "cache_dirs", lambda: [tmp_path / "blocked" / "x", tmp_path / "cache"])
    return tmp_path / "cache"


def test_a_failed_compile_warns_and_leaves_nothing(tmp_path, cache):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    broken = tmp_path / "broken.c"
    broken.write_text("int f( { this is not C }\n")
    with pytest.warns(UserWarning, match="broken.c: .* could not build it here"):
        assert native._build(broken) is None
    assert list(cache.iterdir()) == []  # no library, no temp file left


def test_no_compiler_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no C compiler"):
        assert native._build(tmp_path / "any.c") is None


def test_built_once_then_loaded_from_the_cache(cache, monkeypatch):
    if not CAN_BUILD:
        pytest.skip("no AVX-512 CPU or no C compiler")
    source = Path(native.__file__).with_name("select_kernel.c")
    assert native._build(source) is not None
    built = list(cache.glob("select_kernel-*.so"))
    assert len(built) == 1 and list(cache.iterdir()) == built

    def no_compiler(*a, **kw):
        raise AssertionError("compiled again although the library was cached")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = native._build(source)
    assert lib is not None and hasattr(lib, "select_rows_f32")
    assert list(cache.glob("select_kernel-*.so")) == built


def test_another_cpu_source_or_header_gets_its_own_library(cache, monkeypatch, tmp_path):
    if not CAN_BUILD:
        pytest.skip("no AVX-512 CPU or no C compiler")
    source, header = tmp_path / "k.c", tmp_path / "k.h"
    header.write_text("#define BASE 0\n")
    source.write_text('#include "k.h"\nint one(void) { return BASE + 1; }\n')
    assert native._build(source).one() == 1
    monkeypatch.setattr(native, "_host_id", lambda: "another cpu")
    assert native._build(source).one() == 1
    source.write_text('#include "k.h"\nint one(void) { return BASE + 2; }\n')
    assert native._build(source).one() == 2
    header.write_text("#define BASE 10\n")  # a header beside the source is part of its hash
    assert native._build(source).one() == 12
    assert len(list(cache.glob("k-*.so"))) == 4


def test_switched_off_gives_none(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", False)
    assert native.library("select_kernel.c", lambda lib: None) is None
