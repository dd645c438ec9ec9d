"""Every SQL statement of the viewer: parameterized, read-only, cached.

Data access: the pipeline's `circuits.duckdb` (`settings.duckdb_path()`: one view per table over the
Parquet files, see notes/tables-contract.md), opened `read_only=True` by `pipeline.database.connect`,
which also registers the tables' object store when they are remote (`CIRCUITS_DATA=az://...`). One connection per
process is kept and reopened when the file's (mtime, size, inode) changes, because the
pipeline replaces the file by rename; each thread queries through its own cursor. Results are
memoized process-wide (`memo`), keyed by the database's version as well as the parameters, so a
rebuilt database is never answered from a stale cache. Results are Polars DataFrames (DuckDB ->
Arrow -> Polars), returned as the query gives them: the reshaping for the views is in models.py.

No SQL is ever assembled from user input: widget and URL values reach DuckDB only as `?`
parameters. The only formatted SQL fragments are the table names below (constants).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
import time

import duckdb
import polars as pl

from pipeline import settings
from pipeline.database import connect as connect_database
from pipeline.derived import SNIPPET_RADIUS, SNIPPETS_SHOWN

# The tables the viewer reads (names of `pipeline.tables.SCHEMAS`): the one list, also used by the tests' contract
# tables (tests/viewer_tables.py). Without a required one the app shows how to build the tables; an optional one
# missing or empty hides its panel.
REQUIRED_TABLES = ("runs", "nodes")
OPTIONAL_TABLES = (
    "edges",
    "task_docs",
    "activations",
    "samples",
    "snippets",
    "layer_ablations",
    "pruning_curve",
    "loss_at_k",
    "train_curves",
    "embeddings",
    "wte_extremes",
    "wte_histograms",
    "unembed_extremes",
    "vocab",
    "ablations",
    "faithfulness",
)
VIEWER_TABLES = REQUIRED_TABLES + OPTIONAL_TABLES


class TablesMissing(RuntimeError):
    """The tables are not there (yet): the app shows how to build them instead of a traceback."""


_lock = threading.Lock()
_conn: dict = {}  # path -> (version, connection)


def db_path() -> str:
    return settings.duckdb_path()


def _version(path):
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise TablesMissing(f"{path} does not exist") from err
    return (st.st_mtime_ns, st.st_size, st.st_ino)


RECHECK_SECONDS = 0.5  # the file's identity is re-read at most this often (views ask per query; a stat is ~1 ms under load)
_checked: dict = {}  # path -> (time of the last stat, version)


def connection():
    """(version, connection) for the current circuits.duckdb, reopening it when the file was replaced
    (noticed within RECHECK_SECONDS; until then the old file's consistent snapshot answers)."""
    path = db_path()
    now = time.monotonic()
    last = _checked.get(path)
    # The process id is part of the version: a forked process does not query through its parent's connection. That
    # is not enough to fork after a query (DuckDB and Polars do not survive a fork: a forked process hung on its first
    # query), so `panel serve --num-procs N` opens nothing before the fork (viewer/warm.py).
    pid = os.getpid()
    if last is None or now - last[0] >= RECHECK_SECONDS or last[1][1] != pid:
        _checked[path] = last = (now, (path, pid, *_version(path)))
    version = last[1]
    with _lock:
        cached = _conn.get(path)
        if cached is None or cached[0] != version:
            # The old connection is dropped, not closed: another thread may be running a query on one of its
            # cursors, and closing it then fails ("connection is busy with another call"). Each cursor keeps
            # the old database open until its thread moves to the new one (`_cursor`), then it is freed.
            try:
                # through pipeline.database: it registers the tables' object store when they are remote
                con = connect_database(path, read_only=True)
                # Footers parsed once, not per query. GLOBAL: cursors are connections of their own and do not
                # inherit a plain SET (without it every cursor query re-read the footers: ~2x per node query).
                con.execute("SET GLOBAL parquet_metadata_cache = true")
            except duckdb.Error as err:
                raise TablesMissing(f"{path} cannot be opened: {err}") from err
            _conn[path] = cached = (version, con)
    return cached


_local = threading.local()  # per thread: (version, cursor)


def _cursor():
    """This thread's cursor on the current database (DuckDB connections are not shared across threads).

    Kept for the thread's life rather than opened per query: a fresh cursor starts with cold catalog
    and file caches, ~2x the time of a node query."""
    version, con = connection()
    mine = getattr(_local, "cursor", None)
    if mine is None or mine[0] != version:
        with _lock:  # the shared connection refuses concurrent calls (cursor() included) instead of waiting
            _local.cursor = mine = (version, con.cursor())
    return mine[1]


def _run(version, sql, params):
    # DuckDB -> Arrow -> Polars (zero-copy for numeric columns).
    return _cursor().sql(sql, params=list(params)).pl()


def memo(maxsize: int):
    """Memoize a function of hashable arguments for the whole process (every session shares the results).

    functools.lru_cache rather than pn.cache: a hit costs a tuple hash (~0.2 us) instead of pn.cache's
    argument hashing (~150 us), and an interaction makes tens of lookups. `clear_caches()` empties them all."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _memos.append(cached)
        return cached

    return wrap


_memos: list = []


def clear_caches() -> None:
    for cached in _memos:
        cached.cache_clear()


@memo(2048)
def _cached(version, sql, params):
    return _run(version, sql, params)


def query(sql: str, params=()) -> pl.DataFrame:
    """One parameterized statement, memoized per database version. Returns a DataFrame the caller must not mutate."""
    version, _ = connection()
    return _cached(version, sql, tuple(params))


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=3, thread_name_prefix="circuits-query")


def prefetch(*calls) -> None:
    """Run independent queries concurrently (DuckDB releases the GIL) so that the following calls hit the cache.

    `calls` are (function, *args) tuples of this module's query functions.
    """
    # The first runs here (one thread hand-off fewer), the others in the pool meanwhile.
    futures = [_pool.submit(fn, *args) for fn, *args in calls[1:]]
    for call in calls[:1]:
        with contextlib.suppress(Exception):  # the real call repeats it and handles or raises the error
            call[0](*call[1:])
    for f in futures:
        with contextlib.suppress(Exception):
            f.result()


def optional(sql: str, params=()) -> pl.DataFrame | None:
    """Like `query`, but a missing or unreadable optional table gives None."""
    try:
        return query(sql, params)
    except duckdb.Error:
        return None


def tables() -> set[str]:
    df = query("SELECT table_name FROM information_schema.tables")
    return set(df["table_name"].to_list())


def check_tables() -> None:
    """Raise TablesMissing unless the required tables exist and hold at least one run."""
    have = tables()
    missing = [t for t in REQUIRED_TABLES if t not in have]
    if missing:
        raise TablesMissing(f"{db_path()} has no table(s) {', '.join(missing)}")
    try:
        n = query("SELECT count(*) AS n FROM runs")["n"][0]
    except duckdb.Error as err:
        raise TablesMissing(f"the runs table cannot be read: {err}") from err
    if n == 0:
        raise TablesMissing("the runs table is empty")


# --- runs -----------------------------------------------------------------------------------


def runs() -> pl.DataFrame:
    """All circuits, ordered model, task, sweep, then k numerically (labels like 'k_optim' last)."""
    return query("""
        SELECT * FROM runs
        ORDER BY model, task, sweep, TRY_CAST(k_label AS BIGINT) NULLS LAST, k_label""")


# --- layer-halves and nodes -----------------------------------------------------------------


def layer_halves(run_id: str) -> pl.DataFrame:
    """layer_half, layer, half, delta, delta_released, n_nodes of a run's layer-halves.

    `delta` is the corrected reading (layer_interv_losses and interv_loss both times the loss
    factor, like every other stored loss); `delta_released` is the released viewer's reading
    (only interv_loss halved), kept beside it because which one the release meant is unknown.
    Without layer_ablations the deltas are null and nodes are counted.
    """
    df = optional(
        """
        SELECT layer_half, layer, half, delta, delta_released, n_nodes
        FROM layer_ablations WHERE run_id = ? ORDER BY layer, half""",
        [run_id],
    )
    if df is None or df.is_empty():
        df = query(
            """
            SELECT layer || '.' || half AS layer_half, layer, half, NULL::DOUBLE AS delta,
                   NULL::DOUBLE AS delta_released, count(*) AS n_nodes
            FROM nodes WHERE run_id = ? AND half IN ('attn', 'mlp')  -- final_resid and "other": whole-circuit graph only
            GROUP BY layer, half ORDER BY layer, half""",
            [run_id],
        )
    return df


def nodes(run_id: str, layer_half: str | None = None) -> pl.DataFrame:
    """Circuit nodes of a run (or of one layer-half), in circuit_data order within each location."""
    if layer_half is None:
        # One row per node_id: a table holding a node twice (the pipeline refuses to write one, older or
        # hand-made tables may) would otherwise give lookups a frame instead of a row. The first row is kept.
        return query(
            """SELECT * FROM nodes WHERE run_id = ?
                        QUALIFY row_number() OVER (PARTITION BY node_id ORDER BY layer, half, location, node_order) = 1
                        ORDER BY layer, half, location, node_order""",
            [run_id],
        )
    version, _ = connection()
    return _layer_nodes(version, run_id, layer_half)


@memo(512)
def _layer_nodes(version, run_id, layer_half):
    """One layer-half's rows of the run's (cached) node table: no query per layer pick."""
    layer, _, half = layer_half.partition(".")
    return nodes(run_id).filter((pl.col("layer") == int(layer)) & (pl.col("half") == half))


def duplicate_nodes(run_id: str) -> int:
    """How many rows of the run's node table repeat a node_id (ignored by `nodes`; the page says so)."""
    return int(query("SELECT count(*) - count(DISTINCT node_id) AS n FROM nodes WHERE run_id = ?", [run_id])["n"][0])


def split_node_id(node_id: str) -> tuple[str, int | None]:
    """(location, channel) of a node id "<location>:<channel>"; channel None for a bias pseudo-node or a malformed id.

    Per-node queries filter on location and channel as well as node_id: the pipeline sorts the big
    tables by (run_id, location, channel, ...), so these filters let DuckDB skip row groups.
    """
    location, _, channel = node_id.rpartition(":")
    return location, int(channel) if channel.isdigit() else None


# --- edges ----------------------------------------------------------------------------------

EDGE_COLUMNS = "src_node_id, tgt_node_id, src_location, tgt_location, src_channel, tgt_channel, src_is_bias, strength, weight"


def edges(run_id: str, layer_half: str | None = None) -> pl.DataFrame | None:
    """Edges of a run, or those whose target lies in the layer-half (sources may be bias pseudo-nodes)."""
    if layer_half is None:
        return optional(f"SELECT {EDGE_COLUMNS} FROM edges WHERE run_id = ?", [run_id])
    return optional(
        f"SELECT {EDGE_COLUMNS} FROM edges WHERE run_id = ? AND starts_with(tgt_location, ?)", [run_id, layer_half + "."]
    )


def node_edges(run_id: str, node_id: str) -> pl.DataFrame | None:
    """Every edge into or out of a node, unordered (`models.connections` splits and sorts them).

    One query per node (the run's edges are one small file): no per-run index to build before the first click.
    Filters on (location, channel) integers rather than the id strings (~3x faster); sorted by the caller, not in SQL."""
    location, channel = split_node_id(node_id)
    if channel is None:  # a bias pseudo-node: a source only
        return optional(f"SELECT {EDGE_COLUMNS} FROM edges WHERE run_id = ? AND src_node_id = ?", [run_id, node_id])
    return optional(
        f"""SELECT {EDGE_COLUMNS} FROM edges WHERE run_id = ?
                        AND ((tgt_location = ? AND tgt_channel = ?) OR (src_location = ? AND src_channel = ?))""",
        [run_id, location, channel, location, channel],
    )


def residual_links(run_id: str) -> pl.DataFrame:
    """A residual write (resid_delta) linked to every later read of the same channel: an act_in of a
    later layer-half, or the final residual (final_resid, after every layer)."""
    return query(
        """
        SELECT DISTINCT w.node_id AS src_node_id, r.node_id AS tgt_node_id, w.channel
        FROM nodes w JOIN nodes r ON r.run_id = w.run_id AND r.channel = w.channel
        WHERE w.run_id = ? AND w.kind = 'resid_delta'
          AND ((r.kind = 'act_in' AND (r.layer > w.layer OR (r.layer = w.layer AND w.half = 'attn' AND r.half = 'mlp')))
               OR r.kind = 'final_resid')""",
        [run_id],
    )


# --- tokens ---------------------------------------------------------------------------------


def vocab_models() -> list[str]:
    """The models (or tokenizer names) the vocab table holds; [] without a vocab table."""
    df = optional("SELECT DISTINCT model FROM vocab")
    return [] if df is None else df["model"].to_list()


def vocab(vocab_model: str) -> pl.DataFrame | None:
    """token_id, text of one vocab partition."""
    return optional("SELECT token_id, text FROM vocab WHERE model = ? ORDER BY token_id", [vocab_model])


SNIPPET_COLUMNS = "frac, side, rank, pos, token_id, value, is_center"


def snippets(run_id: str, node_id: str) -> pl.DataFrame | None:
    """The snippet tokens shown for a node, unordered: the first five per (frac, side), 50 tokens either side
    of the token of interest (frac, side, rank, pos, token_id, value, is_center).

    Read from the pipeline's derived `snippets` table (pipeline/derived.py: already cut, small row groups);
    tables from before it existed fall back to cutting `samples` here.
    """
    location, channel = split_node_id(node_id)
    # (location, channel) identify the node; no string filter on node_id and no ORDER BY in SQL (each ~2x the query).
    df = optional(
        f"SELECT {SNIPPET_COLUMNS} FROM snippets WHERE run_id = ? AND location = ? AND channel = ?", [run_id, location, channel]
    )
    if df is None or (df.is_empty() and not _has_rows("snippets", run_id)):
        df = optional(
            f"""
            WITH s AS (SELECT * FROM samples WHERE run_id = ? AND location = ? AND channel = ? AND node_id = ? AND rank < ?),
            c AS (SELECT frac, side, rank, min(pos) AS centre FROM s WHERE is_center GROUP BY ALL)
            SELECT {", ".join("s." + c for c in SNIPPET_COLUMNS.split(", "))} FROM s JOIN c USING (frac, side, rank)
            WHERE abs(s.pos - c.centre) <= ? ORDER BY s.frac, s.side, s.rank, s.pos""",
            [run_id, location, channel, node_id, SNIPPETS_SHOWN, SNIPPET_RADIUS],
        )
    return df


def _has_rows(table: str, run_id: str) -> bool:
    df = optional(f"SELECT count(*) AS n FROM (SELECT 1 FROM {table} WHERE run_id = ? LIMIT 1)", [run_id])
    return df is not None and int(df["n"][0]) > 0


def task_docs(run_id: str) -> pl.DataFrame | None:
    return optional('SELECT doc, "class", pair, length, token_ids, tokens FROM task_docs WHERE run_id = ? ORDER BY doc', [run_id])


def activations(run_id: str, node_id: str) -> pl.DataFrame | None:
    """The node's stored activation at every (doc, pos) of the task docs (file order: by doc, pos)."""
    location, channel = split_node_id(node_id)
    return optional(
        "SELECT doc, pos, value FROM activations WHERE run_id = ? AND location = ? AND channel = ?", [run_id, location, channel]
    )


def head_qk(run_id: str, layer: int, head: int, doc: int) -> pl.DataFrame | None:
    """Stored activations of the circuit's q and k channels of one head on one task doc (kind, head_channel, pos, value)."""
    return optional(
        """
        SELECT n.kind, n.head_channel, a.pos, a.value
        FROM nodes n JOIN activations a ON a.run_id = n.run_id AND a.location = n.location AND a.channel = n.channel
        WHERE n.run_id = ? AND n.layer = ? AND n.half = 'attn' AND n.head = ? AND n.kind IN ('q', 'k')
          AND a.run_id = ? AND a.location IN (?, ?) AND a.doc = ?
        ORDER BY n.kind, n.head_channel, a.pos""",
        [run_id, layer, head, run_id, f"{layer}.attn.q", f"{layer}.attn.k", doc],
    )


# --- model-level ----------------------------------------------------------------------------


def wte_extremes(model: str, channel: int) -> pl.DataFrame | None:
    """The pipeline's top and bottom nonzero wte weights of a channel: side, rank, token_id, value."""
    return optional(
        """SELECT side, rank, token_id, value FROM wte_extremes WHERE model = ? AND channel = ?
                       ORDER BY side DESC, rank""",
        [model, channel],
    )


def unembed_extremes(model: str, channel: int) -> pl.DataFrame | None:
    """The pipeline's tokens whose logits residual channel `channel` raises (side 'top') and lowers
    ('bottom') most directly (lm_head x final-norm weight): side, rank, token_id, value."""
    return optional(
        """SELECT side, rank, token_id, value FROM unembed_extremes WHERE model = ? AND channel = ?
                       ORDER BY side DESC, rank""",
        [model, channel],
    )


def model_has_rows(table: str, model: str) -> bool:
    """Whether a model-level table holds rows for the model (the pipeline skips a table whose tensors
    the model's checkpoint lacks, e.g. `unembed_extremes` without `transformer.ln_f.weight`)."""
    assert table in OPTIONAL_TABLES  # a constant table name, never user input
    df = optional(f"SELECT count(*) AS n FROM (SELECT 1 FROM {table} WHERE model = ? LIMIT 1)", [model])
    return df is not None and int(df["n"][0]) > 0


def wte_histogram(model: str, channel: int) -> pl.DataFrame | None:
    """The pipeline's histogram of a wte channel's nonzero weights: bin, bin_left, bin_right, count (no rows: all zero)."""
    return optional(
        "SELECT bin, bin_left, bin_right, count FROM wte_histograms WHERE model = ? AND channel = ? ORDER BY bin",
        [model, channel],
    )


def embedding_matrix(model: str, matrix: str) -> pl.DataFrame | None:
    """All nonzero entries (row, channel, value) of wte or wpe."""
    return optional("SELECT row, channel, value FROM embeddings WHERE model = ? AND matrix = ?", [model, matrix])


def train_curves(model: str) -> pl.DataFrame | None:
    return optional("SELECT step, metric, value FROM train_curves WHERE model = ? ORDER BY metric, step", [model])


# --- run-level curves and checks ------------------------------------------------------------


def pruning_curve(run_id: str) -> pl.DataFrame | None:
    return optional("SELECT step, x, loss_raw, loss FROM pruning_curve WHERE run_id = ? ORDER BY step", [run_id])


def loss_at_k(model: str, task: str, sweep: str) -> pl.DataFrame | None:
    return optional(
        """SELECT k_label, run_id, n_nodes, final_loss, interv_loss, unpruned_loss FROM loss_at_k
                       WHERE model = ? AND task = ? AND sweep = ? ORDER BY n_nodes""",
        [model, task, sweep],
    )


def ablations(run_id: str, mode: str = "mean") -> pl.DataFrame | None:
    """Pipeline-recomputed ablation deltas beside the stored ones (None when the pipeline did not recompute).
    Tables written before deltas carried standard errors lack `recomputed_delta_se`: null there."""
    df = optional("SELECT * FROM ablations WHERE run_id = ? AND mode = ?", [run_id, mode])
    if df is None:
        return None
    if "recomputed_delta_se" not in df.columns:
        df = df.with_columns(recomputed_delta_se=pl.lit(None, dtype=pl.Float64))
    return df.select("node_id", "stored_delta", "recomputed_delta", "recomputed_delta_se", "abs_diff", "agrees")


def faithfulness(run_id: str) -> pl.DataFrame | None:
    """Faithfulness stress tests of a circuit (embedded demo store only), evaluation prompts first."""
    return optional(
        """SELECT prompt_set, ablation, variant, loss, loss_se, accuracy, n_prompts, flagged FROM faithfulness
           WHERE run_id = ? ORDER BY CASE prompt_set WHEN 'evaluation' THEN 0 WHEN 'selection' THEN 1 ELSE 2 END, variant, ablation""",
        [run_id],
    )


def compare(run_a: str, run_b: str) -> pl.DataFrame:
    """Nodes of two circuits side by side: node_id, location, delta_a, delta_b, status (shared / only A / only B)."""
    return query(
        """
        SELECT coalesce(a.node_id, b.node_id) AS node_id, coalesce(a.location, b.location) AS location,
               coalesce(a.layer, b.layer) AS layer, a.delta AS delta_a, b.delta AS delta_b,
               CASE WHEN a.node_id IS NULL THEN 'only B' WHEN b.node_id IS NULL THEN 'only A' ELSE 'shared' END AS status
        FROM (SELECT * FROM nodes WHERE run_id = ? QUALIFY row_number() OVER (PARTITION BY node_id ORDER BY node_order) = 1) a
        FULL OUTER JOIN (SELECT * FROM nodes WHERE run_id = ? QUALIFY row_number() OVER (PARTITION BY node_id ORDER BY node_order) = 1) b
        USING (node_id)
        ORDER BY layer, location, node_id""",
        [run_a, run_b],
    )
