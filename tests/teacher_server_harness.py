"""Shared by the server, client and protocol tests: a tiny saved teacher, and teacher servers in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = REPO / "examples" / "tokenizers"
SERVE_SCRIPT = REPO / "servers" / "serve_teacher.py"
SERVICE_NAME = "dskd.teacher.v1.Teacher"


def save_tiny_teacher(folder: Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """A random 2-layer Llama with the real TinyLlama tokenizer, saved like any HF model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "tinyllama")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class ServerProcess:
    """A `serve_teacher.py` subprocess on an ephemeral loopback port."""

    process: subprocess.Popen
    port: int
    log_path: Path
    signalled: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> None:
        if self.process.poll() is None and not self.signalled:
            self.process.send_signal(signal.SIGTERM)
            self.signalled = True

    def stop(self, timeout: float = 30.0) -> int:
        self.terminate()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def stop_servers(servers: list[ServerProcess], timeout: float = 30.0) -> list[int]:
    """SIGTERM all at once (they drain in parallel), then wait for each; returns the exit codes."""
    for server in servers:
        server.terminate()
    return [server.stop(timeout) for server in servers]


def launch_server(
    model_dir: Path, work_dir: Path, *extra: str, name: str = "server", threads: int = 1
) -> tuple[subprocess.Popen, Path, Path]:
    """Start a server process without waiting for it (so several can load at once).

    `threads` caps torch's intra-op threads: one by default, so test servers started side by side on a small
    machine do not oversubscribe its cores.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    port_file = work_dir / f"{name}.port"
    log_path = work_dir / f"{name}.log"
    port_file.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(SERVE_SCRIPT), "--model", str(model_dir), "--port", "0", "--port-file", str(port_file),
        "--dtype", "float32", "--device", "cpu", "--max-batch-tokens", "2048", "--max-seq-len", "256",
        "--drain-seconds", "0.5", "--grace-seconds", "10", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    stdout = open(log_path, "w")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    stdout.close()
    return process, port_file, log_path


def wait_serving(
    process: subprocess.Popen, port_file: Path, log_path: Path, *, timeout: float = 120.0, credentials=None
) -> ServerProcess:
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not bind within {timeout}s:\n{log_path.read_text()}")
        time.sleep(0.05)
    server = ServerProcess(process, int(port_file.read_text()), log_path)
    while health_status(server.address, credentials=credentials) != health_pb2.HealthCheckResponse.SERVING:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server never became SERVING:\n{server.log()}")
        time.sleep(0.1)
    return server


def start_servers(
    specs: list[tuple[Path, tuple[str, ...], str]], work_dir: Path, *, threads: int = 1
) -> list[ServerProcess]:
    """Start several servers concurrently: `(model_dir, extra_args, name)` each; returns them once serving."""
    launched = [launch_server(model, work_dir, *extra, name=name, threads=threads) for model, extra, name in specs]
    credentials = {}
    for _, extra, name in specs:
        if "--tls-cert" in extra:
            credentials[name] = Path(extra[extra.index("--tls-cert") + 1]).read_bytes()
    servers = []
    try:
        for (process, port_file, log_path), (_, _, name) in zip(launched, specs):
            ca = credentials.get(name)
            servers.append(wait_serving(process, port_file, log_path, credentials=ca))
    except Exception:
        for process, _, _ in launched:
            if process.poll() is None:
                process.kill()
        raise
    return servers


def health_status(address: str, *, credentials: bytes | None = None, service: str = SERVICE_NAME, timeout: float = 2.0):
    """The server's health status, or None when it cannot be reached."""
    if credentials is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=credentials))
    else:
        channel = grpc.insecure_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def events(server: ServerProcess) -> list[dict]:
    out = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def make_self_signed_cert(folder: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and localhost, made with the openssl CLI."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert),
            "-subj", f"/CN={common_name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
