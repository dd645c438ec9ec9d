"""Pick what to fetch: --model / --task / --sweep / --k (and CIRCUITS_MODELS etc., and the
`circuits` resource in the Dagster UI) decide which files are downloaded; `circuits ls` lists the
store without fetching. Run against azurite holding a two-model copy of the tiny store."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
from fixtures_azurite import point_adlfs_at
from test_store_azure import released_copy

from inference.store import Store
from pipeline.assets.discovery import _runs_from_files, discover_models, discover_runs, store_index
from pipeline.resources import CircuitsResource
from pipeline.settings import Selection, split_names

TWIN = "tiny_twin"  # a second model: a copy of tiny_sparse under another name


# ---- the selection itself ------------------------------------------------------------------------


def test_names_and_patterns():
    assert split_names(["a,b", " c ", ""]) == ("a", "b", "c") and split_names(None) == ()
    s = Selection(models=("csp_sweep1_*", "csp_yolo2"), ks=("64", "k_optim"))
    assert s.wants_model("csp_sweep1_x4") and s.wants_model("csp_yolo2") and not s.wants_model("csp_yolo1")
    assert s.wants_run("csp_yolo2", "bracket_counting", "prune_v4", "k_optim")
    assert not s.wants_run("csp_yolo2", "bracket_counting", "prune_v4", "128")
    # Under the README's viz/<experiment>/ level the sweep is <sweep>@<experiment>: either name matches.
    assert Selection(sweeps=("prune_v4",)).wants_run("m", "t", "prune_v4@exp1", "8")
    assert Selection(sweeps=("prune_v4@exp1",)).wants_run("m", "t", "prune_v4@exp1", "8")
    assert not Selection(sweeps=("prune_v4",)).wants_run("m", "t", "prune_v5@exp1", "8")
    assert Selection(text="quote/prune").wants_run("m", "single_double_quote", "prune_v4", "8")
    assert not Selection() and Selection(models=("m",)) and Selection(ks=("8",)).filters_runs


def test_env_and_explicit_fields(monkeypatch):
    monkeypatch.setenv("CIRCUITS_MODELS", "csp_yolo2")
    monkeypatch.setenv("CIRCUITS_TASKS", "bracket_counting,set_or_string_fixedvarname")
    r = CircuitsResource.from_env(store_url="x", data="d", tasks=["single_double_quote"])
    assert r.selection() == Selection(models=("csp_yolo2",), tasks=("single_double_quote",))  # a flag wins over its variable
    assert CircuitsResource.from_env(store_url="x", data="d").selection().tasks == (
        "bracket_counting",
        "set_or_string_fixedvarname",
    )


def test_flat_listing_finds_the_runs_the_walk_finds(tmp_path):
    """Object stores are listed flat; the runs must be the local walk's, both layouts included."""
    names = [
        "viz/m/t/s/8/viz_data.pt",
        "viz/m/t/s/8/viz_data.pkl",  # .pt wins
        "viz/m/t/s/k_optim/viz_data.pkl",
        "viz/m/t/s/k_optim/masks.pt",  # other per-run outputs are not runs
        "viz/exp/m2/t/s/64/viz_data.pkl",  # the experiment level
        "viz/m/t/s/8/deeper/viz_data.pt",  # below a run: ignored, as the walk does
        "viz/m/t/viz_data.pt",
    ]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"x")
    flat = sorted((r.run_id, r.path) for r in _runs_from_files(names))
    assert flat == [(r.run_id, r.path) for r in discover_runs(Store(str(tmp_path)))]
    assert flat == [
        ("m/t/s/8", "viz/m/t/s/8/viz_data.pt"),
        ("m/t/s/k_optim", "viz/m/t/s/k_optim/viz_data.pkl"),
        ("m2/t/s@exp/64", "viz/exp/m2/t/s/64/viz_data.pkl"),
    ]


# ---- against azurite ----------------------------------------------------------------------------


def two_model_store(tiny_store: Path, root: Path) -> Path:
    store = released_copy(tiny_store, root)
    shutil.copytree(store / "models/tiny_sparse", store / f"models/{TWIN}")
    shutil.copytree(store / "train_curves/tiny_sparse", store / f"train_curves/{TWIN}")
    shutil.copytree(store / "viz/tiny_sparse", store / f"viz/{TWIN}")
    shutil.copytree(
        store / "viz/tiny_sparse/single_double_quote/prune_demo", store / "viz/tiny_sparse/single_double_quote/prune_b"
    )
    return store


@pytest.fixture(scope="module")
def selection_store(azurite, tiny_store, tmp_path_factory):
    return azurite.upload_store(two_model_store(tiny_store, tmp_path_factory.mktemp("selection") / "store"), "selection")


@pytest.fixture
def fetched(selection_store, monkeypatch):
    """The store files opened for reading (downloads and ranged reads), as full URLs."""
    point_adlfs_at(monkeypatch, selection_store.connection_string)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    for var in ("CIRCUITS_MODELS", "CIRCUITS_TASKS", "CIRCUITS_SWEEPS", "CIRCUITS_KS"):
        monkeypatch.delenv(var, raising=False)
    opened: list[str] = []
    real_open, real_bytes = Store.open, Store.read_bytes

    def open_(self, rel, mode="rb", **kw):
        opened.append(self.path(rel))
        return real_open(self, rel, mode, **kw)

    def read_bytes(self, rel):
        opened.append(self.path(rel))
        return real_bytes(self, rel)

    monkeypatch.setattr(Store, "open", open_)
    monkeypatch.setattr(Store, "read_bytes", read_bytes)
    return opened


