"""Fixture: the tiny embedded store, built once per test session.

`tiny_store` is the Path of a store built with the `tiny` profile (tokenizer, sparse model,
training curve, and part 2's circuits when `pipeline.demo.circuits` exists).

To skip the build in repeated local runs, point `CIRCUITS_TEST_STORE` at a directory kept
between sessions: the first session builds the tiny store there, later sessions only check
it against its manifest (sha256 of every file) and rebuild what is missing or stale; a
store built with other knobs is replaced. CI leaves the variable unset and builds fresh.
"""

import os
from pathlib import Path

import pytest

__all__ = ["tiny_store"]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    from pipeline.demo.build import build_store

    cached = os.environ.get("CIRCUITS_TEST_STORE")
    if cached:
        # force: this directory is a test cache, so a store from older knobs is replaced.
        return build_store(Path(cached), "tiny", force=True, progress=False)
    return build_store(tmp_path_factory.mktemp("tiny_store") / "store", "tiny", progress=False)
