"""Who may talk to a teacher server: bearer tokens, TLS, and which addresses it may listen on.

A teacher server hands out a model's outputs and its LM head, and burns accelerator time for whoever calls it,
so it listens on loopback unless told otherwise and refuses a wider address without a token (`--insecure`
overrides that, for private networks that are protected some other way). The token travels as
`authorization: Bearer <token>` metadata; it is compared in constant time so response timing does not leak
how much of a guess was right. The health service stays open: load balancers and orchestrators probe it
without credentials, and it reveals nothing but serving status.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

import grpc

from dskd.errors import DskdError

AUTH_METADATA_KEY = "authorization"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class ServerSetupError(DskdError):
    """The server was started with options that cannot work or are unsafe."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def bind_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_listen_policy(host: str, *, token: str | None, insecure: bool) -> None:
    if not is_loopback(host) and not token and not insecure:
        raise ServerSetupError(
            f"--host {host} listens beyond this machine without a token; pass --auth-token-file FILE "
            f"(and --tls-cert/--tls-key), or --insecure on a network you trust"
        )


def read_token_file(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise ServerSetupError(
            f"--auth-token-file {path}: cannot read it ({error.strerror}); give a readable file holding the token"
        ) from None
    if not token or any(c.isspace() for c in token):
        raise ServerSetupError(
            f"--auth-token-file {path}: holds no token or one with spaces; write one token (e.g. from `openssl rand -hex 32`) on one line"
        )
    return token


def server_credentials(cert_file: str | Path, key_file: str | Path) -> grpc.ServerCredentials:
    try:
        cert = Path(cert_file).read_bytes()
        key = Path(key_file).read_bytes()
    except OSError as error:
        raise ServerSetupError(
            f"TLS: cannot read {error.filename} ({error.strerror}); pass a PEM certificate with --tls-cert and its key with --tls-key"
        ) from None
    return grpc.ssl_server_credentials([(key, cert)])


def bearer_value(token: str) -> str:
    return f"Bearer {token}"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call without `authorization: Bearer <token>` with UNAUTHENTICATED (health excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = bearer_value(token).encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                presented = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(presented.encode(), self._expected):
            return handler
        return _denying(handler, "missing bearer token" if not presented else "wrong bearer token")


def _denying(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    message = f"{reason}: send metadata `authorization: Bearer <token>` with the server's token (RemoteTeacher(auth_token=...))"

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attribute, factory in kinds.items():
        if getattr(handler, attribute) is not None:
            return factory(
                deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
            )
    return handler
