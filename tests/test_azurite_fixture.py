"""The azurite fixture itself: a container uploaded through it is listed anonymously by adlfs."""

import fsspec


def test_public_container_lists_and_reads_anonymously(azurite, tmp_path):
    (tmp_path / "models/m").mkdir(parents=True)
    (tmp_path / "models/m/a.txt").write_bytes(b"hello")
    azurite.upload_dir(tmp_path, "fixture-check")
    # adlfs with an explicit blob endpoint (no key): anonymous access to a public container
    fs = fsspec.filesystem("az", connection_string=f"BlobEndpoint={azurite.blob_endpoint};", anon=True)
    assert fs.ls("fixture-check/models/m", detail=False) == ["fixture-check/models/m/a.txt"]
    assert fs.cat("fixture-check/models/m/a.txt") == b"hello"
