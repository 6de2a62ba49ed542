"""Replica choice (round robin over healthy ones), the client's token interceptor, and error messages."""

from __future__ import annotations

import grpc
import pytest

from dskd.errors import TeacherError
from dskd.servers.replicas import (
    BearerTokenClientInterceptor,
    Replica,
    ReplicaSet,
    teacher_error,
)


def replicas(*names):
    return [Replica(n, watch_health=False) for n in names]


def test_round_robin_visits_every_replica_in_turn():
    rs = ReplicaSet(replicas("a:1", "b:1", "c:1"))
    assert [rs.pick().address for _ in range(6)] == ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]


def test_benched_and_not_serving_replicas_are_skipped():
    a, b, c = replicas("a:1", "b:1", "c:1")
    rs = ReplicaSet([a, b, c])
    b.bench(60)
    c.serving = False
    assert [rs.pick().address for _ in range(3)] == ["a:1", "a:1", "a:1"]
    c.serving = True
    assert {rs.pick().address for _ in range(4)} == {"a:1", "c:1"}


def test_when_none_is_available_the_least_recently_benched_is_tried():
    a, b = replicas("a:1", "b:1")
    rs = ReplicaSet([a, b])
    a.bench(60)
    b.bench(30)
    assert rs.pick().address == "b:1"


def test_excluded_replicas_are_avoided_while_others_remain():
    rs = ReplicaSet(replicas("a:1", "b:1"))
    assert rs.pick(exclude={"a:1"}).address == "b:1"
    assert rs.pick(exclude={"a:1", "b:1"}).address in {"a:1", "b:1"}


def test_empty_replica_set_is_refused():
    with pytest.raises(TeacherError, match="no teacher address"):
        ReplicaSet([])


def test_token_interceptor_adds_bearer_metadata_and_keeps_the_rest():
    seen = {}

    def continuation(details, request):
        seen["details"] = details
        return "reply"

    details = type(
        "D",
        (),
        {
            "method": "/m",
            "timeout": 3.0,
            "metadata": [("x-a", "1")],
            "credentials": None,
            "wait_for_ready": None,
            "compression": None,
        },
    )()
    interceptor = BearerTokenClientInterceptor("s3cret")
    assert interceptor.intercept_unary_stream(continuation, details, object()) == "reply"
    assert seen["details"].metadata == [("x-a", "1"), ("authorization", "Bearer s3cret")]
    assert (seen["details"].method, seen["details"].timeout) == ("/m", 3.0)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (grpc.StatusCode.UNAVAILABLE, "is servers/serve_teacher.py running"),
        (grpc.StatusCode.UNAUTHENTICATED, "pass the server's token"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "raise timeout_s"),
        (grpc.StatusCode.INVALID_ARGUMENT, "refused the request"),
    ],
)
def test_errors_name_the_address_the_status_and_a_hint(code, hint):
    error = teacher_error(FakeRpcError(code, "some\ndetail"), "10.0.0.1:50051", "Score")
    text = str(error)
    assert text.startswith("teacher at 10.0.0.1:50051: Score failed with " + code.name)
    assert hint in text
    assert "\n" not in text
