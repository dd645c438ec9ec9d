"""The public store's kind of URL: Azure Blob Storage through adlfs, tested on azurite.

`https://<account>.blob.core.windows.net/<container>` and `az://<container>` (account from the
Azure environment, `openaipublic` by default) map to adlfs options without any network; the
rest runs against a real Blob service (the `azurite` fixture) holding the tiny store.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from adlfs import AzureBlobFileSystem
from fixtures_azurite import point_adlfs_at

from inference.store import Store, azure_location, read_tensor
from pipeline.assets.discovery import discover_models, discover_runs

PUBLIC = "https://openaipublic.blob.core.windows.net/circuit-sparsity"
# What the release holds (checkpoint-format.md); the demo build's own files are left out.
RELEASED_TOPS = ("models", "viz", "train_curves", "tinypython")


@pytest.fixture
def no_azure_env(monkeypatch):
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ANON"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_public_https_url_is_anonymous_adlfs(no_azure_env):
    assert azure_location(PUBLIC) == ({"account_name": "openaipublic", "anon": True}, "circuit-sparsity")
    store = Store(PUBLIC + "/")
    assert isinstance(store.fs, AzureBlobFileSystem) and store.root == "circuit-sparsity"
    assert store.fs.service_client.url.startswith("https://openaipublic.blob.core.windows.net")
    assert store.path("models/csp_yolo2") == PUBLIC + "/models/csp_yolo2"  # messages keep the user's URL


def test_az_url_account_from_env_or_release_default(no_azure_env):
    assert azure_location("az://circuit-sparsity/sub") == ({"account_name": "openaipublic", "anon": True}, "circuit-sparsity/sub")
    no_azure_env.setenv("AZURE_STORAGE_ACCOUNT_NAME", "mine")
    assert azure_location("abfs://c")[0]["account_name"] == "mine"
    no_azure_env.setenv("AZURE_STORAGE_ANON", "false")  # adlfs's own switch to DefaultAzureCredential
    assert azure_location("az://c")[0]["anon"] is False
    conn = "BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;"
    no_azure_env.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    assert azure_location("az://c")[0]["connection_string"] == conn


def test_https_url_never_sends_another_accounts_credentials(no_azure_env):
    no_azure_env.setenv("AZURE_STORAGE_CONNECTION_STRING", "AccountName=mine;AccountKey=c2VjcmV0;EndpointSuffix=core.windows.net")
    options, path = azure_location(PUBLIC)
    assert options == {"connection_string": "BlobEndpoint=https://openaipublic.blob.core.windows.net;", "anon": True}
    no_azure_env.delenv("AZURE_STORAGE_CONNECTION_STRING")
    no_azure_env.setenv("AZURE_STORAGE_ACCOUNT_NAME", "openaipublic")  # the same account: its credentials apply
    assert azure_location(PUBLIC)[0] == {"account_name": "openaipublic", "anon": True}


def test_other_urls_are_not_azure(no_azure_env, tmp_path):
    for url in ("https://example.com/store", "http://127.0.0.1:8000/x", str(tmp_path), "memory://x", "s3://b/k"):
        assert azure_location(url) is None
    with pytest.raises(ValueError, match="names a container"):
        azure_location("https://openaipublic.blob.core.windows.net/")


def released_copy(src: Path, dst: Path) -> Path:
    """The store's released part (no build manifest, lock or node means: the release has none)."""
    for top in RELEASED_TOPS:
        shutil.copytree(src / top, dst / top, ignore=shutil.ignore_patterns("node_means.pt", "prompt_sets"))
    return dst


@pytest.fixture(scope="module")
def azure_store(azurite, tiny_store, tmp_path_factory):
    """(local released copy, az:// URL, connection string) of the tiny store uploaded to azurite."""
    return azurite.upload_store(released_copy(tiny_store, tmp_path_factory.mktemp("released") / "store"), "circuit-sparsity")


@pytest.fixture
def az_env(azure_store, monkeypatch):
    point_adlfs_at(monkeypatch, azure_store.connection_string)
    return azure_store


