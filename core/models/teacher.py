"""The teacher interface, and `LocalTeacher`: an HF causal LM in the same process.

A teacher answers `score(input_ids, attention_mask, rows, request)` with a `TeacherSignal` for the
requested rows only (the positions whose teacher label is valid): last-layer hidden states and/or top-k
log-probabilities with the tail log-mass, or dense logits. It also exposes its tokenizer, its LM head (fetched
once; objectives apply it to hidden states themselves), a fingerprint of model, tokenizer and dtype, and
`generate` for sequence-level KD. The gRPC client (`dskd.servers.client.RemoteTeacher`) implements the same
interface, so every objective works with either.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future

import torch

from dskd.kit.lm_head import LMHead, head_from_model, last_hidden_state
from dskd.types import SignalRequest, TeacherSignal

CAPABILITIES = frozenset({"hidden_states", "top_k", "logits", "generate"})


class Teacher:
    """What the engine and the objectives need from a teacher, local or remote (`LocalTeacher`, the gRPC
    `RemoteTeacher`). Members with a default here are optional."""

    tokenizer: object  # a transformers tokenizer (fast)
    head: LMHead  # the teacher's LM head over its tokenizer's vocabulary, on the student's device
    fingerprint: str
    capabilities: frozenset[str]

    embeddings: torch.Tensor | None = None
    """The input-embedding weight `(V_t, d_t)`, detached, on the student's device, or None when the teacher
    cannot offer it (a gRPC teacher sends hidden states and its head only). Objectives that attend over token
    embeddings (`dskd_cma`) refuse at setup without it."""

    @property
    def hidden_size(self) -> int:
        return self.head.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, request: SignalRequest
    ) -> TeacherSignal:
        """Signal for `rows` (flat positions `b * T + t` into the `(B, T)` ids), in the order given."""
        raise NotImplementedError

    def score_async(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, request: SignalRequest
    ) -> Future | None:
        """Start `score` and return a future of its signal; None (the default) when the teacher answers only
        synchronously, and the engine then calls `score` when it needs the signal."""
        return None

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """Sampled continuations (token ids, without the prompt) of each prompt."""
        raise NotImplementedError

    def check_request(self, request: SignalRequest) -> str:
        """Why this teacher cannot answer `request` (a sentence, checked at setup), or "" when it can. Beyond
        `capabilities`: e.g. a teacher store of top-64 entries cannot answer a top-128 request."""
        return ""

    def stats(self) -> dict[str, float]:
        """Counters logged as `teacher/<name>` at each log interval (a remote teacher's calls, retries, ...)."""
        return {}

    def close(self) -> None:
        """Release what the teacher holds (channels, threads)."""


def model_fingerprint(
    model: torch.nn.Module, tokenizer, dtype: torch.dtype | str, model_id: str = "", revision: str = ""
) -> str:
    """A short hash of model identity, weights, tokenizer and dtype.

    Weights enter through per-parameter float64 sums and sums of squares rather than their bytes, which is
    cheap even for a 7B model on its device and still changes with any training step.
    """
    digest = hashlib.sha256()
    digest.update(f"{model_id}\0{revision}\0{str(dtype)}\0".encode())
    config = model.config.to_dict()
    # Where the files were read from is not part of the model: a moved folder, or replicas keeping the model
    # in different folders, are the same teacher.
    config.pop("_name_or_path", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if not torch.is_floating_point(param):
                continue
            p = param.detach().double()
            digest.update(f"{name}:{tuple(param.shape)}:{float(p.sum()):.10e}:{float((p * p).sum()):.10e}".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a tokenizer's full definition (vocabulary, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(
        {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}, sort_keys=True
    )
    return hashlib.sha256((text + special).encode()).hexdigest()[:32]


def rows_per_sequence(rows: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    return torch.bincount(torch.div(rows, seq_len, rounding_mode="floor"), minlength=batch_size)


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probabilities of float32 `logits (R, V)`, and the log of the mass outside them.

    The tail is `logsumexp(non-top-k logits) - logsumexp(all logits)`, stable even when the top-k holds
    nearly all the mass (then it is very negative, never log of a rounding error).
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = torch.topk(logits, k, dim=-1)
    if k >= logits.shape[-1]:
        tail = torch.full_like(lse, float("-inf"))
    else:
        rest = logits.scatter(-1, ids, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1) - lse
    return ids, values - lse.unsqueeze(-1), tail


@torch.inference_mode()
def compute_signal(
    model: torch.nn.Module,
    head: LMHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    request: SignalRequest,
    *,
    chunk_rows: int = 1024,
) -> TeacherSignal:
    """One forward of an HF causal LM and the requested outputs for `rows` only (shared by the local
    teacher and the gRPC server). Full-vocabulary work is done `chunk_rows` rows at a time."""
    batch_size, seq_len = input_ids.shape
    hidden = last_hidden_state(model, input_ids, attention_mask)
    picked = hidden.reshape(batch_size * seq_len, -1).index_select(0, rows.to(hidden.device))
    signal = TeacherSignal(rows_per_sequence=rows_per_sequence(rows.cpu(), batch_size, seq_len))
    if request.hidden_states:
        signal.hidden_states = picked
    if request.top_k or request.logits:
        ids, logprobs, tails, dense = [], [], [], []
        for start in range(0, picked.shape[0], chunk_rows):
            z = head.logits(picked[start : start + chunk_rows])
            if request.top_k:
                i, lp, tail = topk_with_tail(z, min(request.top_k, z.shape[-1]))
                ids.append(i)
                logprobs.append(lp)
                tails.append(tail)
            if request.logits:
                dense.append(z)
        if request.top_k:
            k = min(request.top_k, head.vocab_size)
            signal.topk_ids = torch.cat(ids) if ids else torch.zeros((0, k), dtype=torch.int64, device=picked.device)
            signal.topk_logprobs = torch.cat(logprobs) if logprobs else torch.zeros((0, k), device=picked.device)
            signal.tail_logmass = torch.cat(tails) if tails else torch.zeros((0,), device=picked.device)
        if request.logits:
            signal.logits = torch.cat(dense) if dense else torch.zeros((0, head.vocab_size), device=picked.device)
    return signal


class LocalTeacher(Teacher):
    """An HF causal LM in the student's process: frozen, in eval mode, every call under `inference_mode`."""

    capabilities = CAPABILITIES

    def __init__(self, model: torch.nn.Module, tokenizer, *, model_id: str = "", verify_head: bool = True) -> None:
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.head = head_from_model(model, len(tokenizer), verify=verify_head, name=f"teacher {model_id}".strip())
        self.head = self.head.detached()
        # The input-embedding table, for objectives that attend over token embeddings (dskd_cma). The teacher
        # is frozen, so a detached view shares the weight's memory instead of copying it.
        embedding = model.get_input_embeddings()
        self.embeddings = None if embedding is None else embedding.weight.detach()
        dtype = next(model.parameters()).dtype
        self.fingerprint = model_fingerprint(model, tokenizer, dtype, model_id)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def score(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, request: SignalRequest
    ) -> TeacherSignal:
        signal = compute_signal(
            self.model,
            self.head,
            input_ids.to(self.device),
            attention_mask.to(self.device),
            rows.to(self.device),
            request,
        )
        signal.fingerprint = self.fingerprint
        # Tensors made under inference_mode cannot enter autograd graphs (the student's loss uses them as
        # constants); one clone of the requested rows, outside inference mode, makes them ordinary tensors.
        for name in ("hidden_states", "topk_ids", "topk_logprobs", "tail_logmass", "logits"):
            value = getattr(signal, name)
            if value is not None:
                setattr(signal, name, value.clone())
        return signal

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        from dskd.models.generation import sample_continuations  # generation helpers live beside evaluation

        return sample_continuations(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )

    def close(self) -> None:
        pass
