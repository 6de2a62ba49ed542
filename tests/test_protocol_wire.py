"""Wire encoding: raw little-endian bytes, parts of at most PART_BYTES, reassembly, and packed token batches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from dskd.protos import teacher_pb2 as pb
from dskd.servers.wire import (
    PART_BYTES,
    TensorAssembler,
    WireFormatError,
    bytes_tensor,
    int32_array,
    iter_parts,
    pack_sequences,
    tensor_bytes,
    tensor_spec,
)


def _bf16_bits_numpy(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns by round-to-nearest-even on the fp32 bits (independent of torch's cast)."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def test_bf16_bytes_are_round_to_nearest_even_of_fp32_little_endian():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100
    data = tensor_bytes(torch.from_numpy(values), pb.BF16)
    assert len(data) == 2 * values.size
    assert np.array_equal(np.frombuffer(data, dtype="<u2"), _bf16_bits_numpy(values))


@pytest.mark.parametrize("dtype", [pb.BF16, pb.FP32, pb.FP16, pb.INT32])
def test_bytes_round_trip_keeps_shape_and_values(dtype):
    source = torch.randn(7, 5) * 10
    if dtype == pb.INT32:
        source = source.round()
    data = tensor_bytes(source, dtype)
    back = bytes_tensor(data, dtype, (7, 5))
    cast = {pb.BF16: torch.bfloat16, pb.FP32: torch.float32, pb.FP16: torch.float16, pb.INT32: torch.int32}[dtype]
    assert back.dtype == cast
    assert torch.equal(back, source.to(cast))


def test_fp32_bytes_are_little_endian_ieee():
    values = np.array([1.0, -2.5, 3.25e-5], dtype=np.float32)
    assert tensor_bytes(torch.from_numpy(values), pb.FP32) == values.astype("<f4").tobytes()


def test_parts_are_bounded_and_reassemble_to_the_original():
    data = np.random.default_rng(1).integers(0, 256, size=2 * PART_BYTES + 12345, dtype=np.uint8).tobytes()
    parts = list(iter_parts("x", data))
    assert [len(p.data) for p in parts] == [PART_BYTES, PART_BYTES, 12345]
    assert all(p.ByteSize() <= 4 * 1024 * 1024 for p in parts)
    whole = data[: len(data) - len(data) % 4]
    assembler = TensorAssembler([pb.TensorSpec(name="x", dtype=pb.INT32, shape=[len(whole) // 4], nbytes=len(whole))])
    for part in iter_parts("x", whole):
        assembler.add(part)
    (out,) = assembler.tensors().values()
    assert out.numpy().tobytes() == whole


def _assembler(nbytes=16):
    return TensorAssembler([pb.TensorSpec(name="t", dtype=pb.FP32, shape=[nbytes // 4], nbytes=nbytes)])


def test_assembler_rejects_parts_out_of_order():
    assembler = _assembler()
    with pytest.raises(WireFormatError, match="does not continue"):
        assembler.add(pb.TensorPart(name="t", offset=8, data=b"\0" * 8))


def test_assembler_rejects_parts_past_the_announced_size():
    assembler = _assembler()
    with pytest.raises(WireFormatError, match="does not continue"):
        assembler.add(pb.TensorPart(name="t", offset=0, data=b"\0" * 20))


def test_assembler_rejects_unannounced_tensors():
    with pytest.raises(WireFormatError, match="unannounced"):
        _assembler().add(pb.TensorPart(name="other", offset=0, data=b"\0" * 4))


def test_assembler_refuses_incomplete_tensors():
    assembler = _assembler()
    assembler.add(pb.TensorPart(name="t", offset=0, data=b"\0" * 8))
    assert assembler.missing() == ["t"]
    with pytest.raises(WireFormatError, match="before tensors"):
        assembler.tensors()


def test_assembler_rejects_specs_whose_size_does_not_match_shape():
    with pytest.raises(WireFormatError, match="do not give"):
        TensorAssembler([pb.TensorSpec(name="t", dtype=pb.BF16, shape=[3, 2], nbytes=10)])


def test_checksum_mismatch_is_detected():
    data = tensor_bytes(torch.arange(6.0), pb.FP32)
    spec = tensor_spec("t", pb.FP32, (6,), data, checksum=True)
    assert spec.sha256 == hashlib.sha256(data).digest()
    good = TensorAssembler([spec])
    good.add(pb.TensorPart(name="t", offset=0, data=data))
    good.verify_checksums()
    bad = TensorAssembler([spec])
    bad.add(pb.TensorPart(name="t", offset=0, data=data[:-1] + b"\x01"))
    with pytest.raises(WireFormatError, match="sha256"):
        bad.verify_checksums()


def test_packed_sequences_are_concatenated_int32_without_padding():
    packed = pack_sequences([[5, 6, 7], [1], [9, 10]])
    assert list(packed.lengths) == [3, 1, 2]
    assert packed.ids == np.array([5, 6, 7, 1, 9, 10], dtype="<i4").tobytes()
    assert int32_array(packed.ids).tolist() == [5, 6, 7, 1, 9, 10]


def test_empty_tensor_sends_no_parts_and_decodes_to_empty():
    assert list(iter_parts("e", b"")) == []
    assembler = TensorAssembler([pb.TensorSpec(name="e", dtype=pb.FP32, shape=[0, 4], nbytes=0)])
    assert assembler.tensors()["e"].shape == (0, 4)
