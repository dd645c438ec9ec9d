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


def test_missing_binary_skips_or_fails_under_ci(monkeypatch):
    """Without azurite a test needing it skips, except under CIRCUITS_REQUIRE_AZURITE=1 (CI), where it fails."""
    import fixtures_azurite
    import pytest

    monkeypatch.setattr(fixtures_azurite, "azurite_binary", lambda: None)
    fixture = fixtures_azurite.azurite.__wrapped__  # the fixture's own function, outside pytest's machinery
    monkeypatch.delenv("CIRCUITS_REQUIRE_AZURITE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="npm ci --prefix .ci/node"):
        next(fixture())
    monkeypatch.setenv("CIRCUITS_REQUIRE_AZURITE", "1")
    with pytest.raises(pytest.fail.Exception, match="azurite not installed"):
        next(fixture())
