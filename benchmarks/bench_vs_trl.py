"""dskd against TRL on the same heads, hidden states and batches: time, peak memory, loss agreement, threads.

TRL is a benchmark dependency only: `pip install -e ".[bench]"` (or `pip install "trl>=1.16"`). Its loss
functions are called directly (not its trainers), on the same tensors as dskd:

- **grid**: one forward+backward of the distillation loss from last hidden states, at batch B x T positions,
  over valid-token fractions and vocabularies. TRL GKD: both LM heads over all B x T positions (as its
  `compute_loss` gets them from the models), then `GKDTrainer.generalized_jsd_loss(..., labels, beta)`.
  dskd: the `kd` objective's `compute` (the valid rows gathered, the loss in chunks of `auto_chunk_rows`, the
  gold CE computed too, weighted 0 so that the loss equals GKD's) with divergence `generalized_jsd`
  (`beta`), or `forward_kl` at beta 0. Gradients flow into the student's hidden states and LM head, as in
  training. Each measurement runs in a fresh process: peak memory is `ru_maxrss` minus the RSS once the
  inputs exist (torch's CPU allocator keeps no statistics; tracemalloc does not see torch), time is that
  process's single step (the same first-call costs for both). Measurements alternate dskd/TRL per point.
- **agreement**: the same losses on the same small batches, several steps: max relative difference of the
  loss and of the student gradients. TRL GKD's trainer calls its loss without a temperature (it keeps 1.0,
  using `temperature` for sampling only) while dskd divides both logits by `objective.temperature`: the
  conventions agree at temperature 1 only, and the value at 2 is reported for what it is.
- **threads**: the dskd and TRL steps at 1 and 2 torch threads, on idle cores and with a busy-loop process
  pinned to the same cores, each in a fresh process; `OMP_WAIT_POLICY=PASSIVE` as a variant.

The machine may be shared: `os.getloadavg()` is recorded before and after each part. Prints one JSON object
and writes it to `benchmarks/results/vs_trl.json` (`--quick`: `vs_trl_quick.json`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"time_ratio_at_or_above_half_valid": 0.9, "time_ratio_below_half_valid": 0.5, "memory_ratio": 0.4}


def need_trl():
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:
        sys.exit('bench_vs_trl needs TRL, a benchmark-only dependency: pip install -e ".[bench]"')
    return GKDTrainer


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def make_inputs(vocab: int, hidden: int, batch: int, seq: int, fraction: float, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    # Logits of unit scale: hidden states ~N(0, 1), head rows ~N(0, 1/d). The teacher is the student's head
    # plus a perturbation, so the two distributions are close, as in distillation.
    w_s = torch.randn(vocab, hidden, generator=gen).mul_(hidden**-0.5)
    w_t = w_s + torch.randn(vocab, hidden, generator=gen).mul_(0.5 * hidden**-0.5)
    h_s = torch.randn(batch, seq, hidden, generator=gen)
    h_t = h_s + 0.5 * torch.randn(batch, seq, hidden, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) >= fraction] = -100
    return {"w_s": w_s.requires_grad_(True), "w_t": w_t, "h_s": h_s.requires_grad_(True), "h_t": h_t, "labels": labels}


def dskd_loss(t, beta: float, temperature: float = 1.0):
    """The `kd` objective's loss on these tensors, weighted like GKD's: sum of the divergence / valid tokens."""
    from dskd.kit import LMHead, ObjectiveContext, auto_chunk_rows
    from dskd.kit.weights import LossWeights, weighting
    from dskd.plugins.divergences.forward_kl import forward_kl
    from dskd.plugins.divergences.generalized_jsd import generalized_jsd
    from dskd.plugins.objectives.kd import KD

    vocab, hidden = t["w_s"].shape
    divergence = forward_kl if beta == 0 else functools.partial(generalized_jsd, beta=beta)
    context = ObjectiveContext(
        student=None,
        student_tokenizer=None,
        student_head=LMHead(t["w_s"]),
        teacher=SimpleNamespace(head=LMHead(t["w_t"])),
        divergence=divergence,
        divergence_name="forward_kl" if beta == 0 else "generalized_jsd",
        temperature=temperature,
        chunk_size=auto_chunk_rows((vocab,), (hidden,)),
    )
    objective = KD(context, "hidden", 0)
    # What the data loader computes on the host (Batch.index_rows) and the teacher returns for those rows.
    rows = (t["labels"].reshape(-1) != -100).nonzero().squeeze(1)
    batch = SimpleNamespace(student_rows=rows, student_labels=t["labels"])
    signal = SimpleNamespace(
        num_rows=int(rows.numel()), hidden_states=t["h_t"].reshape(-1, hidden).index_select(0, rows)
    )
    with weighting(LossWeights(ce=0.0, kd=1.0, denominator=max(int(rows.numel()), 1))) as weighing:
        terms = objective.compute(batch, t["h_s"], signal)
        return weighing.loss(terms)


def trl_loss(t, beta: float, temperature: float = 1.0):
    """TRL GKD: both heads over every position, then its loss (the trainer passes no temperature)."""
    import torch
    import torch.nn.functional as F

    gkd = need_trl()
    z_s = F.linear(t["h_s"], t["w_s"])
    with torch.no_grad():
        z_t = F.linear(t["h_t"], t["w_t"])
    return gkd.generalized_jsd_loss(z_s, z_t, labels=t["labels"], beta=beta, temperature=temperature)


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    need_trl()
    import dskd.plugins.objectives.kd  # noqa: F401  (imports before the baseline RSS is read)

    t = make_inputs(args.vocab, args.hidden, args.batch, args.seq, args.fraction)
    before = rss_kb()
    start = time.perf_counter()
    loss = (dskd_loss if args.child == "dskd" else trl_loss)(t, args.beta)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - before) / 1024, "loss": float(loss.detach())}))


def run_child(which: str, args, *, vocab, fraction, threads=0, env=None, busy=False) -> dict:
    command = [sys.executable, __file__, "--child", which, "--vocab", str(vocab), "--fraction", str(fraction)]
    command += ["--hidden", str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq)]
    command += ["--beta", str(args.beta), "--threads", str(threads)]
    competitor = None
    if busy:  # a busy loop pinned to the same cores, as another job on a shared machine
        code = "import os,time\nos.sched_setaffinity(0, {0, 1})\nwhile True: pass"
        competitor = subprocess.Popen([sys.executable, "-c", code])
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def trl_fits(vocab: int, args) -> bool:
    """TRL's dense loss holds about a dozen float32 (B*T, V) tensors at its peak; skip it where that cannot fit."""
    need_kb = 12 * args.batch * args.seq * vocab * 4 / 1024
    avail = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemAvailable" in line
    )
    return need_kb < 0.8 * avail


