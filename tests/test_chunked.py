"""`chunked_loss` against `dense_loss` of the same function: values, summed statistics and gradients.

The function is DSKDv2-shaped (student-space KD against a detached projection gated by top-1 agreement,
the projector's CE on the teacher's top-1, teacher-space KD through a fixed map, gold CE) and is run with
every registered divergence, unchanged: the chunking knows nothing about the divergence inside it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dual_space_models import assert_rel

import dskd
from dskd.kit.chunked import chunked_loss, dense_loss

N, V, D_S, D_T = 7, 37, 5, 6
DIVERGENCES = dskd.load_registry().divergences
BUILTINS = {
    "forward_kl",
    "reverse_kl",
    "js",
    "tvd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "adaptive_kl",
    "generalized_jsd",
}


def inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(grad)

    rows = {"h_s": randn(N, D_S, grad=True), "h_t": randn(N, D_T), "labels": torch.randint(0, V, (N,), generator=gen)}
    shared = {
        "w_s": randn(V, D_S, scale=2.0, grad=True),
        "t2s": randn(D_S, D_T, scale=0.5, grad=True),
        "a": randn(D_S, D_T, scale=0.5),
        "w_t": randn(V, D_T, scale=2.0),
    }
    return rows, shared


def dskd_like(divergence, temperature: float = 2.0, kd_rate: float = 0.6, denominator: float = 9.0):
    def fn(rows, shared):
        z_s = rows["h_s"].float() @ shared["w_s"].float().T
        z_t = rows["h_t"].float() @ shared["w_t"].float().T
        z_t2s = (rows["h_t"].float() @ shared["t2s"].float().T) @ shared["w_s"].detach().float().T
        top = z_t.argmax(-1)
        agree = z_t2s.argmax(-1) == top
        projector_ce = F.cross_entropy(z_t2s, top, reduction="sum")
        kd_student = (divergence(z_s, z_t2s.detach(), temperature=temperature) * agree).sum()
        z_s2t = (rows["h_s"].float() @ shared["a"].float()) @ shared["w_t"].float().T
        kd_teacher = divergence(z_s2t, z_t, temperature=temperature).sum()
        ce = F.cross_entropy(z_s, rows["labels"], reduction="sum")
        loss = ((1 - kd_rate) * ce + kd_rate * (kd_student + projector_ce + kd_teacher)) / denominator
        return loss, {"ce": ce.detach(), "kd_teacher": kd_teacher.detach(), "n_agree": agree.sum().float()}

    return fn


def trainable(rows, shared):
    return {name: t for name, t in {**rows, **shared}.items() if t.requires_grad}


def test_every_builtin_divergence_is_registered():
    assert BUILTINS <= set(DIVERGENCES)


@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 4])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_chunked_loss_equals_dense_loss_for_every_registered_divergence(name, chunk_size):
    rows, shared = inputs()
    fn = dskd_like(DIVERGENCES[name])
    wanted = trainable(rows, shared)
    dense, dense_stats = dense_loss(fn, rows, shared)
    expected = dict(zip(wanted, torch.autograd.grad(dense, list(wanted.values()))))
    chunked, stats = chunked_loss(fn, rows, shared, chunk_size=chunk_size)
    got = dict(zip(wanted, torch.autograd.grad(chunked, list(wanted.values()))))
    assert_rel(chunked, dense, what="loss")
    assert set(stats) == set(dense_stats)
    for key in stats:
        assert_rel(stats[key], dense_stats[key], what=key)
    for key in expected:
        assert expected[key].abs().max() > 0, key  # each trainable input really is on the gradient path
        assert_rel(got[key], expected[key], what=f"grad {key}")


def test_backward_scales_the_stored_gradients_by_the_incoming_gradient():
    rows, shared = inputs(1)
    fn = dskd_like(DIVERGENCES["forward_kl"])
    loss, _ = chunked_loss(fn, rows, shared, chunk_size=2)
    (3.0 * loss).backward()
    got = {k: t.grad.clone() for k, t in trainable(rows, shared).items()}
    for t in trainable(rows, shared).values():
        t.grad = None
    dense, _ = dense_loss(fn, rows, shared)
    dense.backward()
    for key, t in trainable(rows, shared).items():
        assert_rel(got[key], 3.0 * t.grad, what=key)


def test_a_tensor_captured_from_outside_is_a_constant():
    """The contract: only tensors passed in `rows` or `shared` receive gradients. `chunked_loss` takes each
    chunk's gradients inside its forward, with respect to its own inputs only, so a parameter the function
    closes over is used by value and gets no gradient (while `dense_loss`, plain autograd, would give one)."""
    rows, shared = inputs(2)
    captured = shared.pop("w_s")

    def fn(r, sh):
        z = r["h_s"] @ captured.T
        return F.cross_entropy(z, r["labels"], reduction="sum"), {}

    loss, _ = chunked_loss(fn, rows, shared, chunk_size=3)
    loss.backward()
    assert captured.grad is None
    assert rows["h_s"].grad is not None and rows["h_s"].grad.abs().max() > 0
    dense, _ = dense_loss(fn, rows, shared)
    dense.backward()
    assert captured.grad is not None and captured.grad.abs().max() > 0


def test_low_precision_inputs_get_gradients_of_their_own_dtype():
    rows, shared = inputs(3, torch.bfloat16)
    fn = dskd_like(DIVERGENCES["forward_kl"])
    wanted = trainable(rows, shared)
    loss, _ = chunked_loss(fn, rows, shared, chunk_size=2)
    grads = torch.autograd.grad(loss, list(wanted.values()))
    dense, _ = dense_loss(fn, rows, shared)
    expected = torch.autograd.grad(dense, list(wanted.values()))
    for key, g, e in zip(wanted, grads, expected):
        assert g.dtype == torch.bfloat16, key
        assert_rel(g.float(), e.float(), tol=2e-2, what=key)  # bf16 resolution


def test_no_rows_gives_a_zero_loss_and_zero_gradients():
    rows, shared = inputs(4)
    empty = {k: v[:0].detach().requires_grad_(v.requires_grad) for k, v in rows.items()}
    fn = dskd_like(DIVERGENCES["forward_kl"])
    loss, stats = chunked_loss(fn, empty, shared, chunk_size=4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(stats["n_agree"]) == 0.0
    assert shared["w_s"].grad is not None and shared["w_s"].grad.abs().max() == 0


def test_rows_of_different_lengths_are_refused():
    rows, shared = inputs(5)
    rows["h_t"] = rows["h_t"][:-1]
    with pytest.raises(ValueError, match="'h_t' has 6 rows, expected 7"):
        chunked_loss(dskd_like(DIVERGENCES["forward_kl"]), rows, shared, chunk_size=2)


def test_auto_chunk_rows_bound_the_buffer_by_vocabulary_and_amortise_the_head_gradient_by_hidden_size():
    from dskd.kit.chunked import CHUNK_ELEMENTS, auto_chunk_rows

    assert auto_chunk_rows((32000,), (768,)) == CHUNK_ELEMENTS // 32000  # memory decides at a small vocabulary
    assert auto_chunk_rows((151_936, 32000), (896, 768)) == 448  # the larger head's d / 2 at a large one
    assert auto_chunk_rows((None,), ()) == CHUNK_ELEMENTS // 32000  # unknown sizes: a 32k vocabulary
    assert auto_chunk_rows((10,), (8,)) == 4096 and auto_chunk_rows((10**9,), (8,)) == 32  # clamped
