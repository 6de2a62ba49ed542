"""The `dskd teacher-store build|info|verify` subcommands (parsers here; `dskd.run.cli` dispatches to them)."""

from __future__ import annotations

import argparse
import json

from dskd.errors import StoreError
from dskd.store.build import BuildOptions
from dskd.store.layout import MODES


def add_parser(sub) -> None:
    store = sub.add_parser(
        "teacher-store", help="build a teacher store (teacher signals on disk), inspect or verify one"
    )
    store.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    actions = store.add_subparsers(dest="store_command", required=True)
    defaults = BuildOptions()
    build = actions.add_parser("build", help="run the job's teacher once over its data and store what students need")
    build.add_argument("config", help="the job's TOML file (teacher, data, lengths)")
    build.add_argument("--out", required=True, help="the store's folder (new, or a partial build to resume)")
    build.add_argument("--mode", default=defaults.mode, choices=sorted(MODES), help="hidden (default) or topk")
    build.add_argument(
        "--dtype", default="", help="hidden: bfloat16 (default), float32, int8; topk: float16 (default), bfloat16"
    )
    build.add_argument("--k", type=int, default=defaults.k, help="top-k entries per token (mode topk)")
    build.add_argument("--shard-samples", type=int, default=defaults.shard_samples, help="samples per shard")
    build.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per teacher forward")
    build.add_argument("--worker", type=int, default=0, help="this worker's number, 0..workers-1")
    build.add_argument("--workers", type=int, default=1, help="processes building the store together")
    build.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE")
    build.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    info = actions.add_parser("info", help="manifest, size, bytes per token and coverage of a store")
    info.add_argument("store")
    info.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    verify = actions.add_parser("verify", help="re-read every checksum of a store")
    verify.add_argument("store")
    verify.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def cmd_teacher_store(args: argparse.Namespace) -> int:
    if args.store_command == "build":
        return _build(args)
    if args.store_command == "info":
        from dskd.store.inspect import store_info

        print(json.dumps(store_info(args.store), indent=2))
        return 0
    from dskd.store.inspect import verify_store

    problems = verify_store(args.store)
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise StoreError(f"teacher store {args.store} is damaged: {listed}; rebuild it")
    print(f"{args.store}: every checksum matches")
    return 0


def _build(args: argparse.Namespace) -> int:
    from dskd.config import load_config
    from dskd.console import Console
    from dskd.registry import load_registry
    from dskd.store.build import build_store

    registry = load_registry()
    config = load_config(args.config, args.overrides, registry=registry)
    options = BuildOptions(
        mode=args.mode,
        dtype=args.dtype,
        k=args.k,
        shard_samples=args.shard_samples,
        batch_size=args.batch_size,
        worker=args.worker,
        workers=args.workers,
    )
    report = build_store(config, registry, args.out, options, console=Console())
    state = "finished" if report.finished else "waiting for the other workers' shards"
    print(
        f"{report.root}: {report.written} shards written, {report.skipped} already complete, "
        f"{report.shards_total} in all; store {state}"
    )
    return 0
