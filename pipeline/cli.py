"""`circuits`: the one console script for headless work.

Each subcommand's work lives in its own module; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from inference import settings as env_settings


def _whole_number(text: str) -> int:
    """argparse type: an integer >= 0 (`inference.settings.whole_number`)."""
    n = env_settings.whole_number(text)
    if n is None:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return n


def _errors_in_one_line(main):
    """The project's errors (ValueError / OSError subclasses naming the file and the problem) as
    one line on stderr and exit status 2, not a traceback; `CIRCUITS_TRACEBACK=1` shows it."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ValueError, OSError) as e:
            if env_settings.show_tracebacks():
                raise
            command = next(iter(argv if argv is not None else sys.argv[1:]), "")
            print(f"circuits {command}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2

    return wrapper


@_errors_in_one_line
def main(argv: list[str] | None = None) -> int:
    from pipeline.log_capture import restore_sigterm

    restore_sigterm()  # before any Dagster or Dask child is started (see pipeline.log_capture)
    parser = argparse.ArgumentParser(prog="circuits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-store", help="build the embedded demo store (tokenizer, models, circuits)")
    p.add_argument("--profile", choices=["tiny", "demo"], default="demo")
    p.add_argument("--out", default=None, help="store directory (default: $CIRCUITS_DATA/store)")
    p.add_argument("--force", action="store_true", help="replace a directory that holds a different store")
    p.add_argument("--redo", choices=["circuits"], default=None, help="rebuild this stage (e.g. the circuits on existing models)")

    p = sub.add_parser("store-report", help="the embedded store's models, task accuracy, k_optim and circuits as Markdown tables")
    p.add_argument("--store", default=None, help="store directory (default: $CIRCUITS_DATA/store)")

    p = sub.add_parser(
        "materialize", help="run the pipeline's assets (store -> Parquet + DuckDB), in-process or on a Dask cluster"
    )
    p.add_argument("--store", default=None, help="store URL or path (default: $CIRCUITS_STORE or the embedded store)")
    p.add_argument("--data", default=None, help="output directory (default: $CIRCUITS_DATA or data/)")
    _selection_flags(p)
    p.add_argument(
        "--device", default=None, help="torch device of the recompute forward passes (default: $CIRCUITS_DEVICE or cpu)"
    )
    p.add_argument(
        "--ablation-budget",
        type=_whole_number,
        default=None,
        metavar="N",
        help="node-tokens of ablation work per mode before the recompute ablates a sample of the task pairs "
        "(deltas then carry standard errors); 0: every pair (default: $CIRCUITS_ABLATION_BUDGET or 12000000)",
    )
    p.add_argument(
        "--no-recompute", action="store_true", help="skip the recompute forward passes (ablations, recomputed activations)"
    )
    p.add_argument("--verbose", action="store_true", help="show Dagster's own log lines")
    p.add_argument(
        "--executor",
        choices=["in_process", "dask"],
        default=None,
        help="where the model and run partitions execute (default: $CIRCUITS_EXECUTOR or in_process)",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="an existing Dask scheduler, e.g. tcp://host:8786 (default: $CIRCUITS_DASK_SCHEDULER, else a local cluster)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes of the local Dask cluster (default: $CIRCUITS_DASK_WORKERS or 2)",
    )

    p = sub.add_parser("ls", help="what the store holds (models, circuits, sizes), listed without fetching anything")
    p.add_argument("--store", default=None, help="store URL or path (default: $CIRCUITS_STORE or the embedded store)")
    _selection_flags(p)
    p.add_argument("--runs", action="store_true", help="also one line per circuit with its file size")

    p = sub.add_parser(
        "dev",
        help="`dagster dev` with Dagster's instance in the data's local dir (<dir>/.dagster, see CIRCUITS_DB_DIR) unless DAGSTER_HOME is set",
    )
    p.add_argument("dagster_args", nargs=argparse.REMAINDER, help="passed on to `dagster dev` (e.g. -p 3000)")

    args = parser.parse_args(argv)
    if args.command == "dev":
        return _dagster_dev(args.dagster_args)
    if args.command == "build-store":
        from pipeline.demo.build import build_store_cli

        return build_store_cli(args)
    if args.command == "store-report":
        from pipeline.demo.report import store_report_cli

        return store_report_cli(args)
    if args.command == "ls":
        from pipeline.listing import ls_cli

        return ls_cli(args)
    if args.command == "materialize":
        from pipeline.materialize import materialize_cli

        return materialize_cli(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _selection_flags(p: argparse.ArgumentParser) -> None:
    """--model / --task / --sweep / --k (repeatable, comma lists, shell patterns) and --select."""
    what = "repeatable or a comma list; shell patterns such as csp_sweep1_* work; default: $CIRCUITS_{} or all"
    p.add_argument("--model", action="append", default=None, metavar="NAME", help=f"only these models ({what.format('MODELS')})")
    p.add_argument("--task", action="append", default=None, metavar="NAME", help=f"only these tasks ({what.format('TASKS')})")
    p.add_argument("--sweep", action="append", default=None, metavar="NAME", help=f"only these sweeps ({what.format('SWEEPS')})")
    p.add_argument(
        "--k", action="append", default=None, metavar="K", help=f"only these node budgets, e.g. 64,k_optim ({what.format('KS')})"
    )
    p.add_argument("--select", default=None, help="only runs whose id <model>/<task>/<sweep>/<k> contains this text")


def _dagster_dev(extra: list[str]) -> int:
    """Run `dagster dev` from the project's definitions with the instance beside the data.

    `dagster dev` alone keeps run history in a temporary directory unless DAGSTER_HOME is set;
    this puts it where `circuits materialize` keeps it, so both see the same runs.
    """
    import subprocess

    from pipeline.settings import data_dir, local_dir

    env = dict(os.environ)
    if not env_settings.dagster_home():
        from pipeline.materialize import INSTANCE_DIR, pipeline_instance

        # the data's local dir: the data dir, or CIRCUITS_DB_DIR for object-store data (as materialize uses)
        data = data_dir() if "://" in data_dir() else os.path.abspath(data_dir())
        pipeline_instance(data).dispose()  # created (or repaired) atomically, as materialize does
        env["DAGSTER_HOME"] = os.path.join(local_dir(data), INSTANCE_DIR)
    os.makedirs(env["DAGSTER_HOME"], exist_ok=True)
    cmd = [sys.executable, "-m", "dagster", "dev", "-m", "pipeline.definitions", *extra]
    print(f"DAGSTER_HOME={env['DAGSTER_HOME']}", file=sys.stderr)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
