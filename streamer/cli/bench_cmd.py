"""`streamer bench`: throughput figures with their ratio to this machine's limits."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="measure throughput against machine limits and baselines")
    p.add_argument("--quick", action="store_true", help="smaller workloads (seconds, not minutes)")
    p.add_argument("--only", action="append", default=[], help="run only these benchmarks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from streamer.bench.runner import run_benchmarks

    return run_benchmarks(quick=args.quick, only=args.only, as_json=args.json)
