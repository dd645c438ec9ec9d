"""Tables materialized by the pipeline from the fixture store, checked against the viz_data files
read independently here (plain torch.load / pickle of the trusted fixtures)."""

import pickle
import subprocess
import sys
import textwrap

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_viz import FIXTURE_MODEL, FIXTURE_RUNS

FACTOR = 0.5


def _raw(viz_store, run_id):
    path = viz_store / "viz" / run_id / FIXTURE_RUNS[run_id]["file"]
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            return pickle.load(f)
    return torch.load(path, weights_only=False)


def _flat_pairs(pd):
    if pd and not isinstance(pd[0][0], (torch.Tensor, np.ndarray)):
        pd = [e for w in pd for e in w]
    return pd


def _table(data, name):
    return pq.read_table(data / "tables" / name).to_pandas()


@pytest.fixture(scope="module")
def db(circuits_data):
    con = duckdb.connect(str(circuits_data / "circuits.duckdb"), read_only=True)
    yield con
    con.close()


@pytest.mark.parametrize("run_id", list(FIXTURE_RUNS))
def test_run_tables_match_viz_data(viz_store, db, run_id):
    raw = _raw(viz_store, run_id)
    imp = raw["importances"]
    circuit = {loc: [int(c) for c in ch] for loc, ch in raw["circuit_data"].items()}
    n_nodes = sum(len(v) for v in circuit.values())

    run = db.execute("select * from runs where run_id = ?", [run_id]).df().iloc[0]
    assert run.n_nodes == n_nodes == FIXTURE_RUNS[run_id]["n_nodes"]
    assert run.loss_raw == pytest.approx(imp["loss"]) and run.loss == pytest.approx(imp["loss"] / 2)
    assert run.interv_loss == pytest.approx(imp["interv_loss"] / 2)
    assert run.num_total_nodes == raw["num_total_nodes"]

    nodes = db.execute("select * from nodes where run_id = ?", [run_id]).df().set_index("node_id")
    expected = {f"{loc}:{c}": (loc, c, i) for loc, chans in circuit.items() for i, c in enumerate(chans)}
    assert set(nodes.index) == set(expected)
    for nid, (loc, c, i) in expected.items():
        row = nodes.loc[nid]
        ch_loss = imp["ch_interv_losses"][loc][i]
        assert row.delta == pytest.approx((ch_loss - imp["interv_loss"]) / 2)
        assert row.ch_interv_loss_raw == pytest.approx(ch_loss)
        assert row.node_order == i
        if loc.split(".")[-1] in ("q", "k", "v"):
            assert (row["head"], row.head_channel) == (c // 4, c % 4)  # d_head = 4
        else:
            assert pd.isna(row["head"])
        half = ".".join(loc.split(".")[:2])
        assert row.layer_delta == pytest.approx((imp["layer_interv_losses"][half] - imp["interv_loss"]) / 2)
        assert row.layer_delta_released == pytest.approx(imp["layer_interv_losses"][half] - imp["interv_loss"] / 2)

    # edges: every nonzero entry of either measure, keyed by endpoints
    want = {}
    for slot, key in ((0, "pair_data"), (1, "pair_data_connections")):
        for m, src, tgt, (sl, tl) in _flat_pairs(imp[key]):
            m = np.asarray(m)
            for i, s in enumerate(src):
                for j, t in enumerate(tgt):
                    if m[i, j] != 0:
                        want.setdefault((f"{sl}:{s}", f"{tl}:{int(t)}"), [None, None])[slot] = float(m[i, j])
    edges = db.execute("select * from edges where run_id = ?", [run_id]).df()
    assert len(edges) == len(want)
    for e in edges.itertuples():
        strength, weight = want[(e.src_node_id, e.tgt_node_id)]
        assert e.strength == pytest.approx(strength) and e.weight == pytest.approx(weight)
        assert e.src_is_bias == e.src_node_id.endswith(":bias")

    docs = imp["task_samples"][0]
    lengths = [int((d != 0).nonzero().max()) + 1 for d in docs]
    td = db.execute("select * from task_docs where run_id = ? order by doc", [run_id]).df()
    assert td.length.tolist() == lengths
    assert [list(t) for t in td.token_ids] == [docs[i, : lengths[i]].tolist() for i in range(len(docs))]
    assert td["class"].tolist() == [1] * (len(docs) // 2) + [2] * (len(docs) // 2)

    acts = db.execute("select node_id, doc, pos, value from activations where run_id = ?", [run_id]).df()
    assert len(acts) == n_nodes * sum(lengths)
    loc, by_ch = next(iter(imp["task_samples"][1].items()))
    ch, stored = next(iter(by_ch.items()))
    got = acts[acts.node_id == f"{loc}:{int(ch)}"].sort_values(["doc", "pos"]).value.to_numpy()
    np.testing.assert_allclose(got, np.concatenate([stored[d, : lengths[d]].numpy() for d in range(len(docs))]), rtol=1e-6)

    n_tokens = n_snips = 0
    for by_ch in raw["samples"].values():
        for by_frac in by_ch.values():
            for bottom_top in by_frac.values():
                for items in bottom_top:
                    n_snips += len(items)
                    n_tokens += sum(len(t) for t, _, _ in items)
    samples = db.execute("select count(*), sum(is_center::int) from samples where run_id = ?", [run_id]).fetchone()
    assert samples == (n_tokens, n_snips)

    la = db.execute("select layer_half, delta, delta_released from layer_ablations where run_id = ?", [run_id]).fetchall()
    assert {k for k, _, _ in la} == set(imp["layer_interv_losses"])
    for k, delta, released in la:  # `delta` corrected in every table; `delta_released` the release's reading
        assert delta == pytest.approx((imp["layer_interv_losses"][k] - imp["interv_loss"]) * FACTOR)
        assert released == pytest.approx(imp["layer_interv_losses"][k] - imp["interv_loss"] * FACTOR)

    curve = db.execute("select step, x, loss from pruning_curve where run_id = ? order by step", [run_id]).fetchall()
    assert curve == [(s, (s + 1) * 8, pytest.approx(v / 2)) for s, v in raw["all_loss"]]

    lak = db.execute("select * from loss_at_k where run_id = ?", [run_id]).df()
    assert len(lak) == 1
    lak = lak.iloc[0]
    assert (lak.model, lak.task, lak.k_label, lak.n_nodes) == (run.model, run.task, run.k_label, n_nodes)
    assert lak.final_loss_raw == pytest.approx(raw["all_loss"][-1][1])
    assert lak.final_loss == pytest.approx(raw["all_loss"][-1][1] / 2)
    assert lak.interv_loss == pytest.approx(imp["interv_loss"] / 2)
    assert lak.unpruned_loss == pytest.approx(imp["loss"] / 2)


@pytest.mark.parametrize("run_id", list(FIXTURE_RUNS))
def test_recompute_matches_stored_and_names_the_model(db, viz_store, run_id):
    imp = _raw(viz_store, run_id)["importances"]
    s = db.execute("select * from recompute_summary where run_id = ?", [run_id]).df().iloc[0]
    assert s.recomputed_loss == pytest.approx(imp["loss"] / 2, rel=1e-4)
    assert s.recomputed_interv_loss == pytest.approx(imp["interv_loss"] / 2, rel=1e-4)
    assert s.stored_acts_match == FIXTURE_RUNS[run_id]["stored_acts"]
    assert s.means_source == "samples"
    ab = db.execute(
        "select mode, count(*), bool_and(agrees), max(abs_diff) from ablations where run_id = ? group by mode order by mode",
        [run_id],
    ).fetchall()
    n = FIXTURE_RUNS[run_id]["n_nodes"]
    assert ab[0][:3] == ("mean", n, True) and ab[1][:3] == ("zero", n, None)
    ra = db.execute(
        "select max(abs(stored - full_model)), max(abs(stored - circuit_model)) from recomputed_activations where run_id = ?",
        [run_id],
    ).fetchone()
    matching = ra[0] if FIXTURE_RUNS[run_id]["stored_acts"] == "full" else ra[1]
    assert matching < 1e-4 < max(ra)


def test_model_tables(db, viz_store):
    sd = torch.load(viz_store / "models" / FIXTURE_MODEL / "final_model.pt", weights_only=True)
    for m in ("wte", "wpe"):
        w = sd[f"transformer.{m}.weight"]
        n, total = db.execute(
            "select count(*), sum(value) from embeddings where model = ? and matrix = ?", [FIXTURE_MODEL, m]
        ).fetchone()
        assert n == int((w != 0).sum()) and total == pytest.approx(float(w.sum()), rel=1e-4)
    assert db.execute("select count(*), sum(is_special::int) from vocab").fetchone() == (2048, 1)
    assert db.execute("select text from vocab where token_id = 2047").fetchone()[0] == "<|endoftext|>"
    curves = db.execute("select metric, count(*) from train_curves group by metric order by metric").fetchall()
    assert curves == [("L0", 6), ("test_xent", 6)]  # the non-numeric "note" is skipped


def test_files_are_sorted_zstd_and_one_per_partition(circuits_data):
    files = sorted((circuits_data / "tables" / "activations").iterdir())
    assert [f.name for f in files] == sorted(r.replace("/", "__") + ".parquet" for r in FIXTURE_RUNS)
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        t = pq.read_table(f).to_pandas()
        keys = list(zip(t.location, t.channel, t.doc, t.pos, strict=True))
        assert keys == sorted(keys)


def test_duckdb_views_answer_from_another_cwd_while_a_writer_runs(circuits_data, tmp_path):
    """A reader process in another directory queries the views in a loop while this process
    rewrites partitions and rebuilds circuits.duckdb; it never errors and always sees whole tables."""
    from pipeline.assets.duckdb_views import build_duckdb
    from pipeline.tables import read_partition, write_partition

    data = str(circuits_data)
    db_path = circuits_data / "circuits.duckdb"
    reader = textwrap.dedent(f"""
        import duckdb, time, sys
        counts = set()
        end = time.time() + 4
        while time.time() < end:
            con = duckdb.connect({str(db_path)!r}, read_only=True)
            counts.add(con.execute("select count(*) from activations").fetchone()[0])
            con.close()
        print(sorted(counts))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", reader], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run_id = next(iter(FIXTURE_RUNS))
    table = read_partition(data, "activations", run_id)
    for _ in range(5):
        write_partition(data, "activations", run_id, table)
        build_duckdb(data)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    total = duckdb.connect(str(db_path), read_only=True).execute("select count(*) from activations").fetchone()[0]
    assert out.strip() == f"[{total}]"
    assert not [p for p in circuits_data.rglob("*.tmp")]


def test_docs_queries_run(db):
    """Every SQL block of docs/tables.md runs against the fixture database and returns rows."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "tables.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", text, re.S)
    assert len(queries) >= 5
    big, small = "fixture_a/quotes/prune_v4/k_optim", "fixture_a/quotes/prune_v4/4"
    target = db.execute("select tgt_node_id from edges where run_id = ? limit 1", [big]).fetchone()[0]
    subs = {
        "csp_yolo1/single_double_quote/prune_v4/k_optim": big,
        "csp_yolo1/single_double_quote/prune_v4/64": small,
        "0.mlp.post_act:12": target,
        "'csp_yolo1'": "'fixture_a'",
        "'single_double_quote'": "'quotes'",
    }
    for q in queries:
        for a, b in subs.items():
            q = q.replace(a, b)
        assert db.execute(q).fetchall(), q
