"""Run a command and poll its resident memory (the whole process tree) from /proc: peak RSS,
split into anonymous memory and mapped files (a memory-mapped checkpoint counts in RSS while
its pages are touched, but the kernel can drop them; anonymous memory is what the process holds).

    python bench/rss.py [--every 1] [--log FILE] -- circuits materialize --store DIR --data DIR/data

Prints one line per `--every` seconds to `--log` (default: stderr every 10th sample) and, at
the end, the peak of RSS, of RssAnon and of RssFile, with the elapsed time. Linux only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat's parent ids)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_kb(pid: int) -> dict[str, int]:
    """Sum over the process tree of VmRSS, RssAnon, RssFile (kB)."""
    tot = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in tot:
                        tot[key] += int(line.split()[1])
        except OSError:
            continue
    return tot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--log", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give a command after --")
    log = open(args.log, "w") if args.log else None  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    n = 0
    while proc.poll() is None:
        r = rss_kb(proc.pid)
        for k in peak:
            peak[k] = max(peak[k], r[k])
        line = f"{time.perf_counter() - t0:7.1f} s  RSS {r['VmRSS'] / 1e6:5.2f} GB  anon {r['RssAnon'] / 1e6:5.2f}  file {r['RssFile'] / 1e6:5.2f}"
        if log:
            print(line, file=log, flush=True)
        elif n % 10 == 0:
            print(line, file=sys.stderr, flush=True)
        n += 1
        time.sleep(args.every)
    dt = time.perf_counter() - t0
    print(f"rss.py: exit {proc.returncode} after {dt:.0f} s; peak RSS {peak['VmRSS'] / 1e6:.2f} GB "
          f"(peak anon {peak['RssAnon'] / 1e6:.2f} GB, peak mapped files {peak['RssFile'] / 1e6:.2f} GB)")  # fmt: skip
    if log:
        log.close()
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
