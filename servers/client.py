"""`RemoteTeacher`: the `dskd.models.teacher.Teacher` interface over gRPC, for teachers served by serve_teacher.py.

Construction is the handshake: `GetInfo` on every address (replicas must share one fingerprint), the
teacher's tokenizer and LM head fetched once and cached on disk by fingerprint, and a self-check that the
head applied here to the server's hidden states reproduces the server's own top-k. After that, `score`
packs a padded batch (no padding on the wire), sends it to the next healthy replica, and decodes the raw
parts with `torch.frombuffer` into float32 tensors on the client's device; `score_async` does the same on a
helper thread so the engine can fetch batch i+1 while the student computes batch i.

Failures are never papered over: UNAVAILABLE, or a stream that breaks after it started, is retried whole on
another replica (scoring is a pure function, so that is safe). When every replica is down the client keeps
trying, with a capped exponential backoff and a warning per wait, for `retry_timeout_s` (a restarted server is
back within that); anything else, and an outage longer than that, raises a `TeacherError` that names the
address and what to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from dskd.errors import TeacherError
from dskd.kit.lm_head import LMHead
from dskd.models.teacher import Teacher, tokenizer_fingerprint, topk_with_tail
from dskd.protos import teacher_pb2 as pb
from dskd.servers.replicas import Replica, ReplicaSet, teacher_error
from dskd.servers.score_plan import (
    RequestLimits,
    ScorePlan,
    assemble_signal,
    empty_signal,
    plan_score,
)
from dskd.servers.teacher_cache import TeacherCache
from dskd.servers.wire import (
    TensorAssembler,
    WireFormatError,
    bytes_tensor,
    int32_array,
    pack_sequences,
    wire_dtype,
)
from dskd.types import SignalRequest, TeacherSignal

log = logging.getLogger("dskd.remote_teacher")
PROTOCOL_VERSION = pb.DESCRIPTOR.package
DTYPE_NAMES = {pb.BF16: "bfloat16", pb.FP16: "float16", pb.FP32: "float32"}
# Self-check tolerance (absolute, relative) on log-probabilities: bf16 keeps 8 bits of mantissa, so a
# value near -20 is only known to about 0.08.
TOLERANCE = {"exact": (1e-3, 1e-4), "half": (0.05, 2.0**-6)}
T = TypeVar("T")
# Longest pause between two attempts while every replica is down: short enough that a restarted server is used
# within seconds, long enough not to spin on a dead address.
RETRY_BACKOFF_MAX_S = 5.0


class _BrokenStream(Exception):
    """A Score stream failed after its header arrived: the replica died mid-answer; retry elsewhere."""


class RemoteTeacher(Teacher):
    """A teacher served over gRPC by one or more identical replicas (see servers/serve_teacher.py)."""

    def __init__(
        self,
        addresses: str | list[str],
        *,
        auth_token: str | None = None,
        tls_ca_file: str | Path | None = None,
        timeout_s: float = 120.0,
        wire_dtype: str = "bfloat16",
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        max_attempts: int = 3,
        prefetch_workers: int = 2,
        self_check: bool = True,
        bench_seconds: float = 5.0,
        retry_timeout_s: float = 0.0,
    ) -> None:
        self.addresses = _parse_addresses(addresses)
        if wire_dtype not in ("bfloat16", "float32"):
            raise TeacherError(f"wire_dtype {wire_dtype!r} is not supported; use 'bfloat16' (default) or 'float32'")
        if not timeout_s > 0:
            raise TeacherError(f"timeout_s {timeout_s} must be positive: every teacher call needs a deadline")
        self.wire_dtype = wire_dtype
        self.timeout_s = float(timeout_s)
        self.device = torch.device(device)
        self.max_attempts = max(1, int(max_attempts))
        self.prefetch_workers = max(1, int(prefetch_workers))
        self.bench_seconds = bench_seconds
        if not retry_timeout_s >= 0:
            raise TeacherError(f"retry_timeout_s {retry_timeout_s} must be >= 0 (0: give up after max_attempts)")
        self.retry_timeout_s = float(retry_timeout_s)
        roots = _read_ca(tls_ca_file)
        self._replicas = ReplicaSet(
            [Replica(a, auth_token=auth_token, root_certificates=roots) for a in self.addresses]
        )
        self._cache = TeacherCache(cache_dir)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None
        self._retries = 0
        try:
            self.info = self._handshake()
            self.fingerprint: str = self.info.fingerprint
            self.capabilities: frozenset[str] = frozenset(self.info.capabilities)
            self.limits = RequestLimits.from_info(self.info)
            self.tokenizer = self._load_tokenizer()
            self.head, self.head_source = self._load_head()
            if self_check:
                self.check_head()
        except BaseException:
            self.close()  # no channels or health watchers left behind by a refused teacher
            raise

    # -- the Teacher interface (sizes come from the head, as `Teacher` defines them) ------------------------

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, request: SignalRequest
    ) -> TeacherSignal:
        """Signal for `rows` (flat positions `b * T + t` into the `(B, T)` ids), in the order given."""
        return self._execute(self._plan(input_ids, attention_mask, rows, request))

    def score_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, request: SignalRequest
    ) -> Future:
        """`score` on a helper thread; the batch is packed before this returns, so the caller may reuse it."""
        plan = self._plan(input_ids, attention_mask, rows, request)
        return self._pool().submit(self._execute, plan)

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """Sampled continuations (ids without the prompt, up to and including EOS), from the teacher."""
        if "generate" not in self.capabilities:
            raise TeacherError(
                f"teacher at {self.addresses[0]} does not offer Generate; use a policy that samples from the student"
            )
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise TeacherError("generate: every prompt needs at least one token (e.g. the BOS id)")
        out: list[list[int]] = []
        for index, group in enumerate(self._prompt_groups(prompts, max_new_tokens)):
            message = pb.GenerateRequest(
                request_id=uuid.uuid4().hex,
                prompts=pack_sequences(group),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed + index,  # each group its own stream, reproducible for a given batch split
                expected_fingerprint=self.fingerprint,
            )
            reply = self._call(
                lambda replica, message=message: replica.stub().Generate(message, timeout=self.timeout_s), "Generate"
            )
            out.extend(_unpack(reply.tokens))
        return out

    def stats(self) -> dict[str, float]:
        """Counters of this client since it was made, logged by the engine as `teacher/<name>`.

        `calls`: teacher calls answered; `retries`: calls sent again after an attempt failed (each retry is the
        whole call, and only the answer of the attempt that succeeded is used); `failovers`: times a replica left
        the rotation (its health stream said down or became unreachable, or a call to it failed), so that its
        work went to the others; `healthy_replicas`: replicas in the rotation now; `calls/<address>`: answered
        calls per replica.
        """
        now = time.monotonic()
        replicas = self._replicas.replicas
        out: dict[str, float] = {
            "calls": sum(r.calls for r in replicas),
            "retries": self._retries,
            "failovers": sum(r.failures for r in replicas),
            "healthy_replicas": sum(r.available(now) for r in replicas),
        }
        out.update({f"calls/{r.address}": r.calls for r in replicas})
        return out

    def close(self) -> None:
        with self._lock:
            if self._executor is not None and self._executor_pid == os.getpid():
                self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._replicas.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- start-up -----------------------------------------------------------------------------------------

    def _ask_every_replica(self) -> tuple[dict[str, pb.TeacherInfo], dict[str, TeacherError]]:
        infos: dict[str, pb.TeacherInfo] = {}
        failures: dict[str, TeacherError] = {}
        for replica in self._replicas.replicas:
            try:
                infos[replica.address] = replica.stub().GetInfo(pb.GetInfoRequest(), timeout=self.timeout_s)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise teacher_error(error, replica.address, "the handshake (GetInfo)") from None
                failures[replica.address] = teacher_error(error, replica.address, "the handshake (GetInfo)")
                replica.bench(self.bench_seconds)
        return infos, failures

    def _handshake(self) -> pb.TeacherInfo:
        # A run is often started while its teacher servers still load their model: wait for one to answer, as a
        # running job waits out an outage, for `retry_timeout_s` with a capped backoff and a line per wait.
        started, pause = time.monotonic(), 0.2
        infos, failures = self._ask_every_replica()
        while not infos and (waited := time.monotonic() - started) < self.retry_timeout_s:
            delay = min(pause, self.retry_timeout_s - waited)
            log.warning(
                "no teacher answers the handshake yet (%s); trying again in %.1f s (waited %.0f s; giving up after "
                "retry_timeout_s = %.0f s)",
                " | ".join(str(f) for f in failures.values()),
                delay,
                waited,
                self.retry_timeout_s,
            )
            time.sleep(delay)
            pause = min(pause * 2, RETRY_BACKOFF_MAX_S)
            infos, failures = self._ask_every_replica()
        if not infos:
            raise (
                failures[self.addresses[0]]
                if len(failures) == 1
                else TeacherError("no teacher answered: " + " | ".join(str(f) for f in failures.values()))
            )
        for address, info in infos.items():
            if info.protocol_version != PROTOCOL_VERSION:
                raise TeacherError(
                    f"teacher at {address} speaks {info.protocol_version!r}, this client {PROTOCOL_VERSION!r}; upgrade the older side"
                )
        fingerprints = {address: info.fingerprint for address, info in infos.items()}
        if len(set(fingerprints.values())) > 1:
            listed = ", ".join(f"{a} serves {fp}" for a, fp in fingerprints.items())
            raise TeacherError(
                f"teacher replicas differ ({listed}); every address must serve the same model, revision, tokenizer and dtype"
            )
        for failure in failures.values():
            log.warning("%s; continuing with the other replicas", failure)
        return next(iter(infos.values()))

    def _load_tokenizer(self):
        from transformers import AutoTokenizer  # heavy; only needed once per client

        folder = self._cache.tokenizer_dir(self.fingerprint)
        if folder is None:
            files = self._call(self._fetch_tokenizer, "FetchTokenizer")
            folder = self._cache.save_tokenizer(self.fingerprint, files)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer_fingerprint(tokenizer) != self.info.tokenizer_fingerprint:
            # Different tokenizers library versions may serialise the same tokenizer differently, so this is a
            # warning; a real mismatch shows up in the head check and as out-of-vocabulary ids.
            log.warning(
                "the teacher's tokenizer loads here with a different fingerprint than on the server (library versions differ?)"
            )
        return tokenizer

    def _fetch_tokenizer(self, replica: Replica) -> dict[str, bytes]:
        files: dict[str, bytearray] = {}
        done: set[str] = set()
        for chunk in replica.stub().FetchTokenizer(pb.FetchTokenizerRequest(), timeout=self.timeout_s):
            buffer = files.setdefault(chunk.path, bytearray())
            if chunk.offset != len(buffer):
                raise WireFormatError(f"tokenizer file {chunk.path}: chunk at {chunk.offset}, expected {len(buffer)}")
            buffer += chunk.data
            if chunk.last:
                if len(buffer) != chunk.total or hashlib.sha256(buffer).digest() != chunk.sha256:
                    raise WireFormatError(f"tokenizer file {chunk.path}: size or sha256 does not match")
                done.add(chunk.path)
        if not files or set(files) != done:
            raise WireFormatError(
                f"tokenizer stream ended before files {sorted(set(files) - done) or 'any'} were complete"
            )
        return {name: bytes(data) for name, data in files.items()}

    def _load_head(self) -> tuple[LMHead, str]:
        dtype = self.info.compute_dtype or pb.FP32
        dtype_name = DTYPE_NAMES.get(dtype, "float32")
        cached = self._cache.load_head(self.fingerprint, dtype_name)
        source = "cache"
        if cached is None:
            meta, tensors = self._call(self._fetch_head, "FetchHead")
            self._cache.save_head(self.fingerprint, dtype_name, meta, tensors)
            source = "server"
        else:
            meta, tensors = cached
        specs = {spec["name"]: spec for spec in meta["tensors"]}
        weight = bytes_tensor(
            tensors["lm_head.weight"], specs["lm_head.weight"]["dtype"], tuple(specs["lm_head.weight"]["shape"])
        )
        bias = None
        if "lm_head.bias" in tensors:
            bias = bytes_tensor(
                tensors["lm_head.bias"], specs["lm_head.bias"]["dtype"], tuple(specs["lm_head.bias"]["shape"])
            )
        expected = (self.info.tokenizer_size, self.info.hidden_size)
        if tuple(weight.shape) != expected:
            raise TeacherError(
                f"teacher at {self.addresses[0]}: LM head has shape {tuple(weight.shape)}, expected {expected} from GetInfo; the server is inconsistent"
            )
        return LMHead(weight, bias, float(meta["scale"]), float(meta["softcap"])).to(self.device), source

    def _fetch_head(self, replica: Replica) -> tuple[dict, dict[str, bytearray]]:
        header, assembler = None, None
        for part in replica.stub().FetchHead(pb.FetchHeadRequest(), timeout=self.timeout_s):
            if part.WhichOneof("part") == "header":
                header = part.header
                if header.fingerprint != self.fingerprint:
                    raise TeacherError(
                        f"teacher at {replica.address} sent the head of model {header.fingerprint}, not {self.fingerprint}; restart the run"
                    )
                assembler = TensorAssembler(header.tensors)
            elif assembler is None:
                raise WireFormatError("head part before the header")
            else:
                assembler.add(part.tensor)
        if assembler is None or assembler.missing():
            raise WireFormatError("the head stream ended early")
        assembler.verify_checksums()
        meta = {
            "tensors": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "sha256": s.sha256.hex()}
                for s in header.tensors
            ],
            "scale": header.scale,
            "softcap": header.softcap,
        }
        return meta, assembler.buffers

    def check_head(self) -> None:
        """Refuse a teacher whose hidden states, put through the fetched head here, miss its own top-k.

        Catches architectures whose last hidden state is not the head's input, heads with transforms the
        server did not describe, and a head corrupted on the way.
        """
        ids = self.tokenizer("The quick brown fox jumps over the lazy dog.\nIt was 1999.")["input_ids"][
            : self.limits.max_seq_len
        ]
        probe = torch.tensor([ids], dtype=torch.int64)
        k = min(8, self.limits.max_top_k, self.vocab_size)
        signal = self.score(
            probe, torch.ones_like(probe), torch.arange(probe.shape[1]), SignalRequest(hidden_states=True, top_k=k)
        )
        local = self.head.logits(signal.hidden_states.to(self.device))
        _, local_top, local_tail = topk_with_tail(local, k)
        local_at_server = (local - torch.logsumexp(local, -1, keepdim=True)).gather(1, signal.topk_ids)
        half = self.wire_dtype != "float32" or self.head.weight.dtype != torch.float32
        atol, rtol = TOLERANCE["half" if half else "exact"]
        server = signal.topk_logprobs
        excess = torch.cat([
            ((local_at_server - server).abs() - (atol + rtol * server.abs())).flatten(),
            (local_top[:, -1] - server[:, -1] - (atol + rtol * server[:, -1].abs())).flatten(),
            ((local_tail - signal.tail_logmass).abs() - (atol + rtol * signal.tail_logmass.abs())).flatten(),
        ])  # fmt: skip
        if bool((excess > 0).any()):
            raise TeacherError(
                f"teacher at {self.addresses[0]}: its LM head applied to its hidden states does not reproduce its top-{k} "
                f"(off by {float(excess.max()):.3g} beyond the {self.wire_dtype} tolerance); hidden-state objectives cannot use "
                f"this teacher, use one that needs only top-k (kd, mined_kd)"
            )

    # -- scoring ------------------------------------------------------------------------------------------

    def _plan(self, input_ids, attention_mask, rows, request: SignalRequest) -> ScorePlan:
        return plan_score(input_ids, attention_mask, rows, request, self.limits, wire_dtype(self.wire_dtype))

    def _execute(self, plan: ScorePlan) -> TeacherSignal:
        if not plan.messages:
            signal = empty_signal(plan, self.limits, self.device)
            signal.fingerprint = self.fingerprint
            return signal
        started = time.perf_counter()
        parts, trailers, replicas = [], [], []
        for message in plan.messages:
            message.request_id = uuid.uuid4().hex
            message.expected_fingerprint = self.fingerprint
            tensors, header, trailer = self._call(
                lambda replica, message=message: self._score_once(replica, message), "Score"
            )
            parts.append(tensors)
            trailers.append(trailer)
            replicas.append(header.replica_id)
        signal = assemble_signal(plan, parts, self.device)
        signal.fingerprint = self.fingerprint
        signal.timings = {
            "total_s": time.perf_counter() - started,
            "queue_s": sum(t.queue_ns for t in trailers) / 1e9,
            "forward_s": sum(t.forward_ns for t in trailers) / 1e9,
            "encode_s": sum(t.encode_ns for t in trailers) / 1e9,
            "batch_requests": max(t.batch_requests for t in trailers),
            "requests": len(trailers),
            "replicas": replicas,
        }
        return signal

    def _score_once(self, replica: Replica, message: pb.ScoreRequest):
        call = replica.stub().Score(message, timeout=self.timeout_s)
        header = assembler = trailer = None
        try:
            for part in call:
                kind = part.WhichOneof("part")
                if kind == "header":
                    header = part.header
                    if header.fingerprint != self.fingerprint:
                        call.cancel()
                        raise TeacherError(
                            f"teacher at {replica.address} answered as model {header.fingerprint}, not {self.fingerprint}; restart the run against matching replicas"
                        )
                    assembler = TensorAssembler(header.tensors)
                elif kind == "tensor" and assembler is not None:
                    assembler.add(part.tensor)
                elif kind == "trailer":
                    trailer = part.trailer
                else:
                    raise WireFormatError(f"unexpected {kind} part before the header")
        except grpc.RpcError as error:
            if header is not None and error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise _BrokenStream(teacher_error(error, replica.address, "Score")) from error
            raise
        if header is None or trailer is None:
            raise WireFormatError("the Score stream ended before its header or trailer")
        if list(header.rows_per_sequence) != list(message.position_counts):
            raise WireFormatError("the answer's rows per sequence do not match the request")
        return assembler.tensors(), header, trailer

    def _call(self, fn: Callable[[Replica], T], what: str) -> T:
        """`fn` on the next replica; on UNAVAILABLE or a broken stream, again on another one.

        Gives up after `max_attempts` (at least one per replica) only once `retry_timeout_s` has also passed
        since the first failure: an outage of every replica (a restart, a network blip) is waited out.
        """
        replicas = self._replicas.replicas
        attempts = max(self.max_attempts, len(replicas))
        tried: set[str] = set()
        last: TeacherError | None = None
        failed_since: float | None = None
        pause = 0.2
        attempt = 0
        while True:
            replica = self._replicas.pick(exclude=tried)
            if attempt:
                with self._lock:
                    self._retries += 1
            try:
                result = fn(replica)
                replica.answered()
                if failed_since is not None and time.monotonic() - failed_since >= 1.0:
                    log.warning(
                        "teacher at %s answered again after %.0f s; continuing",
                        replica.address,
                        time.monotonic() - failed_since,
                    )
                return result
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise teacher_error(error, replica.address, what) from None
                last = teacher_error(error, replica.address, what)
            except _BrokenStream as error:
                last = error.args[0]
            except WireFormatError as error:
                last = TeacherError(
                    f"teacher at {replica.address}: the {what} answer was malformed ({error}); see the server's log"
                )
            now = time.monotonic()
            failed_since = now if failed_since is None else failed_since
            waited = now - failed_since
            attempt += 1
            replica.bench(self.bench_seconds)
            tried.add(replica.address)
            if attempt >= attempts and waited >= self.retry_timeout_s:
                break
            if len(tried) == len(replicas):
                # Every replica failed once: wait before the next round, doubling up to a cap, never past the
                # deadline (so a short retry_timeout_s is honoured to within a pause).
                tried.clear()
                delay = pause if attempt < attempts else min(pause, max(self.retry_timeout_s - waited, 0.0))
                pause = min(pause * 2, RETRY_BACKOFF_MAX_S)
                log.warning(
                    "%s; no replica answers: attempt %d in %.1f s (down for %.0f s; giving up after retry_timeout_s = %.0f s)",
                    last,
                    attempt + 1,
                    delay,
                    waited,
                    self.retry_timeout_s,
                )
                time.sleep(delay)
            else:
                log.warning("%s; retrying on another replica", last)
        raise TeacherError(
            f"{last} [gave up after {attempt} attempts in {time.monotonic() - failed_since:.0f} s over {', '.join(self.addresses)}]"
        )

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._executor_pid != os.getpid():
                self._executor = ThreadPoolExecutor(self.prefetch_workers, thread_name_prefix="dskd-teacher")
                self._executor_pid = os.getpid()
            return self._executor

    def _prompt_groups(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[list[int]]]:
        groups: list[list[list[int]]] = [[]]
        longest = 0
        for prompt in prompts:
            width = max(longest, len(prompt)) + max_new_tokens
            if groups[-1] and (len(groups[-1]) + 1) * width > self.limits.max_batch_tokens:
                groups.append([])
                longest = 0
            groups[-1].append(prompt)
            longest = max(longest, len(prompt))
        return groups


def _parse_addresses(addresses: str | list[str]) -> list[str]:
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    items = [a.strip() for a in items if a and a.strip()]
    if not items:
        raise TeacherError("no teacher address given; pass host:port (or a list of them)")
    for a in items:
        if ":" not in a:
            raise TeacherError(f"teacher address {a!r} has no port; write host:port, e.g. 127.0.0.1:50051")
    return items


def _read_ca(path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TeacherError(
            f"tls_ca_file {path}: cannot read it ({error.strerror}); give the PEM certificate that signed the server's"
        ) from None


def _unpack(tokens: pb.PackedTokens) -> list[list[int]]:
    ids = int32_array(tokens.ids).tolist()
    out, start = [], 0
    for length in tokens.lengths:
        out.append(ids[start : start + length])
        start += length
    return out