def grid(args) -> list[dict]:
    points = []
    for i, vocab in enumerate(args.vocabs):
        for j, fraction in enumerate(args.fractions):
            order = ("dskd", "trl") if (i + j) % 2 == 0 else ("trl", "dskd")
            result = {"vocab": vocab, "valid_fraction": fraction, "load_before": os.getloadavg()[0]}
            for which in order:
                if which == "trl" and not trl_fits(vocab, args):
                    result["trl"] = {"error": "skipped: TRL's dense loss would not fit in the available memory"}
                    continue
                result[which] = run_child(which, args, vocab=vocab, fraction=fraction, threads=args.grid_threads)
            d, t = result["dskd"], result["trl"]
            if "seconds" in d and "seconds" in t:
                result["time_ratio"] = round(d["seconds"] / t["seconds"], 3)
                result["memory_ratio"] = round(d["peak_mb"] / max(t["peak_mb"], 1e-9), 3)
                result["loss_rel_diff"] = abs(d["loss"] - t["loss"]) / abs(t["loss"])
                bound = TARGETS[
                    "time_ratio_at_or_above_half_valid" if fraction >= 0.5 else "time_ratio_below_half_valid"
                ]
                result["time_target"] = bound
                result["targets_met"] = (
                    result["time_ratio"] <= bound and result["memory_ratio"] <= TARGETS["memory_ratio"]
                )
            print(json.dumps(result), file=sys.stderr, flush=True)
            points.append(result)
    return points


