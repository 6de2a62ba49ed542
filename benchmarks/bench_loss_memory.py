"""Loss-memory benchmark: DSKDv2's loss computed in token chunks against the same loss computed densely.

Shapes are those of Qwen1.5-1.8B (teacher) -> GPT-2 (student): d_t = 2048, V_t = 151,936, d_s = 768,
V_s = 50,257, with 2,048 valid tokens, float32, on the CPU. The heads, hidden states and maps are random;
the shared vocabulary is the first V_s ids (teacher id i < V_s is student id i), so the projector CE and
the agreement gate run on the teacher's top-1 as in a cross-vocabulary DSKDv2 step.

Both variants call `dskd.kit.dual_space.dual_space_terms` on the same inputs (same seed):
- `chunked`: as the objective runs it, `chunked_loss` over `--chunk-size` rows at a time;
- `dense`: the identical per-row function run by `dense_loss` over all rows at once (plain autograd), which
  materialises every (tokens x vocabulary) tensor of the loss at the same time: the baseline.

Loss memory = peak RSS during the loss's forward and backward minus the RSS held just before it started
(heads, hidden states, maps: allocated by `randn`, so their pages are resident). Each variant runs in a
fresh process so that one's peak cannot hide the other's: RSS before from `/proc/self/status` (VmRSS), peak
from `getrusage(RUSAGE_SELF).ru_maxrss`. Freed setup memory is returned to the OS (`malloc_trim`) before the
baseline is read, so the loss cannot reuse pages the baseline already counts. The variants run in
`--rounds` alternating rounds (chunked then dense, then dense then chunked, ...), one fresh process each, so
that a change of load on a shared machine does not favour one of them; the time of a variant is its best
forward+backward over all rounds, its loss memory the largest it reached. Each child saves its gradients
(student hidden rows, student head, t2s weight); the parent compares them: `max_grad_rel_diff = max over
tensors of max|g_chunked - g_dense| / max|g_dense|`.

Run: `python benchmarks/bench_loss_memory.py` (prints one JSON object; needs ~16 GB free for the dense
variant). `--variant dense|chunked --out DIR` runs one child.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_T, V_T, D_S, V_S, TOKENS = 2048, 151_936, 768, 50_257, 2048
TARGETS = {"memory_ratio": 0.25, "time_ratio": 1.3, "max_grad_rel_diff": 1e-5}


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline may then include some freed pages
        pass


def inputs(tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).mul_(scale)

    # Logits of unit scale: hidden states ~N(0, 1), head rows ~N(0, 1/d).
    return {
        "teacher_head": randn(V_T, D_T, scale=D_T**-0.5),
        "teacher_hidden": randn(tokens, D_T, scale=1.0),
        "student_head": randn(V_S, D_S, scale=D_S**-0.5).requires_grad_(True),
        "student_hidden": randn(tokens, D_S, scale=1.0).requires_grad_(True),
        "t2s": randn(D_S, D_T, scale=D_T**-0.5).requires_grad_(True),
        "s2t": randn(D_T, D_S, scale=D_S**-0.5),
        "labels": torch.randint(0, V_S, (tokens,), generator=gen),
    }


def loss_step(variant: str, t: dict[str, torch.Tensor], chunk_size: int, divergence, temperature: float) -> float:
    import dskd.kit.chunked
    from dskd.kit.dual_space import DualSpaceSpec, PairedRows, dual_space_terms
    from dskd.kit.lm_head import LMHead

    vocab_map = torch.arange(V_T)
    vocab_map[V_S:] = -1  # teacher ids beyond the student's vocabulary have no student token
    rows = PairedRows(t["student_hidden"], t["labels"], t["teacher_hidden"], None, None)
    original = dskd.kit.chunked.chunked_loss
    if variant == "dense":  # the same per-row function, through plain autograd over all rows at once
        dskd.kit.chunked.chunked_loss = lambda fn, r, shared, chunk_size: dskd.kit.chunked.dense_loss(fn, r, shared)
    try:
        loss, _, _ = dual_space_terms(
            DualSpaceSpec("teacher_top1", gate_student_kd=True),
            rows,
            student_head=LMHead(t["student_head"]),
            teacher_head=LMHead(t["teacher_head"]),
            t2s={"weight": t["t2s"]},
            s2t={"weight": t["s2t"]},
            vocab_map=vocab_map,
            divergence=divergence,
            temperature=temperature,
            kd_rate=0.5,
            denominator=float(rows.student_hidden.shape[0]),
            chunk_size=chunk_size,
        )
    finally:
        dskd.kit.chunked.chunked_loss = original
    loss.backward()
    return float(loss.detach())


def child(args: argparse.Namespace) -> None:
    from dskd.registry import load_registry

    divergence = load_registry().get("divergences", args.divergence)
    t = inputs(args.tokens)
    release_free_memory()
    before_kb = rss_kb()
    seconds, losses = [], []
    peak_kb = 0
    for i in range(args.repeats):
        for name in ("student_head", "student_hidden", "t2s"):
            t[name].grad = None
        release_free_memory()
        start = time.perf_counter()
        losses.append(loss_step(args.variant, t, args.chunk_size, divergence, args.temperature))
        seconds.append(time.perf_counter() - start)
        if i == 0:  # the first run's peak; later runs only add timings
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = {name: t[name].grad for name in ("student_hidden", "student_head", "t2s")}
    torch.save(grads, Path(args.out) / f"{args.variant}.pt")
    print(
        json.dumps(
            {
                "variant": args.variant,
                "baseline_mb": before_kb / 1024,
                "peak_rss_mb": peak_kb / 1024,
                "loss_mb": (peak_kb - before_kb) / 1024,
                "seconds": seconds,
                "loss": losses[0],
            }
        )
    )


def run_child(variant: str, out: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--out",
        out,
        "--tokens",
        str(args.tokens),
        "--chunk-size",
        str(args.chunk_size),
        "--repeats",
        str(args.repeats),
        "--divergence",
        args.divergence,
        "--temperature",
        str(args.temperature),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the {variant} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parent(args: argparse.Namespace) -> None:
    rounds: dict[str, list[dict]] = {"chunked": [], "dense": []}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.rounds):
            for variant in ("chunked", "dense") if i % 2 == 0 else ("dense", "chunked"):
                rounds[variant].append(run_child(variant, out, args))
        # Inputs are seeded, so every round's gradients are the same; the last round's files are compared.
        grads = {variant: torch.load(Path(out) / f"{variant}.pt") for variant in rounds}
    diffs = {}
    for name, dense in grads["dense"].items():
        diffs[name] = float((grads["chunked"][name] - dense).abs().max() / dense.abs().max())
    memory = {variant: max(r["loss_mb"] for r in results) for variant, results in rounds.items()}
    seconds = {variant: min(min(r["seconds"]) for r in results) for variant, results in rounds.items()}
    losses = {variant: results[0]["loss"] for variant, results in rounds.items()}
    report = {
        "benchmark": "loss_memory",
        "objective": "dskd_v2 terms (dskd.kit.dual_space.dual_space_terms), agreement-gated, teacher top-1 projector CE",
        "shapes": {"d_t": D_T, "V_t": V_T, "d_s": D_S, "V_s": V_S, "tokens": args.tokens, "shared_vocab": V_S},
        "dtype": "float32",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "divergence": args.divergence,
        "temperature": args.temperature,
        "chunk_size": args.chunk_size,
        "dense_peak_mb": round(memory["dense"], 1),
        "chunked_peak_mb": round(memory["chunked"], 1),
        "memory_ratio": round(memory["chunked"] / memory["dense"], 4),
        "dense_seconds": round(seconds["dense"], 2),
        "chunked_seconds": round(seconds["chunked"], 2),
        "time_ratio": round(seconds["chunked"] / seconds["dense"], 3),
        "max_grad_rel_diff": max(diffs.values()),
        "grad_rel_diff": diffs,
        "loss_rel_diff": abs(losses["chunked"] - losses["dense"]) / abs(losses["dense"]),
        "baseline_rss_mb": round(rounds["dense"][0]["baseline_mb"], 1),
        "rounds": {
            variant: [
                {"loss_mb": round(r["loss_mb"], 1), "seconds": [round(x, 2) for x in r["seconds"]]} for r in results
            ]
            for variant, results in rounds.items()
        },
        "targets": TARGETS,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    report["targets_met"] = {key: report[key] <= bound for key, bound in TARGETS.items()}
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("dense", "chunked"), help="run one variant (child process)")
    parser.add_argument("--out", help="folder for the child's gradients")
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per child process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, alternating")
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    if args.variant:
        if not args.out:
            parser.error("--variant needs --out")
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
