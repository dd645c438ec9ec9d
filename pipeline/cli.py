"""`circuits`: the one console script for headless work.

Each subcommand's work lives in its own module; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circuits", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-store", help="build the embedded demo store (tokenizer, models, circuits)")
    p.add_argument("--profile", choices=["tiny", "demo"], default="demo")
    p.add_argument("--out", default=None, help="store directory (default: $CIRCUITS_DATA/store)")
    p.add_argument("--force", action="store_true", help="replace a directory that holds a different store")

    p = sub.add_parser("materialize", help="run the pipeline's assets in-process (store -> Parquet + DuckDB)")
    p.add_argument("--store", default=None, help="store URL or path (default: $CIRCUITS_STORE or the embedded store)")
    p.add_argument("--data", default=None, help="output directory (default: $CIRCUITS_DATA or data/)")
    p.add_argument("--select", default=None, help="only runs whose id contains this text")
    p.add_argument("--device", default=None, help="torch device of the recompute forward passes (default: $CIRCUITS_DEVICE or cpu)")
    p.add_argument("--no-recompute", action="store_true", help="skip the recompute forward passes (ablations, recomputed activations)")
    p.add_argument("--verbose", action="store_true", help="show Dagster's own log lines")

    args = parser.parse_args(argv)
    if args.command == "build-store":
        from pipeline.demo.build import build_store_cli

        return build_store_cli(args)
    if args.command == "materialize":
        from pipeline.materialize import materialize_cli

        return materialize_cli(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
