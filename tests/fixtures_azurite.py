"""A real Azure Blob service for tests: `azurite` (npm), started on a free loopback port.

Where the binary comes from, first found wins: `$AZURITE_BIN`, the project's own install
(`.ci/node/node_modules/.bin/azurite-blob`, made by the README's setup and by `.ci/run`),
then `azurite-blob` on PATH. Without it the tests that need it skip with the install
command, except under `CIRCUITS_REQUIRE_AZURITE=1` (set by `.ci/run`), where they fail.

    def test_x(azurite):
        url = azurite.upload_dir(local_store, "circuit-sparsity")   # public (anonymous) container
        # url == "http://127.0.0.1:<port>/devstoreaccount1/circuit-sparsity"
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


@pytest.fixture(scope="session")
def azurite():
    """A running azurite blob service (data in a temp dir), stopped at the end of the session."""
    binary = azurite_binary()
    if binary is None:
        msg = f"azurite not installed (run `{INSTALL}` in the repo, as the README's setup does)"
        if os.environ.get("CIRCUITS_REQUIRE_AZURITE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    workdir = Path(tempfile.mkdtemp(prefix="azurite-"))
    port = _free_port()
    log = open(workdir / "azurite.log", "wb")
    proc = subprocess.Popen(
        [
            binary,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--location",
            str(workdir),
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
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
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
