"""The methods compared on a real pretrained teacher: SmolLM2-135M-Instruct (GGUF) on the Python documentation.

Every run distils the same teacher into a random-init student of the SmolLM2 example's shape (4 layers, d=128,
tied embeddings) for the same steps, batch size, seeds and training texts (`examples/smollm2/data`, split by
topic), with the example job's settings; only the method changes, nothing is tuned per method:

- same tokenizer as the teacher (the student uses SmolLM2's 49,152-token vocabulary): `sft` (CE only), `kd`,
  `dskd_v2`;
- GPT-2's tokenizer (50,257 tokens, different merges and specials): `dskd_v2_eta` (DSKDv2 + Exact Token
  Alignment), `mined_kd`, `uld`, `dskd_cma`.

Measured on held-out topics, for the final student of each run:
- `ppl_per_byte`: perplexity per UTF-8 byte of the whole text of the test topics (fair across tokenizers);
- `teacher_agreement` (%) and `teacher_kl` (nats) on the aligned tokens of the valid topics' records (the eval
  stage's measures: the same aligner, eta, for every cross-tokenizer method, so the numbers mean the same thing);
- `rougeL` of greedy answers to the test records' prompts (a few, `eval.max_samples`).

The teacher is computed once: one in-process SmolLM2 serves every run, and it remembers the last hidden states of
each distinct token sequence it has scored (all signals — hidden states, top-k, logits — are derived from them
through its LM head), so a training text is run through the 135M teacher once for all methods and seeds.

    python benchmarks/reproduce_smollm2.py            # 3 seeds
    python benchmarks/reproduce_smollm2.py --quick    # 1 seed, fewer steps

Prints one JSON object (each metric {"mean", "std", "per_seed"}, the teacher's own figures, the load average)
and writes it to benchmarks/results/reproduce_smollm2[_quick].json; the table goes to stderr.
"""

from __future__ import annotations

import os

# Teacher and students run one after another in this process, often beside other work on a small machine: OpenMP
# threads that spin while they wait burn the cores the other threads need (on this project's shared 2-core
# machine a passive wait made the teacher several times faster). Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "smollm2"

import dskd.evaluation.stage as eval_stage  # noqa: E402
import dskd.run.job as job_module  # noqa: E402
from dskd.config import TeacherConfig, load_config  # noqa: E402
from dskd.console import Console  # noqa: E402
from dskd.evaluation.perplexity import per_byte_perplexity  # noqa: E402
from dskd.evaluation.stage import evaluate_stage  # noqa: E402
from dskd.models.loading import checkpoint_source, load_model, load_tokenizer  # noqa: E402
from dskd.models.teacher import LocalTeacher, compute_signal  # noqa: E402
from dskd.registry import load_registry  # noqa: E402
from dskd.run.job import Job  # noqa: E402


