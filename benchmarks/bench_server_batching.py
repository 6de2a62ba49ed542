"""Teacher-server throughput with many clients: merged forwards (batching) against one forward per request.

Starts `servers/serve_teacher.py` twice on a tiny random Llama with the real TinyLlama tokenizer (once as
is, once with `--no-batching`), drives each with N concurrent `RemoteTeacher` clients (threads of this
process) sending small Score requests back to back, and prints one JSON object with tokens/s of both and
`batching_speedup`.

Batching pays for what a forward costs regardless of its size (Python, kernel launches, per-layer
overhead), so it matters for many small requests, the default here (one 16-token sequence per request,
a 4-layer teacher). On a CPU, a forward of a few hundred tokens is already bound by arithmetic, which grows
with the tokens however they are grouped, so larger requests gain less. Two request kinds are measured on
the same servers: hidden states alone (the default DSKD signal; `batching_speedup`), and hidden states plus
top-k, where the server also runs the LM head and a top-k over the whole vocabulary for every row
(`top_k_batching_speedup`).

    python benchmarks/bench_server_batching.py [--clients 8] [--requests 40] [--seq-len 16] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the same tiny-teacher and server helpers the tests use

from teacher_server_harness import save_tiny_teacher, start_servers  # noqa: E402

from dskd.servers.client import RemoteTeacher  # noqa: E402
from dskd.types import SignalRequest  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=40, help="timed requests per client")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per client first")
    p.add_argument("--sequences", type=int, default=1, help="sequences per request")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--top-k", type=int, default=8, help="k of the second, top-k request kind")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument(
        "--server-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads of the server (default: all cores)",
    )
    return p.parse_args()


def drive(address: str, args: argparse.Namespace, cache: Path, request: SignalRequest) -> dict:
    """`args.clients` clients in threads, each sending its requests back to back; tokens/s over all."""
    teachers = [RemoteTeacher(address, cache_dir=cache, self_check=False) for _ in range(args.clients)]
    shape = (args.sequences, args.seq_len)
    barrier = threading.Barrier(args.clients + 1)
    batch_sizes: list[int] = []
    errors: list[BaseException] = []

    def client(index: int) -> None:
        teacher = teachers[index]
        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(3, teacher.vocab_size, shape, generator=generator)
        mask = torch.ones_like(ids)
        rows = torch.arange(ids.numel())
        try:
            for _ in range(args.warmup):
                teacher.score(ids, mask, rows, request)
            barrier.wait()
            for _ in range(args.requests):
                signal = teacher.score(ids, mask, rows, request)
                batch_sizes.append(signal.timings["batch_requests"])
        except BaseException as error:  # reported after the run
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for teacher in teachers:
        teacher.close()
    if errors:
        raise errors[0]
    tokens = args.clients * args.requests * args.sequences * args.seq_len
    return {
        "tokens_per_s": tokens / elapsed,
        "seconds": elapsed,
        "mean_requests_per_forward": sum(batch_sizes) / len(batch_sizes),
    }


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dskd-bench-") as tmp:
        root = Path(tmp)
        model = save_tiny_teacher(root / "model", hidden_size=args.hidden_size, layers=args.layers)
        kinds = {
            "hidden": SignalRequest(hidden_states=True),
            "top_k": SignalRequest(hidden_states=True, top_k=args.top_k),
        }
        results = {}
        for mode, extra in (("batched", ()), ("unbatched", ("--no-batching",))):
            (server,) = start_servers([(model, extra, mode)], root, threads=args.server_threads)
            try:
                for kind, request in kinds.items():
                    results[mode, kind] = drive(server.address, args, root / "cache", request)
            finally:
                server.stop()
    report = {
        "benchmark": "server_batching",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "request": {"sequences": args.sequences, "seq_len": args.seq_len, "wire_dtype": "bfloat16"},
        "model": {
            "arch": "llama",
            "hidden_size": args.hidden_size,
            "layers": args.layers,
            "vocab": 32000,
            "dtype": "float32",
            "device": "cpu",
            "server_threads": args.server_threads,
        },
        "batched_tokens_per_s": round(results["batched", "hidden"]["tokens_per_s"], 1),
        "unbatched_tokens_per_s": round(results["unbatched", "hidden"]["tokens_per_s"], 1),
        "batching_speedup": round(
            results["batched", "hidden"]["tokens_per_s"] / results["unbatched", "hidden"]["tokens_per_s"], 2
        ),
        "mean_requests_per_forward": round(results["batched", "hidden"]["mean_requests_per_forward"], 2),
        "top_k": args.top_k,
        "top_k_batched_tokens_per_s": round(results["batched", "top_k"]["tokens_per_s"], 1),
        "top_k_unbatched_tokens_per_s": round(results["unbatched", "top_k"]["tokens_per_s"], 1),
        "top_k_batching_speedup": round(
            results["batched", "top_k"]["tokens_per_s"] / results["unbatched", "top_k"]["tokens_per_s"], 2
        ),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
