"""The `panel serve` command of the viewer, in one place: README and docs/viewer.md show it, the browser
test and `bench/viewer_browser.py` start it (`start`).

    panel serve viewer/app.py --address 127.0.0.1 --port 5006 --warm --reuse-sessions warm

`--warm` runs the app once when the server starts (imports, the runs table, the first layout in the
shared caches), so the first visitor does not pay for them. `--reuse-sessions warm` answers a new
visitor's page request at once with the page of a session already built (the page HTML holds only the
JavaScript bundle and empty root elements: our page has the same roots whatever the URL, so the HTML is
the same for every visitor) and starts building the visitor's own session, from the visitor's URL, while
the browser loads the JavaScript; the WebSocket then delivers it. Without it the page request waits for
the whole session build before the browser can start loading anything.

Several server processes (`multi_process_options`; docs/viewer.md "Serving"), for a machine whose cores
are idle when visitors arrive:

    panel serve viewer/app.py --address 127.0.0.1 --port 5006 --num-procs $(nproc) --setup viewer/warm.py --reuse-sessions

`--num-procs N` forks N server processes sharing the port, each with its own event loop; `--setup
viewer/warm.py` does in each forked process what `--warm` does in one (nothing is opened before the fork,
see viewer/warm.py). Plain `--reuse-sessions`, not `warm`: that starts the build on the page request, and the
WebSocket may reach another process, which then builds the session again. Not the default: on the 2
shared cores it was measured on (clients on the same cores) it was not faster (bench/README.md "Viewer:
several server processes").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SINGLE_PROCESS_OPTIONS = ["--warm", "--reuse-sessions", "warm"]


def cores() -> int:
    """The cores this process may run on (`nproc`)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def multi_process_options(n: int | None = None) -> list[str]:
    """Options for N server processes (default: one per core; N = 1 is one process without a fork; not 0,
    Bokeh's "one per core", for which Panel runs `--setup` before the fork: viewer/warm.py refuses it)."""
    return ["--num-procs", str(n or cores()), "--setup", "viewer/warm.py", "--reuse-sessions"]


OPTIONS = SINGLE_PROCESS_OPTIONS  # the README's command


def command(port: int = 5006, address: str = "127.0.0.1", options: list[str] | None = None) -> list[str]:
    """The server's argv, run from the project root (`python -m panel`, so it is this interpreter's Panel).
    `options`: instead of OPTIONS (the bench serves older checkouts with their own)."""
    return [
        sys.executable,
        "-m",
        "panel",
        "serve",
        "viewer/app.py",
        "--address",
        address,
        "--port",
        str(port),
        f"--allow-websocket-origin={address}:{port}",
        *(OPTIONS if options is None else options),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data: Path, port: int, log_path: Path, code: Path = ROOT, options: list[str] | None = None, timeout: float = 120):
    """Start `command(port)` in the checkout `code` on the tables in `data`; returns (process, log file) once the
    port accepts connections (the server answers HTTP before any session exists: this starts no session).
    The caller stops the process (`stop`)."""
    env = {**os.environ, "CIRCUITS_DATA": str(data), "PYTHONPATH": str(code)}
    log = open(log_path, "w")  # noqa: SIM115 (closed by `stop`)
    # A process group of its own: with `--num-procs N` the server forks, and `stop` must end the children too.
    proc = subprocess.Popen(
        command(port, options=options), cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return proc, log
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop(proc, log)
                raise RuntimeError(f"panel serve did not start: {Path(log_path).read_text()[-2000:]}") from None
            time.sleep(0.3)


def stop(proc, log, timeout: float = 30):
    """End the server started by `start`: its whole process group (`--num-procs N` forks children)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:  # whatever of the group is left (a forked child outliving the parent)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()