def smollm2_gguf() -> Path:
    """The installed SmolLM2 GGUF file, found as examples/smollm2/run.py finds it."""
    spec = importlib.util.spec_from_file_location("smollm2_example_run", EXAMPLE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.smollm2_gguf()


SAME, CROSS = "same_tokenizer", "gpt2_tokenizer"
METHODS: dict[str, tuple[str, list[str]]] = {
    "sft": (SAME, ["objective.name=sft", 'aligner.name=""']),
    "kd": (SAME, ["objective.name=kd", 'aligner.name=""']),
    "dskd_v2": (SAME, ["objective.name=dskd_v2", 'aligner.name=""']),
    "dskd_v2_eta": (CROSS, ["objective.name=dskd_v2", "aligner.name=eta"]),
    "mined_kd": (CROSS, ["objective.name=mined_kd", 'aligner.name=""']),
    "uld": (CROSS, ["objective.name=uld", 'aligner.name=""']),
    "dskd_cma": (CROSS, ["objective.name=dskd_cma", 'aligner.name=""']),
}
# Four sequences a step, not the example job's eight: on a 2-core CPU the DSKD methods' teacher-space term (the
# 49,152 x 576 teacher head over every label row, forward and backward) costs about 4 s a step at eight, which put
# 21 runs of 120 steps near two hours. Four halves each step's cost and keeps the number of updates; every method
# gets the same batch.
BATCH_SIZE = 4
METRICS = ("ppl_per_byte", "teacher_agreement", "teacher_kl", "rougeL")


class MemoTeacher(LocalTeacher):
    """A `LocalTeacher` that runs each distinct token sequence through the model once.

    The last hidden states of a sequence's valid positions are kept, keyed by its token ids; a batch runs only
    its unseen sequences through the model, and every signal is derived from the hidden states by the same code
    as `LocalTeacher` (`compute_signal`), so it is the teacher's signal, computed once."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.memo: dict[bytes, torch.Tensor] = {}
        self.forward_tokens = 0

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        mask = attention_mask.bool()
        keys = [input_ids[b][mask[b]].numpy().tobytes() for b in range(batch)]
        missing = sorted({b for b, key in enumerate(keys) if key not in self.memo})
        if missing:
            with torch.inference_mode():
                out = self.model(
                    input_ids=input_ids[missing], attention_mask=attention_mask[missing],
                    output_hidden_states=True, use_cache=False, logits_to_keep=1,
                ).hidden_states[-1]  # fmt: skip
            for i, b in enumerate(missing):
                self.memo[keys[b]] = out[i][mask[b]].clone()
            self.forward_tokens += int(mask[missing].sum())
        hidden = torch.zeros(batch, length, self.head.hidden_size)
        for b, key in enumerate(keys):
            hidden[b][mask[b]] = self.memo[key]
        return hidden

    def score(self, input_ids, attention_mask, rows, request):
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
        hidden = self._hidden(input_ids, attention_mask)
        # compute_signal takes a model; this one answers with the remembered hidden states.
        model = lambda **_: SimpleNamespace(hidden_states=[hidden])  # noqa: E731
        signal = compute_signal(model, self.head, input_ids, attention_mask, rows, request)
        signal.fingerprint = self.fingerprint
        # As LocalTeacher.score: compute_signal runs under inference_mode, and its tensors could not enter the
        # student's autograd graph (DSKD projects the teacher's hidden states); one clone makes them ordinary.
        for name in ("hidden_states", "topk_ids", "topk_logprobs", "tail_logmass", "logits"):
            value = getattr(signal, name)
            if value is not None:
                setattr(signal, name, value.clone())
        return signal

    def close(self) -> None:  # shared by every run; nothing to release between them
        pass


def student_configs(out: Path, teacher_dir: Path) -> dict[str, tuple[Path, Path]]:
    """(config folder, tokenizer folder) of the student for each tokenizer; the same shape for both."""
    base = json.loads((EXAMPLE / "student" / "config.json").read_text())
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    same = dict(base, vocab_size=teacher_config["vocab_size"], bos_token_id=teacher_config["bos_token_id"])
    same["eos_token_id"] = teacher_config["eos_token_id"]
    folder = out / "student-same-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(same, indent=1))
    return {SAME: (folder, teacher_dir), CROSS: (EXAMPLE / "student", REPO / "examples" / "tokenizers" / "gpt2")}


def run_method(registry, out: Path, method: str, seed: int, students, gguf: Path, args, console) -> dict:
    kind, extra = METHODS[method]
    config_dir, tokenizer_dir = students[kind]
    run = out / "runs" / f"{method}-seed{seed}"
    overrides = [
        f"run.output_dir={run}",
        'run.stages=["distill"]',
        f"run.seed={seed}",
        f"run.log_every={max(args.steps // 4, 1)}",
        f"teacher.model={gguf}",
        f"student.config={config_dir}",
        f"student.tokenizer={tokenizer_dir}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.warmup_steps={max(1, args.steps // 15)}",
        f"data.cache_dir={out / 'cache'}",
        f"eval.max_samples={args.eval_samples}",
        f"data.valid={args.valid}",
        *extra,
    ]
    job = Job(load_config(EXAMPLE / "job.toml", overrides, registry=registry), registry)
    job.console = console
    job.resume = run.exists()  # an interrupted reproduction continues where it stopped
    job.prepare_run_dir()
    final = run / "final"
    if not (final / "config.json").exists():
        final = job.distill(None)
    metrics = evaluate_stage(job, None, final, include=("student",))["student"]
    model = load_model(job.config.student, "student", path=str(final))
    tokenizer = load_tokenizer(job.config.student, "student")
    metrics["ppl_per_byte"] = per_byte_perplexity(model, tokenizer, args.texts)["perplexity_per_byte"]
    return {k: metrics[k] for k in METRICS}


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "per_seed": [round(v, 4) for v in values],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps and eval prompts")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "reproduce_smollm2")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--steps", type=int, default=0, help="override the steps per run")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"sequences per step (default {BATCH_SIZE}, every method)"
    )
    parser.add_argument(
        "--valid-records", type=int, default=-1, help="records of the valid topics for agreement (0: all)"
    )
    args = parser.parse_args()
    args.seeds = [0] if args.quick else [0, 1, 2]
    args.steps = args.steps or (30 if args.quick else 120)
    args.eval_samples = 8 if args.quick else 16
    if args.valid_records < 0:
        args.valid_records = 32 if args.quick else 0  # 0: every record of the valid topics
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"reproduce_smollm2: unknown methods {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    out = args.out / ("quick" if args.quick else "full")
    console = Console(stderr=True)
    registry = load_registry()
    started = time.perf_counter()
    load_before = os.getloadavg()

    gguf = smollm2_gguf()
    teacher_dir = Path(checkpoint_source(str(gguf), "", "teacher"))
    teacher_cfg = TeacherConfig(model=str(gguf), dtype="float32")
    teacher = MemoTeacher(load_model(teacher_cfg, "teacher"), load_tokenizer(teacher_cfg, "teacher"))
    # Every run's distill and eval stage gets this one teacher (and its memory of scored sequences).
    job_module.build_teacher = eval_stage.build_teacher = lambda *a, **k: teacher

    args.texts = [json.loads(x)["text"] for x in (EXAMPLE / "data" / "test_text.jsonl").read_text().splitlines()]
    teacher_ppl = per_byte_perplexity(teacher.model, teacher.tokenizer, args.texts)["perplexity_per_byte"]
    students = student_configs(out, teacher_dir)
    args.valid = EXAMPLE / "data" / "valid.jsonl"
    if args.valid_records:  # --quick: agreement on the first records of the valid topics only
        args.valid = out / "valid-subset.jsonl"
        lines = (EXAMPLE / "data" / "valid.jsonl").read_text(encoding="utf-8").splitlines()[: args.valid_records]
        args.valid.write_text("\n".join(lines) + "\n", encoding="utf-8")
    results = {m: {k: [] for k in METRICS} for m in methods}
    for seed in args.seeds:
        for method in methods:
            metrics = run_method(registry, out, method, seed, students, gguf, args, console)
            for key in METRICS:
                results[method][key].append(metrics[key])
    report = {
        "methods": {m: {k: summary(v) for k, v in results[m].items()} for m in methods},
        "tokenizer": {m: METHODS[m][0] for m in methods},
        "teacher": {"model": gguf.name, "ppl_per_byte": round(teacher_ppl, 4)},
        "seeds": args.seeds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_samples": args.eval_samples,
        "valid_records": args.valid_records or "all",
        "teacher_forward_tokens": teacher.forward_tokens,
        "quick": args.quick,
        "elapsed_s": round(time.perf_counter() - started, 1),
        # On a shared machine wall time measures the neighbours too; CPU seconds measure this run.
        "cpu_s": round(sum(getattr(resource.getrusage(resource.RUSAGE_SELF), f) for f in ("ru_utime", "ru_stime")), 1),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in load_before],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    cross = [m for m in ("mined_kd", "uld") if m in methods]
    if "dskd_v2_eta" in methods and cross:
        # The target: DSKDv2 + ETA against the other cross-tokenizer methods, per seed (same seeds).
        report["dskd_v2_eta_minus"] = {
            other: {
                key: summary([a - b for a, b in zip(results["dskd_v2_eta"][key], results[other][key])])
                for key in ("ppl_per_byte", "teacher_agreement", "teacher_kl")
            }
            for other in cross
        }
    rows = [
        [
            m,
            METHODS[m][0],
            *(f"{report['methods'][m][k]['mean']:.3f} ± {report['methods'][m][k]['std']:.3f}" for k in METRICS),
        ]
        for m in methods
    ]
    console.table(
        f"SmolLM2 reproduction ({len(args.seeds)} seed(s), {args.steps} steps; teacher ppl/byte {teacher_ppl:.3f})",
        ["method", "student tokenizer", "ppl/byte", "agreement %", "KL to teacher", "ROUGE-L"],
        rows,
    )
    # Only the documented configurations go to benchmarks/results; any other (--steps, --valid-records, a subset
    # of the methods) stays in its output folder.
    default = (
        args.steps == (30 if args.quick else 120)
        and args.valid_records == (32 if args.quick else 0)
        and args.batch_size == BATCH_SIZE
    )
    target = (
        REPO / "benchmarks" / "results" / ("reproduce_smollm2_quick.json" if args.quick else "reproduce_smollm2.json")
    )
    if not default or methods != list(METHODS):
        target = out / "results.json"
    target.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
