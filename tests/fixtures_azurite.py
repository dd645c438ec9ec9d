"""A real Azure Blob service for tests: `azurite` (npm), started on a free loopback port.

Where the binary comes from, first found wins: `$AZURITE_BIN`, the project's own install
(`.ci/node/node_modules/.bin/azurite-blob`, made by the README's setup and by `.ci/run`),
then `azurite-blob` on PATH. Without it the tests that need it skip with the install
command, except under `CIRCUITS_REQUIRE_AZURITE=1` (set by `.ci/run`), where they fail.

    def test_x(azurite):
        url = azurite.upload_dir(local_store, "circuit-sparsity")   # public (anonymous) container
        # url == "http://127.0.0.1:<port>/devstoreaccount1/circuit-sparsity"

    @pytest.fixture(scope="module")
    def my_store(azurite, tmp_path_factory):         # a store in a public container, uploaded once
        return azurite.upload_store(make_local_store(...), "my-container")   # (local, "az://my-container", conn)

    def test_y(my_store, monkeypatch):
        point_adlfs_at(monkeypatch, my_store.connection_string)   # az:// URLs now reach azurite

`running_azurite()` starts one outside pytest (bench/store_download.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, fixed; not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
INSTALL = "npm ci --prefix .ci/node"


def azurite_binary() -> str | None:
    for cand in (
        os.environ.get("AZURITE_BIN"),
        str(REPO / ".ci/node/node_modules/.bin/azurite-blob"),
        shutil.which("azurite-blob"),
    ):
        if cand and os.path.exists(cand):
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AzureStore(NamedTuple):
    """A local directory uploaded to an azurite container: its `az://` URL and the anonymous connection string
    (`BlobEndpoint=...;`, no key: public-container access, as the release's)."""

    local: Path
    url: str
    connection_string: str


def point_adlfs_at(monkeypatch, connection_string: str) -> None:
    """Route `az://` URLs (adlfs, so Store and the pipeline) to azurite through the ordinary Azure variable,
    with no other Azure setting of the user's environment in the way."""
    import fsspec

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string)
    for var in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ANON"):
        monkeypatch.delenv(var, raising=False)
    fsspec.filesystem("az").clear_instance_cache()  # instances made under another environment


@dataclass
class Azurite:
    host: str
    port: int
    workdir: Path

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={self.blob_endpoint};"

    def service(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def container_url(self, container: str) -> str:
        return f"{self.blob_endpoint}/{container}"

    def create_container(self, container: str, public: bool = True) -> str:
        """A container; `public` gives anonymous read and list, as the release's container has."""
        svc = self.service()
        cc = svc.get_container_client(container)
        if not cc.exists():
            cc.create_container(public_access="container" if public else None)
        return self.container_url(container)

    def upload_dir(self, local: str | os.PathLike, container: str, prefix: str = "", public: bool = True) -> str:
        """Upload every file under `local` (relative names kept) and return the container's URL."""
        url = self.create_container(container, public=public)
        cc = self.service().get_container_client(container)
        root = Path(local)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = "/".join(x for x in (prefix.strip("/"), path.relative_to(root).as_posix()) if x)
            with open(path, "rb") as fh:
                cc.upload_blob(name, fh, overwrite=True)
        return url + (f"/{prefix.strip('/')}" if prefix.strip("/") else "")

    def upload_store(self, local: str | os.PathLike, container: str) -> AzureStore:
        """Upload a store directory to a public container: (local, `az://<container>`, anonymous connection string)."""
        self.upload_dir(local, container)
        return AzureStore(Path(local), f"az://{container}", f"BlobEndpoint={self.blob_endpoint};")


class AzuriteMissing(RuntimeError):
    pass


@contextmanager
def running_azurite(workdir: Path | None = None) -> Iterator[Azurite]:
    """An azurite blob service on a free loopback port, data in `workdir` (a temp dir, removed after, if None);
    stopped on exit. Raises AzuriteMissing without the binary, RuntimeError if it does not start."""
    binary = azurite_binary()
    if binary is None:
        raise AzuriteMissing(f"azurite not installed (run `{INSTALL}` in the repo, as the README's setup does)")
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="azurite-")) if own else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(workdir / "azurite.log", "wb")
    proc = subprocess.Popen(
        [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir),
         "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"azurite exited with {proc.returncode}: {(workdir / 'azurite.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("azurite did not start listening within 60 s") from None
                time.sleep(0.2)
        yield Azurite("127.0.0.1", port, workdir)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def azurite():
    """A running azurite blob service (data in a temp dir), stopped at the end of the session. Without the binary
    the test skips, or fails under CIRCUITS_REQUIRE_AZURITE=1 (CI: a missing emulator must not pass as skips)."""
    try:
        with running_azurite() as az:
            yield az
    except AzuriteMissing as err:
        if os.environ.get("CIRCUITS_REQUIRE_AZURITE") == "1":
            pytest.fail(str(err))
        pytest.skip(str(err))
