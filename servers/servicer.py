"""The `dskd.teacher.v1.Teacher` service on a grpc.aio server.

Handlers run on the event loop and stay cheap: they validate, hand Score and Generate work to the
`ModelWorker` thread, and stream its encoded bytes back in parts. Reading the LM head for `FetchHead` is a
copy of a few hundred megabytes for a large vocabulary, so it runs in a helper thread too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

import dskd
from dskd.protos import teacher_pb2 as pb
from dskd.protos import teacher_pb2_grpc as pb_grpc
from dskd.servers.batcher import (
    DeadlineExpiredError,
    GenerateJob,
    ModelWorker,
    QueueFullError,
    ScoreJob,
)
from dskd.servers.validation import (
    RequestError,
    ServerLimits,
    validate_generate,
    validate_score,
)
from dskd.servers.wire import (
    PART_BYTES,
    dtype_enum,
    iter_parts,
    pack_sequences,
    tensor_bytes,
    tensor_spec,
)

log = logging.getLogger("dskd.serve_teacher")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
PROTOCOL_VERSION = pb.DESCRIPTOR.package
CAPABILITIES = ("hidden_states", "top_k", "logits", "generate")


@dataclass(frozen=True)
class TeacherDescription:
    """Facts about the served model that `GetInfo` reports (everything but the limits)."""

    model_id: str
    revision: str
    fingerprint: str
    tokenizer_fingerprint: str
    compute_dtype: torch.dtype
    num_layers: int
    lm_head_rows: int
    bos_id: int
    eos_id: int
    pad_id: int
    replica_id: str


def _special_id(value) -> int:
    return -1 if value is None else int(value)


def describe(
    model: torch.nn.Module,
    tokenizer,
    *,
    model_id: str,
    revision: str,
    fingerprint: str,
    tokenizer_fingerprint: str,
    replica_id: str,
) -> TeacherDescription:
    config = model.config
    return TeacherDescription(
        model_id=model_id,
        revision=revision,
        fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        compute_dtype=next(model.parameters()).dtype,
        num_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        lm_head_rows=int(model.get_output_embeddings().weight.shape[0]),
        bos_id=_special_id(tokenizer.bos_token_id),
        eos_id=_special_id(tokenizer.eos_token_id),
        pad_id=_special_id(tokenizer.pad_token_id),
        replica_id=replica_id,
    )


class TeacherServicer(pb_grpc.TeacherServicer):
    def __init__(
        self, worker: ModelWorker, description: TeacherDescription, limits: ServerLimits, tokenizer_dir: Path
    ) -> None:
        self.worker = worker
        self.head = worker.head
        self.description = description
        self.limits = limits
        self.tokenizer_dir = Path(tokenizer_dir)

    async def GetInfo(self, request, context):
        d, lim, head = self.description, self.limits, self.head
        return pb.TeacherInfo(
            protocol_version=PROTOCOL_VERSION,
            server_version=dskd.__version__,
            capabilities=list(CAPABILITIES),
            model_id=d.model_id,
            revision=d.revision,
            fingerprint=d.fingerprint,
            compute_dtype=dtype_enum(d.compute_dtype),
            hidden_size=head.hidden_size,
            num_layers=d.num_layers,
            lm_head_rows=d.lm_head_rows,
            tokenizer_size=head.vocab_size,
            lm_head_has_bias=head.bias is not None,
            logit_scale=head.scale,
            final_logit_softcap=head.softcap,
            bos_id=d.bos_id,
            eos_id=d.eos_id,
            pad_id=d.pad_id,
            max_seq_len=lim.max_seq_len,
            max_batch_tokens=lim.max_batch_tokens,
            max_top_k=min(lim.max_top_k, head.vocab_size),
            max_response_bytes=lim.max_response_bytes,
            max_message_bytes=lim.max_message_bytes,
            part_bytes=PART_BYTES,
            tokenizer_fingerprint=d.tokenizer_fingerprint,
            replica_id=d.replica_id,
            max_new_tokens=lim.max_new_tokens,
        )

    async def FetchTokenizer(self, request, context):
        for path in sorted(p for p in self.tokenizer_dir.iterdir() if p.is_file()):
            data = await asyncio.to_thread(path.read_bytes)
            digest = hashlib.sha256(data).digest()
            offsets = range(0, max(len(data), 1), PART_BYTES)
            for offset in offsets:
                chunk = data[offset : offset + PART_BYTES]
                last = offset + PART_BYTES >= len(data)
                yield pb.FileChunk(path=path.name, offset=offset, data=chunk, total=len(data), sha256=digest, last=last)

    async def FetchHead(self, request, context):
        dtype = request.dtype or dtype_enum(self.head.weight.dtype)
        if dtype not in (pb.BF16, pb.FP16, pb.FP32):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"dtype: value {request.dtype} is not BF16 (1), FP16 (2) or FP32 (3)"
            )
        tensors = [("lm_head.weight", self.head.weight)]
        if self.head.bias is not None:
            tensors.append(("lm_head.bias", self.head.bias))
        encoded = [(name, tuple(t.shape), await asyncio.to_thread(tensor_bytes, t, dtype)) for name, t in tensors]
        specs = await asyncio.to_thread(
            lambda: [tensor_spec(name, dtype, shape, data, checksum=True) for name, shape, data in encoded]
        )
        yield pb.HeadPart(
            header=pb.HeadHeader(
                fingerprint=self.description.fingerprint,
                tensors=specs,
                scale=self.head.scale,
                softcap=self.head.softcap,
            )
        )
        for name, _, data in encoded:
            for part in iter_parts(name, data):
                yield pb.HeadPart(tensor=part)

    async def Score(self, request, context):
        try:
            job_input = validate_score(request, self.limits)
        except RequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        await self._check_fingerprint(request.expected_fingerprint, context)
        result = await self._run(ScoreJob(input=job_input, deadline=_deadline(context)), context)
        yield pb.ScorePart(
            header=pb.ScoreHeader(
                request_id=request.request_id,
                fingerprint=self.description.fingerprint,
                replica_id=self.description.replica_id,
                tensors=[
                    pb.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape), nbytes=len(t.data))
                    for t in result.tensors
                ],
                rows_per_sequence=result.rows_per_sequence,
            )
        )
        for tensor in result.tensors:
            for part in iter_parts(tensor.name, tensor.data):
                yield pb.ScorePart(tensor=part)
        yield pb.ScorePart(
            trailer=pb.ScoreTrailer(
                queue_ns=result.queue_ns,
                forward_ns=result.forward_ns,
                encode_ns=result.encode_ns,
                num_tokens=job_input.num_tokens,
                batch_requests=result.batch_requests,
                batch_tokens=result.batch_tokens,
            )
        )

    async def Generate(self, request, context):
        try:
            job_input = validate_generate(request, self.limits)
        except RequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        await self._check_fingerprint(request.expected_fingerprint, context)
        sequences = await self._run(GenerateJob(input=job_input, deadline=_deadline(context)), context)
        return pb.GenerateResponse(
            request_id=request.request_id, fingerprint=self.description.fingerprint, tokens=pack_sequences(sequences)
        )

    async def _check_fingerprint(self, expected: str, context) -> None:
        if expected and expected != self.description.fingerprint:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"expected_fingerprint {expected} is not this server's {self.description.fingerprint}; reconnect to re-read GetInfo",
            )

    async def _run(self, job, context):
        try:
            future = self.worker.submit(job)
        except QueueFullError as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        try:
            return await asyncio.wrap_future(future)
        except DeadlineExpiredError as error:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
        except torch.cuda.OutOfMemoryError:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the teacher ran out of accelerator memory; send smaller batches or lower --max-batch-tokens",
            )
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:  # a model failure is the server's fault, reported as such, never as data
            log.exception("teacher forward failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"teacher forward failed: {type(error).__name__}: {error}")


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
