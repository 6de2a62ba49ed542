"""A third-party plugin package whose plugins break their contracts, as a careless or hostile author writes them.

Each is a real plugin: the divergences compute a real forward KL, then return it the wrong way; the aligner
returns pairs of the wrong kind. `tests/broken_plugins.py` makes the package look installed to dskd.
"""

from __future__ import annotations

import numpy as np
import torch

import dskd


def _kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL per vocabulary entry, `(N, V)`: summing over the last axis gives the divergence."""
    log_p_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return log_p_t.exp() * (log_p_t - log_p_s)


def nan_kl(student_logits, teacher_logits, *, temperature: float = 1.0):
    """Right shape and dtype, NaN values (a log of zero, a division by zero in a real plugin)."""
    return _kl_terms(student_logits, teacher_logits, temperature).sum(-1) * float("nan")


def mean_kl(student_logits, teacher_logits, *, temperature: float = 1.0):
    """A scalar: the mean over rows the engine wanted to weight and reduce itself."""
    return _kl_terms(student_logits, teacher_logits, temperature).sum(-1).mean()


def vocab_kl(student_logits, teacher_logits, *, temperature: float = 1.0):
    """`(N, V)`: the sum over the vocabulary forgotten."""
    return _kl_terms(student_logits, teacher_logits, temperature)


class BrokenAligner:
    """Pairs of the kind named by `fault` for any two sequences (of at least two tokens each)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def align(self, teacher_ids, student_ids):
        n_t, n_s = len(teacher_ids), len(student_ids)
        good = np.array([[0, 0], [1, 1]], dtype=np.int64)
        pairs = {
            "past_end": np.array([[0, 0], [n_t, n_s]]),  # one past each sequence's last position
            "reversed": good[::-1].copy(),
            "negative": good - 1,
        }[self.fault]
        return dskd.types.Alignment(pairs)


def broken_aligner(teacher_tokenizer, student_tokenizer, *, fault: str = "past_end"):
    return BrokenAligner(fault)


@dskd.hookimpl
def dskd_register_divergences(register) -> None:
    register("nan_kl", nan_kl)
    register("mean_kl", mean_kl)
    register("vocab_kl", vocab_kl)


@dskd.hookimpl
def dskd_register_aligners(register) -> None:
    register("broken", broken_aligner)
