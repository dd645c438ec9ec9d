"""Scale-out: a store's circuits materialized in-process, then on a Dask cluster of 1 and of 2 workers.

    python bench/scale.py [--store DIR] [--select TEXT] [--no-recompute] [--workers 1 2]

Each Dask cluster is a `LocalCluster` (worker processes of one thread) started before the clock
runs, as an existing cluster would be; its start-up is printed apart. On each cluster the store is
materialized twice into fresh data dirs: "cold" (the workers import the project on their first
step, the driver spawns its orchestration processes) and "warm" (the same cluster again: what a
long-lived cluster gives every later materialize). Printed: seconds per mode, speed-up over
in-process and over 1 worker, and the per-partition overhead of running a partition as a Dagster
run on Dask, `(warm time on 1 worker - in-process time) / partitions` (one worker runs one step
at a time, as in-process does, so the difference is the overhead). Every mode's tables are
checked equal to the in-process ones (all columns but the recompute's wall-clock `seconds_*`). All modes run in this process, one after the other, so the
ratios compare like with like; on a shared machine the absolute seconds vary.

Default store: $CIRCUITS_TEST_STORE (the tiny store), else `data/store` (the embedded demo store).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tables(data: Path) -> dict:
    """Every table file's contents, without the timing columns (`recompute_summary.seconds_*`: wall clock)."""
    import pyarrow.parquet as pq

    out = {}
    for p in sorted((data / "tables").rglob("*.parquet")):
        t = pq.read_table(p)
        out[p.relative_to(data).as_posix()] = t.drop_columns([c for c in t.column_names if c.startswith("seconds_")])
    return out


def differences(got: dict, reference: dict) -> list[str]:
    diff = sorted(set(got) ^ set(reference))
    for k in sorted(set(got) & set(reference)):
        if not got[k].equals(reference[k]):
            cols = [c for c in reference[k].column_names if c not in got[k].column_names or not got[k][c].equals(reference[k][c])]
            diff.append(f"{k} ({', '.join(cols) or 'schema'})")
    return diff


def timed(label: str, work: Path, **kwargs) -> tuple[float, object]:
    from pipeline.materialize import materialize_store

    data = work / label.replace(" ", "_")
    start = time.perf_counter()
    s = materialize_store(data=str(data), progress=False, **kwargs)
    seconds = time.perf_counter() - start
    if s.failed:
        raise SystemExit(f"{label}: failed partitions {s.failed}")
    return seconds, s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=os.environ.get("CIRCUITS_TEST_STORE") or "data/store")
    p.add_argument("--select", default=None, help="only runs whose id contains this text")
    p.add_argument("--no-recompute", action="store_true", help="tables only (no recompute forward passes)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    from dask.distributed import Client, LocalCluster

    common = dict(store=args.store, select=args.select, recompute=not args.no_recompute)
    work = Path(tempfile.mkdtemp(prefix="circuits-scale-"))
    try:
        t_in, s = timed("in_process", work, executor="in_process", **common)
        reference = tables(work / "in_process")
        parts = len(s.runs) + len(s.models)
        print(f"store {args.store}: {len(s.runs)} circuits of {len(s.models)} models = {parts} partitions, "
              f"{'tables only' if args.no_recompute else 'tables + recompute'}; {os.cpu_count()} cores")  # fmt: skip
        print(f"in-process:           {t_in:6.1f} s  ({t_in / parts:.2f} s per partition)")
        results: dict[int, float] = {}
        for n in args.workers:
            start = time.perf_counter()
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
                with Client(cluster) as client:
                    client.wait_for_workers(n)
                startup = time.perf_counter() - start
                cold, _ = timed(f"dask {n} cold", work, executor="dask", scheduler=cluster.scheduler_address, **common)
                warm, _ = timed(f"dask {n} warm", work, executor="dask", scheduler=cluster.scheduler_address, **common)
            for label in (f"dask_{n}_cold", f"dask_{n}_warm"):
                diff = differences(tables(work / label), reference)
                if diff:
                    raise SystemExit(f"{label}: tables differ from the in-process ones: {'; '.join(diff)}")
            results[n] = warm
            print(f"dask, {n} worker{'s' if n > 1 else ' '}:      {warm:6.1f} s warm, {cold:6.1f} s cold (+{startup:.1f} s cluster start-up); "
                  f"warm speed-up over in-process {t_in / warm:.2f}x" + (f", over 1 worker {results[1] / warm:.2f}x" if 1 in results and n != 1 else ""))  # fmt: skip
        if 1 in results:
            print(f"per-partition overhead of a Dagster run on Dask (1 worker, warm): {(results[1] - t_in) / parts:+.2f} s "
                  f"({(results[1] - t_in) / t_in * 100:+.0f}% of the in-process time)")  # fmt: skip
        print("tables of every mode equal the in-process ones")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
