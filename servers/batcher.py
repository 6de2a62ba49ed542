"""The model worker: one thread owns the model and merges queued requests into one forward.

gRPC handlers never touch the model; they put a job on a bounded queue and wait on its future. The worker
takes the oldest job and, when batching is on, every further Score job already waiting whose sequences still
fit the token budget (sequences x longest length, the padded size of the forward), runs one forward through
`dskd.models.teacher.compute_signal`, and splits the result back per job. Nothing waits for a batch to fill: under
load the queue fills by itself while the previous forward runs, and an idle server answers at once.

Each job may ask for a different top-k; the forward computes the largest, and a smaller one is cut from it
with its tail mass folded back in (`shrink_topk`), which is exact up to fp32 rounding.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import reduce

import torch

from dskd.kit.lm_head import LMHead
from dskd.models.generation import sample_continuations
from dskd.models.teacher import compute_signal
from dskd.protos import teacher_pb2 as pb
from dskd.servers.validation import GenerateInput, ScoreInput
from dskd.servers.wire import tensor_bytes
from dskd.types import SignalRequest


class QueueFullError(RuntimeError):
    """The worker's queue is full: the server is overloaded (RESOURCE_EXHAUSTED, the client may back off)."""


class DeadlineExpiredError(RuntimeError):
    """The job's deadline passed while it waited in the queue, so it was dropped unrun."""


@dataclass(frozen=True)
class EncodedTensor:
    name: str
    dtype: int
    shape: tuple[int, ...]
    data: bytes


@dataclass
class ScoreResult:
    tensors: list[EncodedTensor]
    rows_per_sequence: list[int]
    queue_ns: int = 0
    forward_ns: int = 0
    encode_ns: int = 0
    batch_requests: int = 1
    batch_tokens: int = 0


@dataclass
class _Job:
    future: Future = field(default_factory=Future)
    deadline: float | None = None  # time.monotonic() after which nobody waits for the answer
    enqueued: int = field(default_factory=time.perf_counter_ns)


@dataclass
class ScoreJob(_Job):
    input: ScoreInput | None = None


@dataclass
class GenerateJob(_Job):
    input: GenerateInput | None = None


_STOP = object()


