"""Download throughput of the store path (adlfs -> verified cache) against a local Azure emulator.

Starts azurite on a free loopback port (the tests' binary lookup: `$AZURITE_BIN`, the project's
`.ci/node` install, `azurite-blob` on PATH), uploads one random file of `--mb` MB as a public blob,
and times, in this process:

- baseline: copying the same bytes from a local file to another (`shutil.copyfile` + fsync),
- `Store("az://bench").local(...)`: listing metadata, download through adlfs, MD5 check against
  the blob's content_md5, fsync, rename into the cache,
- the same call again (a cache hit: one metadata request).

    python bench/store_download.py [--mb 256]

The figure is a *local emulator* figure: it bounds what the client side (adlfs, hashing, the
disk) costs per GB; over the internet the network is the limit (at 100 Mbit/s, ~80 s per GB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from fixtures_azurite import AzuriteMissing, running_azurite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="size of the test blob in MB (default 256)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        with running_azurite(work / "azurite") as az:
            src = work / "src" / "models" / "m" / "final_model.pt"
            src.parent.mkdir(parents=True)
            with open(src, "wb") as f:
                for _ in range(args.mb):
                    f.write(os.urandom(1 << 20))
            size = src.stat().st_size
            t = time.perf_counter()
            az.upload_dir(work / "src", "bench")
            upload = time.perf_counter() - t

            t = time.perf_counter()
            shutil.copyfile(src, work / "copy.bin")
            with open(work / "copy.bin", "rb+") as f:
                os.fsync(f.fileno())
            local = time.perf_counter() - t

            os.environ["AZURE_STORAGE_CONNECTION_STRING"] = f"BlobEndpoint={az.blob_endpoint};"
            from inference.store import Store

            store = Store("az://bench", cache_dir=work / "cache")
            t = time.perf_counter()
            got = store.local("models/m/final_model.pt")
            download = time.perf_counter() - t
            assert got.stat().st_size == size
            t = time.perf_counter()
            assert store.local("models/m/final_model.pt") == got
            hit = time.perf_counter() - t

            from inference.store import _content_md5

            md5 = (
                "checked against content_md5"
                if _content_md5(store.info("models/m/final_model.pt"))
                else "no content_md5 listed: size check only"
            )
            gb = size / 1e9
            print(f"blob: {size / 1e6:.0f} MB; azurite on 127.0.0.1 (a local emulator, not the network); {os.cpu_count()} cores")
            print(f"  upload (azure-storage-blob, for reference): {upload:6.2f} s")
            print(
                f"  baseline local copy + fsync:                 {local:6.2f} s  {local / gb:6.1f} s/GB  {gb / local * 1000:7.0f} MB/s"
            )
            print(
                f"  Store.local (adlfs, verify, cache write):    {download:6.2f} s  {download / gb:6.1f} s/GB  {gb / download * 1000:7.0f} MB/s"
            )
            print(f"    ({md5})")
            print(f"  cache hit (one metadata request):            {hit * 1000:6.1f} ms")
            print(f"  ratio download / local copy: {download / local:.1f}x")
    except AzuriteMissing as err:
        sys.exit(str(err))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
