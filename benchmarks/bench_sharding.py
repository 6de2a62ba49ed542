"""Sharding benchmark: the same student trained by 2 CPU processes (gloo) with DDP and with FSDP2, and LoRA
against full fine-tuning.

The student is Llama-shaped with untied embeddings (as Llama 2 / TinyLlama): vocabulary 32,000, hidden 256,
8 blocks, 22.7M parameters, of which the LM head is 36% (a 7B Llama's head is 2%, so this is a hard case for any
design that keeps the head whole). Every variant runs the same steps on the same data (2 sequences x 128 tokens
per process, AdamW, gradient clipping at 1.0), with the loss computed as the engine does: the student's last
hidden state put through the LM head read by `dskd.kit.lm_head.HeadView`, then a cross-entropy.

Variants (each process runs all of them, in alternating rounds so that load on a shared machine favours none):
- `ddp`: `torch.nn.parallel.DistributedDataParallel`, the baseline;
- `fsdp`: `dskd.run.sharding.shard_student` (dskd's design: the head sharded with the root, read whole between
  forward and backward);
- `fsdp_head_whole`: the alternative (blocks sharded, the head kept whole on every rank, its gradient averaged
  by one all-reduce as dskd does for projectors);
- `ddp_lora`: DDP of the student with LoRA adapters (r = 16 on q, k, v, o) through `dskd.models.lora.apply_lora`.

Figures (per rank; both ranks report, the larger is kept):
- `state_mb_per_rank`: bytes of parameters (frozen ones too) + gradients + AdamW state this rank holds at the end
  of a step, before the gradients are freed (local shards only for FSDP): what must fit on the device besides
  activations and FSDP's transient gathers (`fsdp_transient_root_mb`: the root's parameters, whole from forward
  to backward). `memory_ratio = fsdp / ddp`.
- `*_step_s`: median seconds per optimizer step (forward, backward, gradient reduction, clipping, update), over
  `--steps` timed steps per round after one warm-up step; `time_ratio = fsdp / ddp`.
- `max_grad_rel_diff`: the first step's gradients as reduced over the processes (before clipping), FSDP
  (gathered) vs DDP: max over parameters of `max|g_fsdp - g_ddp| / max|g_ddp|`. (Clipping is left out because
  the two paths compute the norm differently: torch's `clip_grad_norm_`, used under DDP, takes each gradient's norm
  in float32 with `vector_norm`, which on CPU is off by about 1e-3 relative for the 8M-element head gradient,
  while `dskd.run.sharding.clip_grad_norm` sums squares; `ddp_norm_rel_error` reports torch's error against a
  float64 reference.)
- `lora_trainable_fraction` and `lora_time_ratio = ddp_lora / ddp`.

Run: `python benchmarks/bench_sharding.py` (prints one JSON object and writes benchmarks/results/bench_sharding.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"memory_ratio": 0.6, "time_ratio": 1.5, "max_grad_rel_diff": 1e-5}
SHAPE = {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8}
VARIANTS = ("ddp", "fsdp", "fsdp_head_whole", "ddp_lora")


def make_student():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        **SHAPE, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False
    )
    return AutoModelForCausalLM.from_config(config)


def build(variant: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dskd.kit.lm_head import head_view
    from dskd.run.sharding import shard_student

    model = make_student()
    head = head_view(model, SHAPE["vocab_size"], verify=False)
    whole: list[torch.nn.Parameter] = []
    if variant == "ddp_lora":
        from dskd.models.lora import LoraSettings, apply_lora

        model = apply_lora(
            model, LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
        )
        head = head_view(model, SHAPE["vocab_size"], verify=False)
    if variant in ("ddp", "ddp_lora"):
        wrapped = DistributedDataParallel(model)
    else:
        wrapped = shard_student(model, bf16=False, keep_head_whole=variant == "fsdp_head_whole")
        whole = [p for p in model.parameters() if not _is_dtensor(p) and p.requires_grad]
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    assert dist.is_initialized()
    return wrapped, head, params, whole, optimizer


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def backward(model, head, whole, ids) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from dskd.kit.lm_head import last_hidden_state

    hidden = last_hidden_state(model, ids)
    logits = head.logits(hidden[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    for p in whole:  # kept whole outside FSDP: averaged as dskd averages projectors
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def clip_and_update(params, optimizer, *, sharded: bool) -> None:
    from dskd.run.sharding import clip_grad_norm

    if sharded:
        clip_grad_norm(params, 1.0)
    else:  # what accelerate's clip_grad_norm_ runs under DDP
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def state_mb(params, optimizer) -> float:
    total = 0
    for p in params:
        total += _local(p).numel() * p.element_size()
        if p.grad is not None:
            total += _local(p.grad).numel() * p.grad.element_size()
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.numel() > 1:
                total += _local(value).numel() * value.element_size()
    return total / 2**20


def gathered_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if _is_dtensor(p.grad) else p.grad
            out[name.removeprefix("module.")] = g.detach().clone()
    return out


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, SHAPE["vocab_size"], (2, 128), generator=generator) for _ in range(args.steps + 1)]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    memory: dict[str, float] = {}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    trainable = {}
    order = list(VARIANTS)
    for round_index in range(args.rounds):
        for variant in order if round_index % 2 == 0 else reversed(order):
            model, head, params, whole, optimizer = build(variant)
            sharded = variant.startswith("fsdp")
            backward(model, head, whole, batches[0])
            if round_index == 0 and variant in ("ddp", "fsdp", "fsdp_head_whole"):
                grads[variant] = gathered_grads(model)  # as reduced over the processes, before clipping
            clip_and_update(params, optimizer, sharded=sharded)
            optimizer.zero_grad(set_to_none=True)
            for ids in batches[1:]:
                dist.barrier()
                start = time.perf_counter()
                backward(model, head, whole, ids)
                clip_and_update(params, optimizer, sharded=sharded)
                times[variant].append(time.perf_counter() - start)
                # Counted while the gradients are still held: weights (frozen ones too), gradients, AdamW moments.
                memory[variant] = state_mb(list(model.parameters()), optimizer)
                optimizer.zero_grad(set_to_none=True)
            if variant == "ddp_lora":
                every = sum(p.numel() for p in model.parameters())
                trainable["lora"] = sum(p.numel() for p in params) / every
            del model, head, params, whole, optimizer
    ddp = grads["ddp"]
    exact = float(torch.sqrt(sum(g.double().pow(2).sum() for g in ddp.values())))
    ours = float(torch.sqrt(sum(g.float().pow(2).sum() for g in ddp.values())))
    torch_norm = float(torch.nn.utils.get_total_norm(list(ddp.values())))
    diff = {}
    for variant in ("fsdp", "fsdp_head_whole"):
        diff[variant] = max(
            float((grads[variant][n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in grads["ddp"].items()
        )
    result = {
        "memory": memory,
        "step_s": {v: statistics.median(t) for v, t in times.items()},
        "max_grad_rel_diff": diff,
        "trainable": trainable,
        "norm_rel_error": {"torch": abs(torch_norm - exact) / exact, "dskd": abs(ours - exact) / exact},
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(worker, args=(2, port, args, out), nprocs=2, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    memory = {v: max(r["memory"][v] for r in ranks) for v in VARIANTS}
    step_s = {v: max(r["step_s"][v] for r in ranks) for v in VARIANTS}
    diff = {v: max(r["max_grad_rel_diff"][v] for r in ranks) for v in ("fsdp", "fsdp_head_whole")}
    student = make_student()
    blocks = {id(p) for layer in student.model.layers for p in layer.parameters()}
    root_mb = sum(p.numel() * p.element_size() for p in student.parameters() if id(p) not in blocks) / 2**20
    report = {
        "benchmark": "sharding",
        "student": {
            **SHAPE,
            "tie_word_embeddings": False,
            "parameters_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 2),
        },
        "processes": 2,
        "backend": "gloo (CPU)",
        "threads_per_process": args.threads,
        "batch_per_process": [2, 128],
        "state_mb_per_rank": {v: round(m, 1) for v, m in memory.items()},
        "memory_ratio": round(memory["fsdp"] / memory["ddp"], 3),
        "memory_ratio_head_whole": round(memory["fsdp_head_whole"] / memory["ddp"], 3),
        # Not in the state above: FSDP gathers each block for its forward and backward, and keeps the root's
        # parameters (embeddings, final norm, LM head) whole from the forward to the backward.
        "fsdp_transient_root_mb": round(root_mb, 1),
        "step_s": {v: round(s, 3) for v, s in step_s.items()},
        "time_ratio": round(step_s["fsdp"] / step_s["ddp"], 3),
        "time_ratio_head_whole": round(step_s["fsdp_head_whole"] / step_s["ddp"], 3),
        "max_grad_rel_diff": diff["fsdp"],
        "max_grad_rel_diff_head_whole": diff["fsdp_head_whole"],
        "grad_norm_rel_error": {k: max(r["norm_rel_error"][k] for r in ranks) for k in ("torch", "dskd")},
        "lora": {
            "r": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "trainable_fraction": round(ranks[0]["trainable"]["lora"], 5),
            "time_ratio_vs_full": round(step_s["ddp_lora"] / step_s["ddp"], 3),
            "state_ratio_vs_full": round(memory["ddp_lora"] / memory["ddp"], 3),
        },
        "steps_timed": args.steps * args.rounds,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "targets": TARGETS,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    report["targets_met"] = {key: report[key] <= bound for key, bound in TARGETS.items()}
    text = json.dumps(report)
    print(text)
    if not args.no_save:
        (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
        (ROOT / "benchmarks" / "results" / "bench_sharding.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
