"""The LM head as data: weight, optional bias, logit scale and soft-cap, and the tokenizer's true size.

Dual-space objectives need logits from hidden states that are not the model's own (projected ones), and a
remote teacher sends hidden states instead of logits. Both rely on `logits = head(hidden_states[-1])`, which
holds for GPT-2, Llama, Mistral and Qwen2 heads but not for every architecture: some add a bias, scale the
logits (Cohere) or soft-cap them (Gemma 2/3). `LMHead` carries those transforms explicitly, and
`head_from_model` verifies numerically that it reproduces the model's own logits, so a model it cannot
describe is refused at setup with a sentence instead of training on wrong logits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from dskd.errors import ModelError


@dataclass
class LMHead:
    """`logits = softcap(scale * (hidden @ weight.T + bias))`, over the tokenizer's vocabulary only.

    `weight` is `(V, d)`; rows past the tokenizer's size (padded heads) are already removed, so a column of
    the logits is always a real token. For a student, `weight` is a view of the trainable parameter.
    """

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float = 0.0  # 0 = none; otherwise logits = softcap * tanh(logits / softcap)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def trainable(self) -> bool:
        """Whether the head's weight receives gradients (False for a frozen head, e.g. under LoRA)."""
        return bool(self.weight.requires_grad)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits `(..., V)` of `hidden` `(..., d)`; `weight` overrides the stored one (e.g. a detached
        or differently-sliced view) while keeping bias, scale and soft-cap."""
        w = self.weight if weight is None else weight
        z = F.linear(hidden.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype)).float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def tensors(self) -> dict[str, torch.Tensor]:
        """The head's tensors by name, to pass to `dskd.kit.chunked.chunked_loss` as shared inputs (so a trainable
        head receives its gradient there); `with_tensors` rebuilds the head from them inside the chunk."""
        return {"weight": self.weight} if self.bias is None else {"weight": self.weight, "bias": self.bias}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "LMHead":
        return replace(self, weight=tensors["weight"], bias=tensors.get("bias"))

    def detached(self) -> "LMHead":
        return LMHead(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.scale, self.softcap)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LMHead":
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype or self.bias.dtype)
        return LMHead(self.weight.to(device=device, dtype=dtype or self.weight.dtype), bias, self.scale, self.softcap)

    def checksum(self) -> str:
        """sha256 of the head's parameters (weight, bias) and transforms, for caches and the wire."""
        digest = hashlib.sha256()
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(f"{self.scale}:{self.softcap}".encode())
        return digest.hexdigest()


class HeadView(LMHead):
    """The student's LM head read from its module at each use, so it stays right when the module's parameters are
    replaced: FSDP2 swaps them between sharded and unsharded tensors, and peft may wrap the head.

    Between the model's forward and its backward the root of an FSDP2 model holds its parameters unsharded, so an
    objective's loss reads the whole head and its gradient reaches FSDP's reduction. Read anywhere else (e.g. a
    closed-form map refreshed after the optimizer step) a sharded head is gathered: a collective, so every process
    must read it at the same point. Sizes are stored, so asking for them never gathers.
    """

    def __init__(self, module: torch.nn.Module, vocab_size: int, hidden_size: int, scale: float, softcap: float):
        self._module = module
        self._vocab_size = vocab_size
        self._hidden_size = hidden_size
        self.scale = scale
        self.softcap = softcap

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return _whole(self._module.weight)[: self._vocab_size]

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        bias = getattr(self._module, "bias", None)
        return None if bias is None else _whole(bias)[: self._vocab_size]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def trainable(self) -> bool:
        return bool(self._module.weight.requires_grad)

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> LMHead:
        return LMHead(tensors["weight"], tensors.get("bias"), self.scale, self.softcap)

    def __repr__(self) -> str:  # the dataclass repr would read (and so gather) the weight
        return (
            f"HeadView({type(self._module).__name__}, vocab_size={self._vocab_size}, hidden_size={self._hidden_size})"
        )

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def head_view(model: torch.nn.Module, vocab_size: int, *, verify: bool = True, name: str = "model") -> HeadView:
    """`head_from_model`'s head (verified the same way) as a `HeadView` of `model`'s head module."""
    head = head_from_model(model, vocab_size, verify=verify, name=name)
    return HeadView(model.get_output_embeddings(), head.vocab_size, head.hidden_size, head.scale, head.softcap)


def last_hidden_state(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`(B, T, d)` hidden states after the final norm: exactly the LM head's input for supported models.

    Goes through the model's own forward (not its body) so that wrappers such as DDP see the call, and asks
    for the logits of the last position only, so the full `(B, T, V)` logits are never built here.
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:  # architectures without `logits_to_keep` compute all logits; still correct
        out = model(**kwargs)
    return out.hidden_states[-1]


def head_from_model(model: torch.nn.Module, vocab_size: int, *, verify: bool = True, name: str = "model") -> LMHead:
    """Describe `model`'s LM head as an `LMHead` over the first `vocab_size` rows (the tokenizer's size).

    With `verify`, checks on a probe that `head(last_hidden_state)` equals the model's own logits, which fails
    for architectures whose head does more than the transforms `LMHead` knows.
    """
    linear = model.get_output_embeddings()
    if linear is None or not hasattr(linear, "weight"):
        raise ModelError(f"{name}: {type(model).__name__} has no LM head (get_output_embeddings() is None)")
    weight = linear.weight
    if weight.shape[0] < vocab_size:
        raise ModelError(
            f"{name}: the LM head has {weight.shape[0]} rows but the tokenizer has {vocab_size} tokens; "
            f"use the tokenizer that belongs to this model"
        )
    config = model.config
    bias = getattr(linear, "bias", None)
    head = LMHead(
        weight=weight[:vocab_size],
        bias=None if bias is None else bias[:vocab_size],
        scale=float(getattr(config, "logit_scale", None) or 1.0),
        softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
    )
    if verify:
        verify_head(model, head, name=name)
    return head


@torch.no_grad()
def verify_head(model: torch.nn.Module, head: LMHead, *, name: str = "model") -> None:
    """Refuse a model whose last hidden state, put through `head`, does not give its own logits."""
    was_training = model.training
    model.eval()
    try:
        device = head.weight.device
        probe = torch.arange(1, 9, device=device).remainder(head.vocab_size).unsqueeze(0)
        own = model(input_ids=probe, use_cache=False).logits[..., : head.vocab_size].float()
        ours = head.logits(last_hidden_state(model, probe))
    finally:
        model.train(was_training)
    scale = own.abs().max().clamp_min(1.0)
    err = float((own - ours).abs().max() / scale)
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    if not err <= tolerance:
        raise ModelError(
            f"{name}: the last hidden state of {type(model).__name__} is not the input of its LM head "
            f"(relative difference {err:.2e}), and its head does not declare a bias, logit scale or soft-cap that would "
            f"explain it; dskd computes every loss from last hidden states and the LM head, so it cannot distil this model"
        )