def shrink_topk(
    ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`k` of a larger, descending top-K (`k <= K`): the dropped entries join the tail mass."""
    if k >= ids.shape[1]:
        return ids, logprobs, tail
    dropped = torch.cat([tail.unsqueeze(1), logprobs[:, k:]], dim=1)
    return ids[:, :k], logprobs[:, :k], torch.logsumexp(dropped, dim=1)


class ModelWorker:
    """Owns `model`; runs Score and Generate jobs from a bounded queue on one thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        head: LMHead,
        tokenizer,
        *,
        max_batch_tokens: int,
        batching: bool = True,
        max_queue: int = 1024,
        chunk_rows: int = 1024,
    ) -> None:
        self.model = model
        self.head = head
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.batching = batching
        self.chunk_rows = chunk_rows
        self.device = head.weight.device
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._pending: object | None = None
        self._thread = threading.Thread(target=self._run, name="dskd-model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every job queued so far, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def submit(self, job: _Job) -> Future:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the model worker's queue is full ({self._queue.maxsize} jobs); retry later"
            ) from None
        return job.future

    def warm_up(self, num_tokens: int, seq_len: int) -> None:
        """One forward at the full token budget, so a budget that does not fit fails at start-up.

        The LM head and top-k run on one chunk of rows only: serving runs them chunk by chunk, so one chunk
        already reaches their peak memory, and all rows at a 151k vocabulary took 40-75 s on CPU."""
        seq_len = max(1, min(seq_len, num_tokens))
        rows = max(1, num_tokens // seq_len)
        ids = torch.arange(rows * seq_len, dtype=torch.int64).remainder(self.head.vocab_size).reshape(rows, seq_len)
        mask = torch.ones_like(ids)
        flat = torch.arange(min(rows * seq_len, self.chunk_rows), dtype=torch.int64)
        request = SignalRequest(hidden_states=True, top_k=min(8, self.head.vocab_size))
        compute_signal(
            self.model,
            self.head,
            ids.to(self.device),
            mask.to(self.device),
            flat.to(self.device),
            request,
            chunk_rows=self.chunk_rows,
        )

    # -- the worker thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is _STOP:
                return
            if not self._claim(job):
                continue
            if isinstance(job, GenerateJob):
                self._generate(job)
                continue
            batch = [job]
            if self.batching:
                batch += self._gather(job)
            self._score(batch)

    def _next(self) -> object:
        if self._pending is not None:
            job, self._pending = self._pending, None
            return job
        return self._queue.get()

    def _claim(self, job: _Job) -> bool:
        """Mark the job running unless it was cancelled or its deadline already passed."""
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.future.set_exception(DeadlineExpiredError("the request's deadline passed while it was queued"))
            return False
        return True

    def _gather(self, first: ScoreJob) -> list[ScoreJob]:
        """Further queued Score jobs that fit the token budget together with `first`."""
        sequences = len(first.input.tokens.lengths)
        longest = int(first.input.tokens.lengths.max())
        more: list[ScoreJob] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return more
            if isinstance(job, ScoreJob):
                n = sequences + len(job.input.tokens.lengths)
                width = max(longest, int(job.input.tokens.lengths.max()))
                if n * width <= self.max_batch_tokens:
                    if self._claim(job):
                        more.append(job)
                        sequences, longest = n, width
                    continue
            self._pending = job  # a Generate job, the stop marker, or a Score job that does not fit
            return more

    def _score(self, jobs: list[ScoreJob]) -> None:
        started = time.perf_counter_ns()
        try:
            ids, mask, rows = self._merge(jobs)
            request = reduce(SignalRequest.merge, (job.input.request for job in jobs))
            signal = compute_signal(
                self.model,
                self.head,
                ids.to(self.device),
                mask.to(self.device),
                rows.to(self.device),
                request,
                chunk_rows=self.chunk_rows,
            )
        except Exception as error:  # one failed forward fails its jobs, never the worker
            for job in jobs:
                job.future.set_exception(error)
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            return
        forward_ns = time.perf_counter_ns() - started
        batch_tokens = int(ids.numel())
        start = 0
        for job in jobs:
            end = start + job.input.num_rows
            encode_started = time.perf_counter_ns()
            try:
                tensors = self._encode(signal, start, end, job.input)
            except Exception as error:
                job.future.set_exception(error)
            else:
                job.future.set_result(
                    ScoreResult(
                        tensors=tensors,
                        rows_per_sequence=job.input.counts.tolist(),
                        queue_ns=started - job.enqueued,
                        forward_ns=forward_ns,
                        encode_ns=time.perf_counter_ns() - encode_started,
                        batch_requests=len(jobs),
                        batch_tokens=batch_tokens,
                    )
                )
            start = end

    @staticmethod
    def _merge(jobs: list[ScoreJob]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded `(B, T)` ids and mask of all jobs' sequences, and every job's rows as flat `b * T + p`."""
        lengths = torch.cat([torch.from_numpy(job.input.tokens.lengths) for job in jobs])
        width = int(lengths.max())
        mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        ids = torch.zeros(mask.shape, dtype=torch.int64)  # padding id 0 is never attended to
        ids[mask] = torch.cat([torch.from_numpy(job.input.tokens.ids) for job in jobs])
        rows, first_seq = [], 0
        for job in jobs:
            counts = torch.from_numpy(job.input.counts)
            seq = first_seq + torch.repeat_interleave(torch.arange(len(counts)), counts)
            rows.append(seq * width + torch.from_numpy(job.input.positions))
            first_seq += len(counts)
        return ids, mask.to(torch.int64), torch.cat(rows)

    @staticmethod
    def _encode(signal, start: int, end: int, job: ScoreInput) -> list[EncodedTensor]:
        out = []
        dtype = job.wire_dtype
        if job.request.hidden_states:
            hidden = signal.hidden_states[start:end]
            out.append(EncodedTensor("hidden_states", dtype, tuple(hidden.shape), tensor_bytes(hidden, dtype)))
        if job.request.top_k:
            ids, logprobs, tail = shrink_topk(
                signal.topk_ids[start:end],
                signal.topk_logprobs[start:end],
                signal.tail_logmass[start:end],
                job.request.top_k,
            )
            out.append(EncodedTensor("topk_ids", pb.INT32, tuple(ids.shape), tensor_bytes(ids, pb.INT32)))
            out.append(EncodedTensor("topk_logprobs", dtype, tuple(logprobs.shape), tensor_bytes(logprobs, dtype)))
            out.append(EncodedTensor("tail_logmass", pb.FP32, tuple(tail.shape), tensor_bytes(tail, pb.FP32)))
        if job.request.logits:
            logits = signal.logits[start:end]
            out.append(EncodedTensor("logits", dtype, tuple(logits.shape), tensor_bytes(logits, dtype)))
        return out

    def _generate(self, job: GenerateJob) -> None:
        try:
            g = job.input
            result = sample_continuations(
                self.model,
                self.tokenizer,
                g.prompts,
                max_new_tokens=g.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
                seed=g.seed,
            )
        except Exception as error:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
