"""Teacher-server load: many concurrent clients against one server, bounded in time; errors, latency, memory.

Starts `servers/serve_teacher.py` on a tiny random Llama with the real TinyLlama tokenizer and drives it with
`--clients` concurrent `RemoteTeacher` clients (threads of this process, one gRPC channel each), each sending
`--requests` Score requests back to back (hidden states and top-k, the DSKD signal). Every call has a
deadline, and the whole load phase stops at `--max-seconds`; requests not sent by then are reported as
`unsent`. The server's resident memory is sampled from /proc after a warm-up round (`server_rss_mb_start`),
throughout (`server_rss_mb_peak`) and at the end (`server_rss_mb_end`): a server that keeps something per
request grows with the 3200 requests, a healthy one stays flat. The baseline, measured first on the same
server, is one client alone (`single_client_p50_ms`).

Target: `errors` = 0 and memory flat (growth of a few MB at most).

    python benchmarks/bench_server_load.py [--clients 16] [--requests 200] [--max-seconds 600]
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the same tiny-teacher and server helpers the tests use

from teacher_server_harness import save_tiny_teacher, start_servers, stop_servers  # noqa: E402

from dskd.servers.client import RemoteTeacher  # noqa: E402
from dskd.types import SignalRequest  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--sequences", type=int, default=2, help="sequences per request")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--baseline-requests", type=int, default=50, help="requests of the single-client baseline")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, seconds")
    p.add_argument("--max-seconds", type=float, default=600.0, help="bound on the load phase, seconds")
    p.add_argument("--server-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the server")
    return p.parse_args()


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_batch(index: int, args: argparse.Namespace, vocab: int):
    generator = torch.Generator().manual_seed(index)
    ids = torch.randint(3, vocab, (args.sequences, args.seq_len), generator=generator)
    return ids, torch.ones_like(ids), torch.arange(ids.numel())


def percentile_ms(latencies: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(latencies) * 1000, q)), 2) if latencies else None


def main() -> None:
    args = parse_args()
    request = SignalRequest(hidden_states=True, top_k=args.top_k)
    with tempfile.TemporaryDirectory(prefix="dskd-bench-load-") as tmp:
        root = Path(tmp)
        model = save_tiny_teacher(root / "model", hidden_size=args.hidden_size, layers=args.layers)
        [server] = start_servers(
            [(model, ("--max-queue", str(4 * args.clients)), "load")], root, threads=args.server_threads
        )
        pid = server.process.pid
        try:
            cache = root / "cache"
            baseline_teacher = RemoteTeacher(server.address, cache_dir=cache, timeout_s=args.timeout)
            ids, mask, rows = make_batch(0, args, baseline_teacher.vocab_size)
            baseline = []
            for _ in range(args.baseline_requests):
                start = time.perf_counter()
                baseline_teacher.score(ids, mask, rows, request)
                baseline.append(time.perf_counter() - start)
            baseline_teacher.close()

            clients = [
                RemoteTeacher(server.address, cache_dir=cache, timeout_s=args.timeout, self_check=False)
                for _ in range(args.clients)
            ]
            latencies: list[list[float]] = [[] for _ in clients]
            failures: list[list[str]] = [[] for _ in clients]
            sent = [0] * args.clients
            warmed, go = threading.Barrier(args.clients + 1), threading.Event()
            deadline = [0.0]

            def client(index: int) -> None:
                teacher = clients[index]
                ids, mask, rows = make_batch(index + 1, args, teacher.vocab_size)
                try:
                    teacher.score(ids, mask, rows, request)  # warm-up: channel, health watch, server buffers
                except Exception as error:
                    failures[index].append(f"warm-up {type(error).__name__}: {error}"[:300])
                warmed.wait()
                go.wait()
                for _ in range(args.requests):
                    if time.monotonic() > deadline[0]:
                        return
                    sent[index] += 1
                    start = time.perf_counter()
                    try:
                        signal = teacher.score(ids, mask, rows, request)
                        if signal.hidden_states.shape != (rows.numel(), teacher.hidden_size):
                            raise RuntimeError(f"answer of shape {tuple(signal.hidden_states.shape)}")
                    except Exception as error:  # counted, and the client goes on: the server must keep serving
                        failures[index].append(f"{type(error).__name__}: {error}"[:300])
                        continue
                    latencies[index].append(time.perf_counter() - start)

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            warmed.wait()
            rss_start = rss_mb(pid)
            peak = [rss_start]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.25):
                    peak[0] = max(peak[0], rss_mb(pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            started = time.monotonic()
            deadline[0] = started + args.max_seconds
            go.set()
            for thread in threads:
                thread.join(args.max_seconds + args.timeout + 30)
            elapsed = time.monotonic() - started
            done.set()
            sampler.join()
            time.sleep(0.5)  # let the server release what the last requests held
            rss_end = rss_mb(pid)
            for teacher in clients:
                teacher.close()
        finally:
            exit_code = stop_servers([server])[0]

    all_latencies = [x for per_client in latencies for x in per_client]
    errors = [e for per_client in failures for e in per_client]
    requests = sum(sent)
    print(
        json.dumps(
            {
                "benchmark": "server_load",
                "clients": args.clients,
                "requests_per_client": args.requests,
                "requests": requests,
                "errors": len(errors),
                "unsent": args.clients * args.requests - requests,
                "p50_ms": percentile_ms(all_latencies, 50),
                "p99_ms": percentile_ms(all_latencies, 99),
                "max_ms": percentile_ms(all_latencies, 100),
                "requests_per_s": round(len(all_latencies) / elapsed, 1),
                "single_client_p50_ms": percentile_ms(baseline, 50),
                "server_rss_mb_start": round(rss_start, 1),
                "server_rss_mb_peak": round(peak[0], 1),
                "server_rss_mb_end": round(rss_end, 1),
                "server_rss_growth_mb": round(rss_end - rss_start, 1),
                "server_exit_code": exit_code,
                "elapsed_s": round(elapsed, 1),
                "first_errors": errors[:3],
                "request": {
                    "sequences": args.sequences,
                    "seq_len": args.seq_len,
                    "hidden_states": True,
                    "top_k": args.top_k,
                },
                "teacher": {"hidden_size": args.hidden_size, "layers": args.layers, "vocab": 32000},
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            }
        )
    )


if __name__ == "__main__":
    main()
