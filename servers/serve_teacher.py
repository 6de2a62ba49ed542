"""Serve a Hugging Face causal LM as a dskd teacher over gRPC.

    python servers/serve_teacher.py --model PATH_OR_ID_OR_GGUF [--gguf-file F] [--host 127.0.0.1] [--port 50051] [--dtype bfloat16]
        [--device cuda|cpu] [--max-batch-tokens N] [--max-seq-len N] [--auth-token-file F]
        [--tls-cert F --tls-key F] [--reflection] [--insecure]

The server prints one JSON line per lifecycle event on stdout (`listening` with the bound port, `serving`
once a warm-up forward has run, `draining`, `stopped`), so scripts can start it with `--port 0` and read the
port (or pass `--port-file F`). Health (`grpc.health.v1`) reports NOT_SERVING until the warm-up is done and
again from SIGTERM on; the server then stops accepting calls, finishes those in flight and exits with 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script, this folder would be first on sys.path and its modules (wire, security, ...) could
    # shadow top-level modules of the same name in other packages.
    del sys.path[0]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import grpc  # noqa: E402
import torch  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

from dskd.errors import DskdError, ModelError  # noqa: E402
from dskd.kit.lm_head import LMHead, head_from_model  # noqa: E402
from dskd.models.loading import checkpoint_source, default_dtype  # noqa: E402
from dskd.models.teacher import model_fingerprint, tokenizer_fingerprint  # noqa: E402
from dskd.protos import teacher_pb2_grpc as pb_grpc  # noqa: E402
from dskd.servers.batcher import ModelWorker  # noqa: E402
from dskd.servers.health_status import DrainableHealthServicer  # noqa: E402
from dskd.servers.request_decoding import MalformedRequestInterceptor  # noqa: E402
from dskd.servers.security import (  # noqa: E402
    BearerTokenInterceptor,
    ServerSetupError,
    bind_address,
    check_listen_policy,
    is_loopback,
    read_token_file,
    server_credentials,
)
from dskd.servers.servicer import SERVICE_NAME, TeacherServicer, describe  # noqa: E402
from dskd.servers.validation import ServerLimits  # noqa: E402
from dskd.servers.wire import MAX_MESSAGE_BYTES  # noqa: E402

log = logging.getLogger("dskd.serve_teacher")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="serve_teacher.py", description="Serve an HF causal LM as a dskd teacher over gRPC."
    )
    p.add_argument(
        "--model", required=True, help="a local folder or a Hugging Face model id (tokenizer from the same place)"
    )
    p.add_argument(
        "--gguf-file",
        default=None,
        help="a GGUF file inside the folder --model (or give the .gguf file as --model); converted once to a "
        "float checkpoint cached by content hash",
    )
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit) for a hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (printed, see --port-file)")
    p.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="compute dtype of the model (default: bfloat16 on CUDA, float32 on CPU, as an in-process teacher)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward, and per request")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="longest sequence accepted (default: the model's, capped by --max-batch-tokens)",
    )
    p.add_argument("--max-top-k", type=int, default=128)
    p.add_argument(
        "--max-response-bytes", type=int, default=256 << 20, help="largest Score answer (guards full logits)"
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="Generate limit")
    p.add_argument("--max-queue", type=int, default=1024, help="queued requests before RESOURCE_EXHAUSTED")
    p.add_argument("--no-batching", action="store_true", help="one request per forward (for comparisons)")
    p.add_argument(
        "--auth-token-file", default=None, help="require `authorization: Bearer <token>` with this file's token"
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key (with --tls-cert)")
    p.add_argument("--reflection", action="store_true", help="serve gRPC reflection (for grpcurl / grpcui)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    p.add_argument("--replica-id", default=None, help="name reported in every answer (default host:port)")
    p.add_argument(
        "--drain-seconds", type=float, default=2.0, help="after SIGTERM, NOT_SERVING this long before refusing calls"
    )
    p.add_argument("--grace-seconds", type=float, default=30.0, help="then wait this long for calls in flight")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


@dataclass
class LoadedTeacher:
    model: torch.nn.Module
    tokenizer: object
    head: LMHead
    fingerprint: str
    model_id: str
    tokenizer_dir: Path


def load_teacher(args: argparse.Namespace) -> LoadedTeacher:
    from transformers import (  # heavy import, only where a model is loaded
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype is None:  # the one rule an in-process teacher follows too (dskd.models.loading.default_dtype)
        args.dtype = default_dtype(device)
        log.info("compute dtype %s (the default on %s; --dtype to change)", args.dtype, device.type)
    dtype = DTYPES[args.dtype]
    # A GGUF file is read from its converted float checkpoint (the same cache a run uses), so a restart is quick.
    source = checkpoint_source(args.model, args.gguf_file or "", "--model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=args.revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=args.revision, dtype=dtype)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"--model {args.model}: cannot load a causal LM and its tokenizer ({first_line}); give a folder saved with save_pretrained or a model id"
        ) from None
    model.to(device).eval().requires_grad_(False)
    head = head_from_model(model, len(tokenizer), verify=True, name=f"teacher {args.model}").detached()
    # A local path says nothing about the model (replicas may keep it in different folders), so only hub ids
    # enter the fingerprint by name; the weights, config and tokenizer enter it in every case.
    model_id = "" if os.path.exists(args.model) else args.model
    fingerprint = model_fingerprint(model, tokenizer, dtype, model_id, args.revision or "")
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="dskd-teacher-tokenizer-"))
    tokenizer.save_pretrained(tokenizer_dir)
    return LoadedTeacher(model, tokenizer, head, fingerprint, model_id or args.model, tokenizer_dir)


def limits_for(args: argparse.Namespace, teacher: LoadedTeacher) -> ServerLimits:
    for flag, value in (
        ("--max-batch-tokens", args.max_batch_tokens),
        ("--max-top-k", args.max_top_k),
        ("--max-response-bytes", args.max_response_bytes),
        ("--max-new-tokens", args.max_new_tokens),
        ("--max-queue", args.max_queue),
    ):
        if value < 1:
            raise ServerSetupError(
                f"{flag} {value} must be at least 1 (to serve one request per forward, use --no-batching)"
            )
    model_len = int(getattr(teacher.model.config, "max_position_embeddings", 0) or args.max_batch_tokens)
    max_seq_len = args.max_seq_len or min(model_len, args.max_batch_tokens)
    if max_seq_len > args.max_batch_tokens:
        raise ServerSetupError(
            f"--max-seq-len {max_seq_len} exceeds --max-batch-tokens {args.max_batch_tokens}; one sequence must fit a forward"
        )
    if max_seq_len < 1:
        raise ServerSetupError(f"--max-seq-len {max_seq_len} must be at least 1")
    return ServerLimits(
        vocab_size=teacher.head.vocab_size,
        hidden_size=teacher.head.hidden_size,
        max_seq_len=max_seq_len,
        max_batch_tokens=args.max_batch_tokens,
        max_top_k=args.max_top_k,
        max_response_bytes=args.max_response_bytes,
        max_new_tokens=args.max_new_tokens,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )


def announce(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def address_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails with EADDRINUSE (gRPC's own bind error does not say why)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does, so connections of a previous server in TIME_WAIT do not count as "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return True
    return False


def write_port_file(path: str, port: int) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)  # atomic, so a reader never sees an empty file


async def serve(
    args: argparse.Namespace, teacher: LoadedTeacher, limits: ServerLimits, token: str | None, credentials
) -> int:
    worker = ModelWorker(
        teacher.model,
        teacher.head,
        teacher.tokenizer,
        max_batch_tokens=limits.max_batch_tokens,
        batching=not args.no_batching,
        max_queue=args.max_queue,
    )
    options = [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        # gRPC sets SO_REUSEPORT by default: a second server (another model, no token) could then bind this
        # port too and the kernel would hand it a share of new connections. Bind exclusively.
        ("grpc.so_reuseport", 0),
    ]
    # The token is checked first (outermost): a caller without it learns nothing, not even that its bytes were bad.
    interceptors = [BearerTokenInterceptor(token)] if token else []
    server = grpc.aio.server(options=options, interceptors=[*interceptors, MalformedRequestInterceptor()])
    health_servicer = DrainableHealthServicer()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = bind_address(args.host, args.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as error:
        if address_in_use(args.host, args.port):
            raise ServerSetupError(
                f"cannot listen on {address}: address in use (another process holds port {args.port}); stop it or pick another --port"
            ) from None
        raise ServerSetupError(f"cannot listen on {address} ({error}); pick another --port or --host") from None
    replica_id = args.replica_id or f"{socket.gethostname()}:{port}"
    description = describe(
        teacher.model,
        teacher.tokenizer,
        model_id=teacher.model_id,
        revision=args.revision or "",
        fingerprint=teacher.fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(teacher.tokenizer),
        replica_id=replica_id,
    )
    pb_grpc.add_TeacherServicer_to_server(TeacherServicer(worker, description, limits, teacher.tokenizer_dir), server)
    if args.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announce(
        "listening",
        host=args.host,
        port=port,
        fingerprint=teacher.fingerprint,
        tls=credentials is not None,
        dtype=args.dtype,
    )
    if args.port_file:
        write_port_file(args.port_file, port)
    # The worker thread starts only after the warm-up, so the model has one user at a time.
    try:
        await asyncio.to_thread(worker.warm_up, limits.max_batch_tokens, limits.max_seq_len)
    except Exception as error:
        await server.stop(0)
        raise ServerSetupError(
            f"the warm-up forward of {limits.max_batch_tokens} tokens failed ({type(error).__name__}: {error}); lower --max-batch-tokens"
        ) from None
    worker.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    announce("serving", port=port, replica_id=replica_id)
    await stop.wait()
    announce("draining", port=port)
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(args.drain_seconds)  # let load balancers watching health move away first
    health_servicer.close_watches()
    await server.stop(args.grace_seconds)
    await asyncio.to_thread(worker.stop, args.grace_seconds)
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Closing the loop would restore the default action, and a supervisor repeating its SIGTERM
        # during interpreter shutdown would then turn this clean exit into a kill.
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    announce("stopped", port=port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        token = read_token_file(args.auth_token_file) if args.auth_token_file else None
        check_listen_policy(args.host, token=token, insecure=args.insecure)
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ServerSetupError(
                "--tls-cert and --tls-key go together; pass both PEM files, or neither for plaintext"
            )
        credentials = server_credentials(args.tls_cert, args.tls_key) if args.tls_cert else None
        if token and credentials is None and not is_loopback(args.host):
            log.warning("the bearer token travels in plaintext on %s; add --tls-cert/--tls-key", args.host)
        if address_in_use(args.host, args.port):
            # Checked again at the real bind; this one only spares loading a large model for nothing.
            raise ServerSetupError(
                f"cannot listen on {bind_address(args.host, args.port)}: address in use (another process holds port {args.port}); stop it or pick another --port"
            )
        teacher = load_teacher(args)
        limits = limits_for(args, teacher)
        return asyncio.run(serve(args, teacher, limits, token, credentials))
    except DskdError as error:
        print(f"serve_teacher: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