def test_materialize_fetches_only_the_selection(selection_store, fetched, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    local, url, _ = selection_store
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "cache"))
    argv = ["materialize", "--store", url, "--data", str(tmp_path / "d"), "--no-recompute"]
    assert (
        main(
            [*argv, "--model", "tiny_sparse", "--task", "single_double_quote,var_swap", "--sweep", "prune_demo", "--k", "k_optim"]
        )
        == 0
    )
    assert "2 circuits of 1 models" in capsys.readouterr().out
    runs = {f"viz/tiny_sparse/{t}/prune_demo/k_optim/viz_data.pt" for t in ("single_double_quote", "var_swap")}
    viz = {u.removeprefix(url + "/") for u in fetched if "/viz/" in u}
    assert viz == runs  # nothing of the other model, task, sweep or k
    assert not [u for u in fetched if TWIN in u]
    # --no-recompute: the checkpoint is read by ranged reads of its tensors, never downloaded whole
    assert not list((tmp_path / "cache").rglob("*-final_model.pt"))
    tables = tmp_path / "d/tables"
    assert len(list((tables / "nodes").glob("*.parquet"))) == 2 and len(list((tables / "embeddings").glob("*.parquet"))) == 1


def test_env_selection_and_pattern(selection_store, fetched, tmp_path, monkeypatch):
    from pipeline.materialize import materialize_store

    _, url, _ = selection_store
    monkeypatch.setenv("CIRCUITS_MODELS", "tiny_t*")
    monkeypatch.setenv("CIRCUITS_KS", "8")
    s = materialize_store(
        store=url, data=str(tmp_path / "d"), cache=str(tmp_path / "c"), progress=False, recompute=False, tasks="bracket_counting"
    )
    assert not s.failed, s.failed
    assert s.runs == [f"{TWIN}/bracket_counting/prune_demo/8"] and s.models == [TWIN]
    assert {u for u in fetched if "/viz/" in u} == {f"{url}/viz/{TWIN}/bracket_counting/prune_demo/8/viz_data.pt"}


def test_dagster_ui_partitions_follow_the_resource_selection(selection_store, fetched, tmp_path):
    """In the UI the selection is the `circuits` resource's config (launchpad) or CIRCUITS_* env:
    `store_index` registers only the selected circuits and models as partitions."""
    _, url, _ = selection_store
    resource = CircuitsResource(
        store_url=url, data=str(tmp_path / "d"), cache=str(tmp_path / "c"), models=["tiny_sparse"], sweeps=["prune_b"]
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([store_index], resources={"circuits": resource}, instance=instance)
        assert result.success
        assert instance.get_dynamic_partitions("circuit_runs") == [
            f"tiny_sparse/single_double_quote/prune_b/{k}" for k in ("8", "k_optim")
        ]
        assert instance.get_dynamic_partitions("models") == ["tiny_sparse"]
    assert fetched == []  # listing only


def test_ls_lists_without_fetching(selection_store, fetched, tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    local, url, _ = selection_store
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "cache"))
    assert main(["ls", "--store", url]) == 0
    out = capsys.readouterr().out
    ckpt = (local / "models/tiny_sparse/final_model.pt").stat().st_size
    assert f"{ckpt / 1000:.1f} KB" in out  # the checkpoint's size, from the listing
    assert "models (2)" in out and "circuits (14," in out
    assert "prune_b" in out and "8,k_optim" in out
    assert main(["ls", "--store", url, "--model", TWIN, "--task", "var_swap", "--k", "8", "--runs"]) == 0
    out = capsys.readouterr().out
    assert "models (1)" in out and "circuits (1," in out and f"viz/{TWIN}/var_swap/prune_demo/8/viz_data.pt" in out
    viz = (local / f"viz/{TWIN}/var_swap/prune_demo/8/viz_data.pt").stat().st_size
    want = viz + sum(
        (local / f).stat().st_size
        for f in (
            "tinypython/encoder.json",
            "tinypython/vocab.bpe",
            f"models/{TWIN}/beeg_config.json",
            f"train_curves/{TWIN}/progress.json",
        )
    )
    from pipeline.listing import human

    assert f"({human(want)} with --no-recompute" in out
    assert main(["ls", "--store", url, "--model", "nope"]) == 1 and "nothing matches" in capsys.readouterr().out
    assert fetched == [] and not (tmp_path / "cache").exists()


def test_discovery_of_a_selection_on_azurite(selection_store, fetched):
    _, url, _ = selection_store
    store = Store(url)
    runs = discover_runs(store, Selection(tasks=("var_swap",)))
    assert [r.run_id for r in runs] == [f"{m}/var_swap/prune_demo/{k}" for m in ("tiny_sparse", TWIN) for k in ("8", "k_optim")]
    assert discover_models(store, Selection(tasks=("var_swap",)), runs) == ["tiny_sparse", TWIN]
    assert discover_models(store, Selection(models=(TWIN,))) == [TWIN]
