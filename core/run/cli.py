"""The `dskd` command: run, validate, plugins, eval, report, doctor.

A `DskdError` (bad config, missing file, unusable model, unreachable teacher, ...) prints one line on stderr
and exits with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dskd.console import Console, error_line
from dskd.errors import ConfigError, DskdError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dskd", description="Dual-Space Knowledge Distillation for language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the job described by a TOML file")
    run.add_argument("config", help="path of the job's TOML file (e.g. dskd.toml)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest intact checkpoint in run.output_dir"
    )
    run.add_argument("--force-resume", action="store_true", help="resume even if the teacher or tokenizers changed")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    validate = sub.add_parser("validate", help="check a TOML file and list every problem")
    validate.add_argument("config")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE")
    validate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    plugins = sub.add_parser("plugins", help="list the loaded plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    evaluate = sub.add_parser("eval", help="evaluate a saved model on the job's evaluation split")
    evaluate.add_argument("--config", required=True, help="the job's TOML file (data, template, eval settings)")
    evaluate.add_argument("--model", required=True, help="a model folder saved in Hugging Face format")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE")
    evaluate.add_argument(
        "--teacher",
        dest="teachers",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a teacher model folder replacing the job's teacher NAME (a [[teachers]] name; a job with one teacher "
        "takes a bare DIR); repeatable. Top-1 agreement with and KL to each teacher of the job are reported, as "
        "teacher_agreement and teacher_kl (one teacher) or teacher_agreement/NAME and teacher_kl/NAME (several). "
        "Default for a teacher not named: its pretrained model or servers, else the copy the job's teacher_sft "
        "stage saved in run.output_dir; a teacher with none of these is skipped",
    )
    evaluate.add_argument("--output", help="write the metrics as JSON to this file")
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    report = sub.add_parser("report", help="plots and a summary of a finished run directory")
    report.add_argument("run_dir")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    doctor = sub.add_parser("doctor", help="check a teacher/student pair before training")
    doctor.add_argument("--teacher", required=True, help="teacher model or tokenizer folder")
    doctor.add_argument("--student", required=True, help="student model or tokenizer folder")
    doctor.add_argument("--data", help="a JSONL file to measure alignment on")
    doctor.add_argument(
        "--chat",
        action="store_true",
        help="also render one conversation (the first of --data, else a built-in one) with both chat templates",
    )
    doctor.add_argument("--teacher-template", default="", help="a .jinja chat template for the teacher")
    doctor.add_argument("--student-template", default="", help="a .jinja chat template for the student")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    from dskd.store.cli import add_parser as add_teacher_store  # teacher-store build|info|verify

    add_teacher_store(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from dskd.config import load_config
    from dskd.registry import load_registry
    from dskd.run.job import run_job
    from dskd.run.launch import requested_cpu_processes, spawn_processes

    _warn_unmatched_plugins()
    registry = load_registry()
    config = load_config(args.config, args.overrides, registry=registry)  # bad input is reported once, here
    count = requested_cpu_processes()
    if count > 1:  # `accelerate launch --cpu --num_processes N` started only this process: start the N
        return spawn_processes(count, sys.argv[1:])
    run_job(config, registry=registry, resume=args.resume, force_resume=args.force_resume)
    return 0


def _warn_unmatched_plugins() -> None:
    from dskd.registry import LOAD_ENV, unmatched_load_names

    for name in unmatched_load_names():
        print(
            f"warning: {LOAD_ENV} names {name!r}, which is no installed dskd plugin (entry point or package); "
            f"check the spelling or install it (`dskd plugins` lists what loads)",
            file=sys.stderr,
        )


def cmd_validate(args: argparse.Namespace) -> int:
    from dskd.config import load_config
    from dskd.registry import load_registry

    _warn_unmatched_plugins()
    try:
        load_config(args.config, args.overrides, registry=load_registry())
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(f"{args.config}: ok")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from dskd.registry import FAMILIES, load_registry

    registry = load_registry()
    if args.json:
        print(json.dumps(registry.describe(), indent=2))
        return 0
    console = Console()
    rows = []
    for plugin in registry.plugins:
        registered = "; ".join(f"{family}: {', '.join(names)}" for family, names in plugin.registered.items())
        rows.append([plugin.name, f"{plugin.package} {plugin.version}".strip(), registered])
    console.table("dskd plugins", ["plugin", "package", "registers"], rows)
    for family in FAMILIES:
        console.print(f"[bold]{family}[/bold]: {', '.join(sorted(registry.family(family))) or '-'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dskd.config import load_config
    from dskd.evaluation.stage import evaluate_saved_model, parse_teacher_dirs
    from dskd.registry import load_registry

    registry = load_registry()
    config = load_config(args.config, args.overrides, registry=registry)
    teacher_dirs = parse_teacher_dirs(args.teachers, config)
    metrics = evaluate_saved_model(config, args.model, teacher_dirs=teacher_dirs, registry=registry)
    text = json.dumps(metrics, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dskd.evaluation.report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from dskd.evaluation.doctor import run_doctor

    return run_doctor(
        args.teacher,
        args.student,
        data=args.data,
        as_json=args.json,
        chat=args.chat,
        templates=(args.teacher_template, args.student_template),
    )


def cmd_teacher_store(args: argparse.Namespace) -> int:
    from dskd.store.cli import cmd_teacher_store as run_store_command

    return run_store_command(args)


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "plugins": cmd_plugins,
    "eval": cmd_eval,
    "report": cmd_report,
    "doctor": cmd_doctor,
    "teacher-store": cmd_teacher_store,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dskd.run.threads import apply_thread_defaults  # local: torch threads are set before any command runs

    apply_thread_defaults()
    try:
        return COMMANDS[args.command](args)
    except DskdError as exc:
        if args.debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # data-parallel processes fail alike: one line, from rank 0
            error_line(str(exc))
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `dskd plugins --json | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        error_line("interrupted; the last intact checkpoint is kept (resume with --resume)")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