def test_azurite_store_lists_reads_and_caches(az_env, tmp_path):
    local, url, _ = az_env
    store = Store(url, cache_dir=tmp_path / "cache")
    assert isinstance(store.fs, AzureBlobFileSystem)
    assert store.ls("") == sorted(RELEASED_TOPS)
    files = store.find("viz")
    assert sorted(files) == sorted(p.relative_to(local).as_posix() for p in (local / "viz").rglob("*") if p.is_file())
    assert all(info["size"] == (local / rel).stat().st_size for rel, info in files.items())
    rel = "models/tiny_sparse/final_model.pt"
    got = store.local(rel)
    assert (tmp_path / "cache") in got.parents and got.read_bytes() == (local / rel).read_bytes()
    # Another Store of the same container finds the entry: a cache hit, no second download.
    assert Store(url + "/", cache_dir=tmp_path / "cache").cached(rel) == got
    wte = read_tensor(store.path("models/tiny_sparse"), "transformer.wte.weight", cache_dir=tmp_path / "other")
    assert (
        hashlib.sha256(wte.numpy().tobytes()).hexdigest()
        == hashlib.sha256(read_tensor(local / "models/tiny_sparse", "transformer.wte.weight").numpy().tobytes()).hexdigest()
    )
    with pytest.raises(FileNotFoundError, match="az://circuit-sparsity/models/nope.json"):
        store.local("models/nope.json")


def test_discovery_through_adlfs_equals_local(az_env, tmp_path):
    local, url, _ = az_env
    remote = Store(url, cache_dir=tmp_path / "cache")
    assert [(r.run_id, r.path) for r in discover_runs(remote)] == [(r.run_id, r.path) for r in discover_runs(Store(str(local)))]
    assert discover_models(remote) == discover_models(Store(str(local))) == ["tiny_sparse"]
    assert not list((tmp_path / "cache").rglob("*.pt"))  # listing fetched nothing


def parquet_tables(data: Path) -> dict[str, object]:
    import pyarrow.parquet as pq

    return {p.relative_to(data).as_posix(): pq.read_table(p) for p in sorted(data.glob("tables/*/*.parquet"))}


# One circuit and its model, recompute included (~15 s per side on 2 cores): the whole tiny store
# takes ~1 min per side (mostly Dagster's per-step overhead) and exercises no other code path.
E2E_SELECT = "single_double_quote/prune_demo/k_optim"


def test_materialize_from_azurite_equals_local_copy(az_env, tmp_path, monkeypatch, capsys):
    """`circuits materialize` from the emulated public store writes the same tables, value for value."""
    from pipeline.cli import main

    local, url, _ = az_env
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    for store, data in ((str(local), tmp_path / "from-local"), (url, tmp_path / "from-azure")):
        assert main(["materialize", "--store", store, "--data", str(data), "--select", E2E_SELECT]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "1 circuits of 1 models" in out and "0 failed" in out
    want, got = parquet_tables(tmp_path / "from-local"), parquet_tables(tmp_path / "from-azure")
    assert set(got) == set(want) and len(want) >= 9 + 4  # the circuit's tables, the model's tables
    assert {name.split("/")[1] for name in want} >= {
        "nodes",
        "edges",
        "activations",
        "ablations",
        "recompute_summary",
        "vocab",
        "embeddings",
    }
    for name, table in want.items():
        # Wall-clock seconds per recompute stage are measurements of the run, not data of the store.
        timing = [c for c in table.column_names if c.startswith("seconds_")]
        assert got[name].drop_columns(timing).equals(table.drop_columns(timing)), name
    # The azure run read through the cache: the selected circuits' files, the checkpoint.
    cached = {p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "files").rglob("*-*") if p.is_file()}
    assert {"viz_data.pt", "final_model.pt", "beeg_config.json", "encoder.json", "vocab.bpe"} <= cached


def test_offline_retries_are_short(no_azure_env):
    """Offline, every request first exhausts the SDK's retries; ours back off ~2/4/6 s, not 15/18/24 s."""
    policy = Store("az://circuit-sparsity").fs.service_client._config.retry_policy
    assert (policy.initial_backoff, policy.increment_base) == (2, 2)
