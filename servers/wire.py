"""Tensors and token batches on the wire: raw little-endian bytes, cut into parts and put back together.

Both sides of the protocol use these helpers, so the byte layout is written down once. Decoding never loops
over elements: a received tensor is assembled into one preallocated `bytearray` (each part's `data` is read
exactly once, because with the upb backend every read of a bytes field is a fresh copy) and viewed with
`torch.frombuffer`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dskd.protos import teacher_pb2 as pb

MIB = 1 << 20
PART_BYTES = 4 * MIB - 64 * 1024
"""Payload bytes per TensorPart: 4 MiB less headroom for the message's own fields, so every message of the
protocol fits gRPC's default 4 MiB receive limit and third-party clients work without raising it."""
MAX_MESSAGE_BYTES = 64 * MIB
"""Send/receive limit set on both ends: bounded, so a bad peer cannot make the other allocate gigabytes."""

WIRE_DTYPES = {pb.BF16: torch.bfloat16, pb.FP16: torch.float16, pb.FP32: torch.float32, pb.INT32: torch.int32}
DTYPE_NAMES = {
    "bfloat16": pb.BF16,
    "bf16": pb.BF16,
    "float16": pb.FP16,
    "fp16": pb.FP16,
    "float32": pb.FP32,
    "fp32": pb.FP32,
}
_LITTLE_ENDIAN = sys.byteorder == "little"


def wire_dtype(name: str) -> int:
    """The `DType` enum value of a user-facing dtype name ("bfloat16", "float32", ...)."""
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}; use one of {sorted(DTYPE_NAMES)}") from None


def dtype_enum(dtype: torch.dtype) -> int:
    for enum, torch_dtype in WIRE_DTYPES.items():
        if torch_dtype == dtype:
            return enum
    raise ValueError(f"{dtype} has no wire representation; use bfloat16, float16, float32 or int32")


def tensor_bytes(tensor: torch.Tensor, dtype: int) -> bytes:
    """Raw little-endian, row-major bytes of `tensor` cast to the wire `dtype` (one host copy)."""
    # Cast where the tensor lives, then copy: a bf16 answer from a GPU crosses the bus at half the size.
    t = tensor.detach().to(WIRE_DTYPES[dtype]).to("cpu").contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        # numpy has no bfloat16: reinterpret the 2-byte words, which keeps the exact bit patterns.
        array = t.view(torch.int16).numpy()
    else:
        array = t.numpy()
    if not _LITTLE_ENDIAN:
        array = array.byteswap()
    return array.tobytes()


def bytes_tensor(data: bytes | bytearray, dtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """View wire bytes as a tensor of `shape` (no copy for a writable buffer; a copy for immutable `bytes`)."""
    torch_dtype = WIRE_DTYPES[dtype]
    if len(data) == 0:
        return torch.zeros(shape, dtype=torch_dtype)
    buffer = data if isinstance(data, bytearray) else bytearray(data)  # frombuffer warns on read-only memory
    t = torch.frombuffer(buffer, dtype=torch_dtype)
    if not _LITTLE_ENDIAN:
        t = t.view(torch.uint8).reshape(-1, t.element_size()).flip(-1).reshape(-1).view(torch_dtype)
    return t.reshape(shape)


def tensor_spec(name: str, dtype: int, shape: tuple[int, ...], data: bytes, *, checksum: bool = False) -> pb.TensorSpec:
    spec = pb.TensorSpec(name=name, dtype=dtype, shape=list(shape), nbytes=len(data))
    if checksum:
        spec.sha256 = hashlib.sha256(data).digest()
    return spec


def iter_parts(name: str, data: bytes, part_bytes: int = PART_BYTES) -> Iterator[pb.TensorPart]:
    """`data` as TensorParts of at most `part_bytes`, in offset order (an empty tensor sends no part)."""
    view = memoryview(data)
    for offset in range(0, len(data), part_bytes):
        # bytes fields refuse memoryviews, so each part costs one copy of its slice; the whole payload is
        # never duplicated at once.
        yield pb.TensorPart(name=name, offset=offset, data=bytes(view[offset : offset + part_bytes]))


class WireFormatError(ValueError):
    """A peer sent parts that do not match the announced specs (a protocol bug, or a broken stream)."""


class TensorAssembler:
    """Collects the parts of the tensors announced in a header into one buffer each, in order, without gaps."""

    def __init__(self, specs) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.order = [spec.name for spec in specs]
        expected = {}
        for spec in specs:
            itemsize = WIRE_DTYPES[spec.dtype].itemsize if spec.dtype in WIRE_DTYPES else 0
            count = int(np.prod(list(spec.shape), dtype=np.int64)) if len(spec.shape) else 1
            if itemsize == 0 or count * itemsize != spec.nbytes:
                raise WireFormatError(
                    f"tensor {spec.name!r}: dtype {spec.dtype} and shape {list(spec.shape)} do not give {spec.nbytes} bytes"
                )
            expected[spec.name] = spec.nbytes
        self.buffers = {name: bytearray(size) for name, size in expected.items()}
        self.filled = dict.fromkeys(expected, 0)

    def add(self, part: pb.TensorPart) -> None:
        name = part.name
        if name not in self.buffers:
            raise WireFormatError(f"part for unannounced tensor {name!r}")
        data = part.data  # read the field once: every access copies
        if part.offset != self.filled[name] or part.offset + len(data) > len(self.buffers[name]):
            raise WireFormatError(
                f"tensor {name!r}: part at offset {part.offset} (+{len(data)}) does not continue at {self.filled[name]}"
            )
        self.buffers[name][part.offset : part.offset + len(data)] = data
        self.filled[name] += len(data)

    def missing(self) -> list[str]:
        return [name for name in self.order if self.filled[name] != len(self.buffers[name])]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The completed tensors, in their wire dtypes; raises when any is incomplete."""
        missing = self.missing()
        if missing:
            raise WireFormatError(f"stream ended before tensors {missing} were complete")
        out = {}
        for name in self.order:
            spec = self.specs[name]
            out[name] = bytes_tensor(self.buffers[name], spec.dtype, tuple(int(s) for s in spec.shape))
        return out

    def verify_checksums(self) -> None:
        for name in self.order:
            expected = self.specs[name].sha256
            if expected and hashlib.sha256(self.buffers[name]).digest() != expected:
                raise WireFormatError(f"tensor {name!r}: sha256 does not match the announced checksum")


@dataclass(frozen=True)
class Packed:
    """Sequences without padding: int32 ids concatenated, with one length per sequence."""

    ids: np.ndarray  # (sum(lengths),) int32
    lengths: np.ndarray  # (num_sequences,) int64

    def sequences(self) -> list[list[int]]:
        return [seq.tolist() for seq in np.split(self.ids, np.cumsum(self.lengths)[:-1])] if len(self.lengths) else []


def pack_sequences(sequences: list[list[int]]) -> pb.PackedTokens:
    lengths = [len(s) for s in sequences]
    ids = np.fromiter((i for s in sequences for i in s), dtype="<i4", count=sum(lengths))
    return pb.PackedTokens(ids=ids.tobytes(), lengths=lengths)


def int32_bytes(values: np.ndarray | torch.Tensor) -> bytes:
    array = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return np.ascontiguousarray(array, dtype="<i4").tobytes()


def int32_array(data: bytes) -> np.ndarray:
    """int32 little-endian bytes as a native int64 array (ids and positions are used as indices)."""
    return np.frombuffer(data, dtype="<i4").astype(np.int64)
