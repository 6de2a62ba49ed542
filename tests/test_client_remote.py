"""`RemoteTeacher` against real servers: it answers exactly like `LocalTeacher` on the same model."""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import torch
from teacher_server_harness import save_tiny_teacher, start_servers, stop_servers

from dskd.errors import TeacherError
from dskd.models.teacher import LocalTeacher, Teacher
from dskd.servers.client import RemoteTeacher
from dskd.types import SignalRequest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("client")
    model_dir = save_tiny_teacher(root / "model", seed=0)
    other_dir = save_tiny_teacher(root / "other", seed=1)
    first, second, other = start_servers(
        [(model_dir, (), "first"), (model_dir, (), "second"), (other_dir, (), "other")], root
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    local = LocalTeacher(model, AutoTokenizer.from_pretrained(model_dir))
    yield {"first": first, "second": second, "other": other, "local": local, "model": model}
    assert stop_servers([first, second, other]) == [0, 0, 0]


@pytest.fixture
def remote(setup, tmp_path):
    with RemoteTeacher(setup["first"].address, cache_dir=tmp_path) as teacher:
        yield teacher


def batch(seed: int = 0, shape=(3, 24)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, shape, generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    valid = torch.nonzero(mask.reshape(-1)).reshape(-1)
    rows = valid[torch.randperm(valid.numel(), generator=generator)[: valid.numel() // 2]].sort().values
    return ids, mask, rows


def test_handshake_gives_the_teacher_interface_of_the_local_model(setup, remote):
    local = setup["local"]
    assert isinstance(remote, Teacher)
    assert remote.fingerprint == local.fingerprint
    assert (remote.hidden_size, remote.vocab_size) == (local.hidden_size, local.vocab_size)
    assert {"hidden_states", "top_k", "generate"} <= remote.capabilities
    text = "Distillation keeps the teacher's knowledge.\nÜber 2 lines"
    assert remote.tokenizer(text)["input_ids"] == local.tokenizer(text)["input_ids"]
    assert torch.equal(remote.head.weight, local.head.weight)  # fp32 teacher: the head arrives bit for bit
    assert remote.head.bias is None and remote.head.scale == 1.0 and remote.head.softcap == 0.0


def test_score_over_bf16_wire_matches_the_local_teacher(setup, remote):
    ids, mask, rows = batch()
    request = SignalRequest(hidden_states=True, top_k=16)
    got = remote.score(ids, mask, rows, request)
    want = setup["local"].score(ids, mask, rows, request)
    assert torch.equal(got.rows_per_sequence, want.rows_per_sequence)
    assert got.hidden_states.dtype == torch.float32
    # bf16 keeps 8 significant bits: each value within half a unit in the last place.
    assert torch.allclose(got.hidden_states, want.hidden_states, rtol=2**-8, atol=1e-6)
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert torch.allclose(got.topk_logprobs, want.topk_logprobs, rtol=2**-8, atol=1e-6)
    assert got.fingerprint == want.fingerprint


def test_tail_mass_matches_a_dense_reference(setup, remote):
    ids, mask, rows = batch(1)
    got = remote.score(ids, mask, rows, SignalRequest(top_k=16))
    with torch.no_grad():
        logits = setup["model"](input_ids=ids, attention_mask=mask).logits.reshape(-1, 32000)[rows].double()
    logprobs = logits.log_softmax(-1)
    top = logprobs.gather(1, got.topk_ids)
    reference_tail = torch.log1p(-top.exp().sum(-1))
    torch.testing.assert_close(got.tail_logmass.double(), reference_tail, atol=1e-5, rtol=1e-5)


def test_score_over_fp32_wire_is_exact_up_to_float_rounding(setup, tmp_path):
    ids, mask, rows = batch(2)
    request = SignalRequest(hidden_states=True, top_k=8, logits=True)
    with RemoteTeacher(setup["first"].address, cache_dir=tmp_path, wire_dtype="float32") as teacher:
        got = teacher.score(ids, mask, rows, request)
    want = setup["local"].score(ids, mask, rows, request)
    torch.testing.assert_close(got.hidden_states, want.hidden_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.tail_logmass, want.tail_logmass, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.topk_ids, want.topk_ids)


def test_rows_in_any_order_come_back_in_that_order(setup, remote):
    ids, mask, rows = batch(3)
    shuffled = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))]
    got = remote.score(ids, mask, shuffled, SignalRequest(top_k=4))
    want = setup["local"].score(ids, mask, shuffled, SignalRequest(top_k=4))
    assert torch.equal(got.topk_ids, want.topk_ids)


def test_prefetched_score_equals_the_direct_one(remote):
    ids, mask, rows = batch(4)
    request = SignalRequest(hidden_states=True, top_k=4)
    future = remote.score_async(ids, mask, rows, request)
    ids.zero_()  # the batch was packed before score_async returned, so the caller may reuse its tensors
    direct = remote.score(*batch(4), request)
    assert torch.equal(future.result(timeout=60).hidden_states, direct.hidden_states)


def _score_in_child(teacher, ids, queue):
    queue.put(
        teacher.score(ids, torch.ones_like(ids), torch.arange(ids.numel()), SignalRequest(top_k=4)).topk_ids.tolist()
    )


def test_client_made_before_fork_works_in_the_child(remote):
    ids = torch.tensor([[1, 450, 4996, 17354]])
    parent = remote.score(ids, torch.ones_like(ids), torch.arange(4), SignalRequest(top_k=4)).topk_ids.tolist()
    context = multiprocessing.get_context("fork")  # what DataLoader workers and torch.multiprocessing use
    queue = context.Queue()
    child = context.Process(target=_score_in_child, args=(remote, ids, queue))
    child.start()
    try:
        assert queue.get(timeout=60) == parent  # the child opened its own channel
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert remote.score(ids, torch.ones_like(ids), torch.arange(4), SignalRequest(top_k=4)).topk_ids.tolist() == parent


def test_generate_matches_the_local_teacher(setup, remote):
    prompts = [[1, 450, 4996], [1, 22172, 29892, 920]]
    for temperature in (0.0, 1.0):
        got = remote.generate(prompts, max_new_tokens=6, temperature=temperature, seed=5)
        assert got == setup["local"].generate(prompts, max_new_tokens=6, temperature=temperature, seed=5)


def test_batches_are_spread_over_both_replicas(setup, tmp_path):
    addresses = [setup["first"].address, setup["second"].address]
    with RemoteTeacher(addresses, cache_dir=tmp_path) as teacher:
        ids, mask, rows = batch(5)
        served = [teacher.score(ids, mask, rows, SignalRequest(top_k=4)).timings["replicas"][0] for _ in range(4)]
    assert set(served) == {
        f"{socket.gethostname()}:{setup['first'].port}",
        f"{socket.gethostname()}:{setup['second'].port}",
    }


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_replica_is_skipped_and_no_batch_fails(setup, tmp_path):
    dead = f"127.0.0.1:{_closed_port()}"
    with RemoteTeacher([dead, setup["first"].address], cache_dir=tmp_path, timeout_s=10) as teacher:
        ids, mask, rows = batch(6)
        for _ in range(3):
            signal = teacher.score(ids, mask, rows, SignalRequest(top_k=4))
            assert signal.timings["replicas"] == [f"{socket.gethostname()}:{setup['first'].port}"]


def test_replica_serving_a_different_model_is_refused(setup, tmp_path):
    with pytest.raises(TeacherError, match="teacher replicas differ") as info:
        RemoteTeacher([setup["first"].address, setup["other"].address], cache_dir=tmp_path)
    assert setup["first"].address in str(info.value) and setup["other"].address in str(info.value)


def test_second_connect_reads_tokenizer_and_head_from_the_cache(setup, tmp_path):
    with RemoteTeacher(setup["first"].address, cache_dir=tmp_path) as first:
        assert first.head_source == "server"
    with RemoteTeacher(setup["second"].address, cache_dir=tmp_path) as second:
        assert second.head_source == "cache"  # same fingerprint on another replica: still a hit
        assert torch.equal(second.head.weight, first.head.weight)
    blob = next((tmp_path / "teachers" / first.fingerprint).glob("head-*.lm_head.weight.bin"))
    blob.write_bytes(b"\0" * blob.stat().st_size)  # corrupted cache: detected by checksum and fetched again
    with RemoteTeacher(setup["first"].address, cache_dir=tmp_path) as third:
        assert third.head_source == "server"
        assert torch.equal(third.head.weight, first.head.weight)


def test_head_that_does_not_reproduce_the_servers_top_k_is_refused(remote):
    remote.head.weight = remote.head.weight.flip(0)
    with pytest.raises(TeacherError, match="does not reproduce its top-8"):
        remote.check_head()


def test_unreachable_teacher_is_a_teacher_error_naming_the_address(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(
        TeacherError,
        match=rf"teacher at {address}: the handshake \(GetInfo\) failed with UNAVAILABLE.*serve_teacher.py running",
    ):
        RemoteTeacher(address, cache_dir=tmp_path, timeout_s=5)


def test_deadline_is_a_teacher_error_with_a_hint(remote):
    remote.timeout_s = 1e-4
    ids, mask, rows = batch(7)
    with pytest.raises(TeacherError, match="DEADLINE_EXCEEDED.*raise timeout_s"):
        remote.score(ids, mask, rows, SignalRequest(hidden_states=True))


def test_bad_arguments_are_refused_before_any_call(tmp_path):
    with pytest.raises(TeacherError, match="wire_dtype"):
        RemoteTeacher("127.0.0.1:1", wire_dtype="int8", cache_dir=tmp_path)
    with pytest.raises(TeacherError, match="has no port"):
        RemoteTeacher("localhost", cache_dir=tmp_path)
    with pytest.raises(TeacherError, match="timeout_s"):
        RemoteTeacher("127.0.0.1:1", timeout_s=0, cache_dir=tmp_path)
