"""The client's view of its teacher servers: channels, health, round robin, and errors in user terms.

Channels are opened lazily and belong to the process that opened them: gRPC objects do not survive `fork()`
(DataLoader workers, torch.multiprocessing), so a replica used in a new process opens fresh ones. Each replica
has a background thread watching `grpc.health.v1`, so a draining or unhealthy server stops receiving batches
before its calls start failing; a call that fails with UNAVAILABLE also benches the replica for a while.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dskd.errors import TeacherError
from dskd.protos import teacher_pb2_grpc as pb_grpc
from dskd.servers.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("dskd.remote_teacher")
SERVICE_NAME = "dskd.teacher.v1.Teacher"
RECONNECT_BACKOFF_MAX_MS = 2000

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is servers/serve_teacher.py running and reachable there? (for TLS servers pass tls_ca_file)",
    grpc.StatusCode.UNAUTHENTICATED: "pass the server's token (RemoteTeacher(auth_token=...), the file given to --auth-token-file)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the teacher did not answer in time; raise timeout_s or send smaller batches",
    grpc.StatusCode.INVALID_ARGUMENT: "the server refused the request as malformed; this is a client bug or a teacher/tokenizer mismatch",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the server is overloaded or the batch is too large; lower the batch size or add replicas",
    grpc.StatusCode.FAILED_PRECONDITION: "the server now serves a different model; restart the run against matching replicas",
    grpc.StatusCode.INTERNAL: "the teacher failed while computing; see the server's log",
}


def teacher_error(error: grpc.RpcError, address: str, what: str) -> TeacherError:
    """A one-line TeacherError naming the address, the gRPC status and what to do."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    details = " ".join(details.split())[:300]
    name = code.name if code is not None else "ERROR"
    hint = _HINTS.get(code, "see the server's log")
    return TeacherError(f"teacher at {address}: {what} failed with {name} ({details}); {hint}")


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call.

    Call credentials would be simpler, but gRPC silently drops them on plaintext channels (grpc#8142), and a
    teacher on loopback or a private network is often plaintext.
    """

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


class Replica:
    """One teacher server address."""

    def __init__(
        self,
        address: str,
        *,
        auth_token: str | None = None,
        root_certificates: bytes | None = None,
        watch_health: bool = True,
    ) -> None:
        self.address = address
        self._token = auth_token
        self._root_certificates = root_certificates
        self._watch_health = watch_health
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.TeacherStub | None = None
        self._closed = False
        self.serving: bool | None = None  # None until the health watcher has heard from the server
        self.benched_until = 0.0
        self._count_lock = threading.Lock()
        self.calls = 0  # calls this replica answered
        self.failures = 0  # times it left the rotation (health said down or unreachable, or a call failed)

    def stub(self) -> pb_grpc.TeacherStub:
        with self._lock:
            if self._pid != os.getpid():
                self._open()
            return self._stub

    def _open(self) -> None:
        # A channel inherited through fork() must not be touched (not even closed); drop it and start over.
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC's reconnect backoff grows to 120 s by default; a replica restarted after a crash should be
            # back in the rotation within seconds.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ]
        if self._root_certificates is not None:
            channel = grpc.secure_channel(
                self.address, grpc.ssl_channel_credentials(root_certificates=self._root_certificates), options=options
            )
        else:
            channel = grpc.insecure_channel(self.address, options=options)
        health_channel = channel
        if self._token:
            channel = grpc.intercept_channel(channel, BearerTokenClientInterceptor(self._token))
        self._pid = os.getpid()
        self._channel = channel
        self._stub = pb_grpc.TeacherStub(channel)
        self.serving = None
        if self._watch_health:
            threading.Thread(
                target=self._watch, args=(health_channel, self._pid), name=f"dskd-health-{self.address}", daemon=True
            ).start()

    def _watch(self, channel: grpc.Channel, pid: int) -> None:
        """Follow the server's health stream for as long as this channel lives; reconnect with a backoff."""
        stub = health_pb2_grpc.HealthStub(channel)
        backoff = 0.2
        while not self._closed and self._pid == pid:
            try:
                for reply in stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME)):
                    self._set_serving(reply.status == health_pb2.HealthCheckResponse.SERVING)
                    backoff = 0.2
            except grpc.RpcError:
                pass
            except ValueError:  # the channel was closed under us
                return
            if self._closed:
                return
            self._set_serving(False)
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _set_serving(self, serving: bool) -> None:
        with self._count_lock:
            if not serving and self.available(time.monotonic()):
                self.failures += 1
            self.serving = serving

    def bench(self, seconds: float) -> None:
        now = time.monotonic()
        with self._count_lock:
            if self.available(now):
                self.failures += 1
            self.benched_until = now + seconds

    def answered(self) -> None:
        with self._count_lock:
            self.calls += 1

    def available(self, now: float) -> bool:
        return self.serving is not False and self.benched_until <= now

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None and self._pid == os.getpid():
                self._channel.close()
            self._channel = self._stub = None
            self._pid = None


class ReplicaSet:
    """Round robin over replicas that are serving and not benched; when none is, the least recently benched."""

    def __init__(self, replicas: list[Replica]) -> None:
        if not replicas:
            raise TeacherError("no teacher address given; pass one or more host:port addresses")
        self.replicas = replicas
        self._next = 0
        self._lock = threading.Lock()

    def pick(self, exclude: set[str] = frozenset()) -> Replica:
        now = time.monotonic()
        with self._lock:
            n = len(self.replicas)
            order = [self.replicas[(self._next + i) % n] for i in range(n)]
            candidates = [r for r in order if r.address not in exclude] or order
            chosen = next((r for r in candidates if r.available(now)), None)
            if chosen is None:
                chosen = min(candidates, key=lambda r: r.benched_until)
            self._next = (self.replicas.index(chosen) + 1) % n
            return chosen

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()