def agreement(args) -> dict:
    import torch

    out = {}
    for beta in (0.0, 0.5):
        for temperature in (1.0, 2.0):
            loss_diff, grad_diff = 0.0, 0.0
            for step in range(args.agreement_steps):
                t = make_inputs(args.agreement_vocab, 64, 4, 64, 0.7, seed=100 + step)
                grads = []
                losses = []
                for fn in (dskd_loss, trl_loss):
                    for name in ("w_s", "h_s"):
                        t[name].grad = None
                    loss = fn(t, beta, temperature)
                    loss.backward()
                    losses.append(float(loss.detach()))
                    grads.append(torch.cat([t["w_s"].grad.reshape(-1), t["h_s"].grad.reshape(-1)]))
                loss_diff = max(loss_diff, abs(losses[0] - losses[1]) / abs(losses[1]))
                grad_diff = max(grad_diff, float((grads[0] - grads[1]).abs().max() / grads[1].abs().max()))
            out[f"beta={beta},temperature={temperature}"] = {"loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff}
    return out


def cross(args) -> dict:
    """Different tokenizers (student GPT-2, 50,257 tokens; teacher TinyLlama, 32,000), real texts (this project's
    docs, 4 responses of 600 characters: ULD sorts every row's vocabulary, minutes per step at 4k rows here) tokenised, aligned and collated by dskd's data pipeline, 1-layer
    random models at hidden sizes 576 / 768. From the same last hidden states: TRL GOLD's `ULDLoss` (positional
    ULD, `use_extended_uld=False`, distillation weight 1, CE weight 0) on both models' full logits, against
    dskd's `uld` (index aligner) and `dskd_v2` + `eta` objectives. In-process, alternating, best of `--repeats`."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dskd.config import DataConfig
    from dskd.data.batching import collate
    from dskd.data.examples import Example, tokenize_split
    from dskd.kit import ObjectiveContext, auto_chunk_rows, head_from_model, last_hidden_state
    from dskd.kit.weights import LossWeights, weighting
    from dskd.models.teacher import LocalTeacher
    from dskd.registry import load_registry

    need_trl()
    from trl.experimental.gold.gold_trainer import ULDLoss

    root = Path(__file__).resolve().parents[1]
    s_tok = AutoTokenizer.from_pretrained(root / "examples" / "tokenizers" / "gpt2")
    t_tok = AutoTokenizer.from_pretrained(root / "examples" / "tokenizers" / "tinyllama")
    text = (root / "docs" / "plugins.md").read_text()
    examples = [Example("Continue the text:\n", (text[i * 600 : (i + 1) * 600],)) for i in range(4)]
    torch.manual_seed(0)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=len(s_tok), n_embd=576, n_layer=1, n_head=8, n_positions=1024))
    teacher_model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(t_tok),
            hidden_size=768,
            intermediate_size=1536,
            num_hidden_layers=1,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        )
    )
    student.eval()  # no dropout: both sides see the same hidden states
    teacher = LocalTeacher(teacher_model, t_tok)
    registry = load_registry()
    uld_config = SimpleNamespace(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=False,
        uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=False,
        beta=1.0,
    )
    gold = ULDLoss(uld_config, student_tokenizer=s_tok, teacher_tokenizer=t_tok)
    out = {"shapes": {"student": "gpt2 vocab, d=576", "teacher": "tinyllama vocab, d=768", "samples": len(examples)}}
    for objective_name, aligner_name in (("uld", "index"), ("dskd_v2", "eta")):
        aligner = registry.get("aligners", aligner_name)(t_tok, s_tok)
        rows = tokenize_split(examples, s_tok, t_tok, DataConfig(max_length=1024), aligner=aligner, split="train")
        batch = collate(list(rows), student_pad_id=s_tok.eos_token_id, teacher_pad_id=t_tok.eos_token_id)
        head = head_from_model(student, len(s_tok), name="student")
        context = ObjectiveContext(
            student=student,
            student_tokenizer=s_tok,
            student_head=head,
            teacher=teacher,
            divergence=registry.get("divergences", "forward_kl"),
            divergence_name="forward_kl",
            temperature=1.0,
            chunk_size=auto_chunk_rows((len(s_tok), len(t_tok)), (576, 768)),
            aligner=aligner,
            same_vocab=False,
        )
        objective = registry.get("objectives", objective_name)(context)
        with torch.no_grad():
            h_s = last_hidden_state(student, batch.student_input_ids, batch.student_attention_mask)
            h_t = last_hidden_state(teacher.model, batch.teacher_input_ids, batch.teacher_attention_mask)
        signal = teacher.score(
            batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, objective.request
        )
        h_s = h_s.detach().requires_grad_(True)
        tokens = int(batch.student_rows.numel())

        def dskd_step(objective=objective, batch=batch, h_s=h_s, signal=signal, tokens=tokens):
            with weighting(LossWeights(ce=0.0, kd=1.0, denominator=tokens)) as weighing:
                loss = weighing.loss(objective.compute(batch, h_s, signal))
            loss.backward()

        def gold_step(batch=batch, h_s=h_s, h_t=h_t, head=head):
            z_s = F.linear(h_s, head.weight)
            with torch.no_grad():
                z_t = teacher.head.logits(h_t)
            loss = gold(
                z_s,
                z_t,
                batch.student_labels,
                batch.teacher_labels,
                batch.student_input_ids,
                batch.teacher_input_ids,
            )
            loss.backward()

        seconds = {"dskd": [], "trl": []}
        for i in range(args.repeats):
            for which, step in (
                (("dskd", dskd_step), ("trl", gold_step)) if i % 2 == 0 else (("trl", gold_step), ("dskd", dskd_step))
            ):
                h_s.grad = None
                head.weight.grad = None
                start = time.perf_counter()
                step()
                seconds[which].append(time.perf_counter() - start)
        best = {k: min(v) for k, v in seconds.items()}
        out[f"{objective_name}+{aligner_name}"] = {
            "student_tokens": tokens,
            "dskd_s": round(best["dskd"], 3),
            "trl_gold_uld_s": round(best["trl"], 3),
            "time_ratio": round(best["dskd"] / best["trl"], 3),
        }
        print(json.dumps({objective_name: out[f"{objective_name}+{aligner_name}"]}), file=sys.stderr, flush=True)
    return out


def threads(args) -> dict:
    rows = {}
    vocab, fraction = args.thread_vocab, 1.0
    # A smaller batch than the grid's (16 fresh processes per row): the ratios, not the seconds, are the result.
    args = argparse.Namespace(**{**vars(args), "batch": args.thread_batch, "seq": args.thread_seq})
    variants = [("default", {}), ("omp_passive", {"OMP_WAIT_POLICY": "PASSIVE"})]
    for name, env in variants:
        for which in ("dskd", "trl"):
            cell = {}
            for n in (1, 2):
                for busy in (False, True):
                    r = run_child(which, args, vocab=vocab, fraction=fraction, threads=n, env=env, busy=busy)
                    cell[f"{n}t_{'busy' if busy else 'idle'}_s"] = r.get("seconds", r.get("error"))
            if all(isinstance(v, float) for v in cell.values()):
                cell["busy_2t_over_idle_1t"] = round(cell["2t_busy_s"] / cell["1t_idle_s"], 2)
                cell["busy_2t_over_busy_1t"] = round(cell["2t_busy_s"] / cell["1t_busy_s"], 2)
            rows[f"{which}/{name}"] = cell
            print(json.dumps({f"{which}/{name}": cell}), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32k vocabulary, 3 fractions, batch 4 x 256")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 50257, 151936])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--hidden", type=int, default=576, help="student (and teacher) hidden size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.5, help="GKD's beta (0.5 is GKDConfig's default)")
    parser.add_argument("--grid-threads", type=int, default=1)
    parser.add_argument("--parts", nargs="+", default=["grid", "agreement", "cross", "threads"])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per side in the cross-tokenizer part")
    parser.add_argument("--agreement-steps", type=int, default=5)
    parser.add_argument("--agreement-vocab", type=int, default=32000)
    parser.add_argument("--thread-vocab", type=int, default=32000)
    parser.add_argument("--thread-batch", type=int, default=4)
    parser.add_argument("--thread-seq", type=int, default=256)
    parser.add_argument(
        "--out", help="file name under benchmarks/results/ (default vs_trl.json, --quick vs_trl_quick.json)"
    )
    parser.add_argument("--child", choices=("dskd", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    need_trl()
    if args.quick:
        args.vocabs, args.fractions, args.batch, args.seq = [32000], [0.1, 0.5, 1.0], 4, 256
        args.agreement_steps = 2
    import torch
    import trl

    report = {
        "benchmark": "vs_trl",
        "quick": args.quick,
        "trl": trl.__version__,
        "torch": torch.__version__,
        "shapes": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "vocabs": args.vocabs},
        "beta": args.beta,
        "grid_threads": args.grid_threads,
        "thread_shapes": {"batch": args.thread_batch, "seq": args.thread_seq, "vocab": args.thread_vocab},
        "loadavg_start": os.getloadavg(),
        "memory_measure": "ru_maxrss minus VmRSS after the inputs exist, one fresh process per measurement",
        "targets": TARGETS,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    if "grid" in args.parts:
        report["grid"] = grid(args)
        report["loadavg_after_grid"] = os.getloadavg()
    if "agreement" in args.parts:
        report["agreement"] = agreement(args)
    if "cross" in args.parts:
        report["cross_tokenizer"] = cross(args)
    if "threads" in args.parts:
        report["threads"] = threads(args)
        report["loadavg_after_threads"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (args.out or ("vs_trl_quick.json" if args.quick else "vs_trl.json"))
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
