"""`panel serve viewer/app.py --num-procs N --setup viewer/warm.py --reuse-sessions`: `--warm`, in each process
(viewer/serve.py `multi_process_options`).

With `--num-procs N` (N > 1) Panel runs this script in every forked server process once its server has
started. It does there what `--warm` does in a single process: runs the app once (the imports, the runs
table and the first layout in this process's shared caches, this process's own DuckDB connection) and keeps
that session as the page that `--reuse-sessions` answers new visitors with. `--warm` itself is not used with
`--num-procs`: it runs before the fork, where on Python < 3.12 Panel builds an empty page instead of the
app's (no root element, every imported model's JavaScript: Tabulator's included) and on 3.12+ runs the app
in the parent, whose DuckDB connection and Polars thread pool the forked processes would inherit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import panel as pn
from bokeh.command.util import build_single_handler_applications
from panel.command.serve import Serve

APP = str(Path(__file__).with_name("app.py"))


def forks_after_setup(argv: list[str]) -> bool:
    """`--num-procs 0` (Bokeh: one process per core): Panel runs `--setup` in each process only for N > 1; for 0
    it runs it before the fork, and the forked processes inherit this script's DuckDB connection and Polars
    thread pool (measured: their sessions never loaded, the first Polars call after a fork hangs)."""
    args = " ".join(argv).replace("=", " ").split()
    return any(a == "--num-procs" and b == "0" for a, b in zip(args, args[1:], strict=False))


if forks_after_setup(sys.argv):
    sys.exit("viewer/warm.py: use --num-procs N, N the number of cores (`$(nproc)`), not 0: Panel runs --setup before forking")

# Panel's own `--warm` step (it does not use its `self`), on this process's copy of the app.
Serve.warm_applications(None, build_single_handler_applications([APP]), reuse_sessions=bool(pn.config.reuse_sessions))
print(f"viewer/warm.py: the app ran in server process {os.getpid()}", flush=True)  # in the server's log
