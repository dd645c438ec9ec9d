"""Benchmark: convert a release-scale viz_data to tables (time and peak RSS) vs just reading it.

Generates `bench/synthetic.py`'s file (csp_yolo2 shapes, ~2000 nodes, 64 docs x 1024 tokens,
snippets for every node) unless given one, then runs, each in a fresh process so peak RSS is its own:

- baseline: `torch.load(weights_only=True)` of the file, touching every tensor (reading the file);
- convert:  `pipeline.formats.read_viz_data` + every run-level table written with the atomic
            Parquet writer (`pipeline.convert.run_tables` -> `pipeline.tables.write_partition`).

Prints seconds and peak RSS of each, and the ratios convert/baseline and peak RSS / file size
(target: peak RSS < 2x the file size; conversion time dominated by reading the file).

    python bench/convert.py [--file viz_data.pt] [--nodes 2000 --docs 64 --ctx 1024] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_baseline(path: str) -> dict:
    import torch

    from pipeline.formats import _numpy_allow_list

    rss0 = _rss_bytes()
    t = time.perf_counter()
    with torch.serialization.safe_globals(_numpy_allow_list()):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    n = 0

    def touch(x):
        nonlocal n
        if isinstance(x, torch.Tensor):
            n += int(x.numel() > 0 and x.view(-1)[0] == x.view(-1)[0])
        elif isinstance(x, dict):
            for v in x.values():
                touch(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                touch(v)

    touch(obj)
    return {"seconds": time.perf_counter() - t, "peak_rss": _peak_rss_bytes(), "rss_after_imports": rss0}


def run_convert(path: str, out: str) -> dict:
    from pipeline.convert import RunRef, run_tables
    from pipeline.formats import read_viz_data
    from pipeline.tables import write_partition

    rss0 = _rss_bytes()
    t = time.perf_counter()
    viz = read_viz_data(path)
    t_read = time.perf_counter() - t
    run = RunRef("csp_yolo2", "bench", "prune_v4", "2000", "viz/csp_yolo2/bench/prune_v4/2000/viz_data.pt")
    rows, per_table = {}, {}
    for name, parts in run_tables(viz, run, 0.5, lambda i: f"<{i}>").items():
        t0 = time.perf_counter()
        rows[name] = write_partition(out, name, run.run_id, parts)["rows"]
        per_table[name] = round(time.perf_counter() - t0, 2)
    return {
        "seconds": time.perf_counter() - t,
        "read_seconds": t_read,
        "peak_rss": _peak_rss_bytes(),
        "rss_after_imports": rss0,
        "rows": rows,
        "table_seconds": per_table,
    }


def _child(mode: str, path: str, out: str) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import convert as b; print(json.dumps(b.run_{mode}(*{[path] + ([out] if mode == 'convert' else [])!r})))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=None, help="an existing viz_data.pt (default: generate one)")
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the generated file and tables")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="circuits-bench-"))
    path = args.file
    if path is None:
        sys.path.insert(0, str(HERE))
        import torch
        from synthetic import synthetic_viz_data

        path = tmp / "viz_data.pt"
        t = time.perf_counter()
        torch.save(synthetic_viz_data(args.nodes, args.docs, args.ctx), path)
        print(f"generated {path} in {time.perf_counter() - t:.1f} s")
    size = path.stat().st_size
    print(f"file: {size / 1e6:.0f} MB")
    base = _child("baseline", str(path), "")
    conv = _child("convert", str(path), str(tmp / "data"))
    for label, r in (("baseline (read the file): ", base), ("convert (read + 9 tables):", conv)):
        grown = r["peak_rss"] - r["rss_after_imports"]
        print(
            f"{label} {r['seconds']:7.1f} s   peak RSS {r['peak_rss'] / 1e6:7.0f} MB ({grown / 1e6:.0f} MB above the RSS after imports)"
        )
    print(f"  convert: read + validate {conv['read_seconds']:.1f} s")
    print(f"  per table seconds: {conv['table_seconds']}")
    print(f"  rows: {conv['rows']}")
    print(f"ratio time convert/baseline: {conv['seconds'] / base['seconds']:.2f}")
    print(f"ratio peak RSS convert/baseline: {conv['peak_rss'] / base['peak_rss']:.2f}")
    print(
        f"ratio peak RSS convert/file size: {conv['peak_rss'] / size:.2f} total, "
        f"{(conv['peak_rss'] - conv['rss_after_imports']) / size:.2f} above imports   (target < 2)"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(tmp)
    else:
        print(f"kept {tmp}")


if __name__ == "__main__":
    main()
