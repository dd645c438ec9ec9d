"""SIGTERM at its default in every process that runs Dagster steps.

Dagster captures a step's stdout and stderr (for the UI's step logs) with a `tail -F` child process
(and a watcher process) that it stops with SIGTERM, waiting up to 30 s for each. A signal that is
*ignored* stays ignored across `exec`, so a process started with SIGTERM ignored (some job
wrappers and background launchers do that) hands it to its tails: every step then waits ~2 minutes
for children that never stop, and leaves them running. Measured: one tiny-store partition on a Dask
worker started that way took 383 s instead of ~20 s, and left 12 `tail` processes behind.

`restore_sigterm` puts an ignored SIGTERM back to its default (a handler someone installed is left
alone). It is called where our processes start: the `circuits` CLI, `materialize_store`, the
Definitions module (imported by every Dagster process of the code location) and, through
`SigtermAtDefault`, every Dask worker that runs our steps (dispositions can only be set from a
process's main thread; a worker's plugins are set up on its event loop, which runs there).
"""

from __future__ import annotations

import signal
import threading


def restore_sigterm() -> bool:
    """SIGTERM back to its default action if this process ignores it (main thread only); True if changed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        return False
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return True


def dask_worker_plugin():
    """A `WorkerPlugin` that calls `restore_sigterm` on each worker it is registered with."""
    from dask.distributed import WorkerPlugin

    class SigtermAtDefault(WorkerPlugin):
        name = "circuits-sigterm-at-default"  # registering again under the same name replaces, not adds

        def setup(self, worker) -> None:
            restore_sigterm()

    return SigtermAtDefault()
