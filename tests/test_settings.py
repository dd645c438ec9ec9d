"""Settings: one module reads the environment, and the light layers stay light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETTINGS = REPO / "inference" / "settings.py"


def _environment_reads(path: Path) -> list[int]:
    """Lines of `os.environ.get(...)`, `os.environ[...]`, `os.getenv(...)`, `"X" in os.environ`."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "getenv" and getattr(node.value, "id", None) == "os":
            lines.append(node.lineno)
        if isinstance(node, (ast.Call, ast.Subscript, ast.Compare)):
            target = (
                node.func
                if isinstance(node, ast.Call)
                else node.value
                if isinstance(node, ast.Subscript)
                else node.comparators[0]
            )
            if isinstance(node, ast.Call):
                target = target.value if isinstance(target, ast.Attribute) and target.attr in ("get", "__getitem__") else None
            if isinstance(target, ast.Attribute) and target.attr == "environ" and getattr(target.value, "id", None) == "os":
                lines.append(node.lineno)
    return lines


def test_only_inference_settings_reads_the_environment():
    offenders = {}
    for package in ("inference", "pipeline", "viewer"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path != SETTINGS and (lines := _environment_reads(path)):
                offenders[str(path.relative_to(REPO))] = lines
    assert not offenders, f"read the environment through inference.settings, not here: {offenders}"
    assert _environment_reads(SETTINGS), "the checker finds nothing: it is broken"


def test_settings_defaults_and_errors(monkeypatch):
    from inference import settings

    for var in ("CIRCUITS_STORE", "CIRCUITS_DATA", "CIRCUITS_CACHE", "CIRCUITS_LOSS_FACTOR", "CIRCUITS_TOKENIZER_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert settings.store_url() == "data/store" == settings.embedded_store_dir()
    monkeypatch.setenv("CIRCUITS_DATA", "/x/y/")
    assert settings.store_url() == "/x/y/store"
    monkeypatch.setenv("CIRCUITS_STORE", "")  # empty = unset
    assert settings.store_env() is None and settings.store_url() == "/x/y/store"
    assert settings.loss_factor() == 0.5
    monkeypatch.setenv("CIRCUITS_LOSS_FACTOR", "half")
    with pytest.raises(ValueError, match="CIRCUITS_LOSS_FACTOR='half'"):
        settings.loss_factor()


def test_the_settings_the_pipeline_and_the_viewer_share_do_not_load_torch():
    code = "import sys, inference.settings, pipeline.settings, viewer.queries; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_counts_parse_one_way_in_the_environment_and_on_the_command_line(monkeypatch, capsys):
    from inference import settings
    from pipeline.cli import main

    monkeypatch.setenv("CIRCUITS_ABLATION_BUDGET", "2_000_000")
    assert settings.ablation_budget() == 2_000_000
    monkeypatch.setenv("CIRCUITS_ABLATION_BUDGET", "0")
    assert settings.ablation_budget() == 0  # every pair
    for bad in ("-1", "2e6", "lots"):
        monkeypatch.setenv("CIRCUITS_ABLATION_BUDGET", bad)
        with pytest.raises(ValueError, match=f"CIRCUITS_ABLATION_BUDGET='{bad}'"):
            settings.ablation_budget()
        with pytest.raises(SystemExit):  # argparse refuses it before any work starts
            main(["materialize", "--ablation-budget", bad])
        assert f"expected a whole number >= 0, got '{bad}'" in capsys.readouterr().err
    monkeypatch.setenv("CIRCUITS_DASK_WORKERS", "0")
    with pytest.raises(ValueError, match="CIRCUITS_DASK_WORKERS='0'"):
        settings.dask_workers()
