"""The `panel serve` command of the viewer, in one place: README and docs/viewer.md show it, the browser
test and `bench/viewer_browser.py` start it (`start`).

    panel serve viewer/app.py --address 127.0.0.1 --port 5006 --warm --reuse-sessions warm

`--warm` runs the app once when the server starts (imports, the runs table, the first layout in the
shared caches), so the first visitor does not pay for them. `--reuse-sessions warm` answers a new
visitor's page request at once with the page of a session already built (the page HTML holds only the
JavaScript bundle and an empty root: our page has one root whatever the URL, so the HTML is the same for
every visitor) and starts building the visitor's own session, from the visitor's URL, while the browser
loads the JavaScript; the WebSocket then delivers it. Without it the page request waits for the whole
session build before the browser can start loading anything.
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
OPTIONS = ["--warm", "--reuse-sessions", "warm"]


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
