"""`dskd.kit`: the public toolkit for plugin authors.

A plugin, built-in or third-party, imports only `dskd` (hooks, errors, the values that pass between stages)
and `dskd.kit` (this package): everything else in `dskd` may change without notice. docs/plugins.md shows
each piece in use.

- Contracts, with the defaults of their optional members: `Objective`, `Aligner`, `Policy`, `Teacher`, and the contexts
  their factories receive (`ObjectiveContext`, `PolicyContext`).
- Losses: `chunked_parts` / `chunked_loss` (row chunks, gradients taken chunk by chunk), `dense_loss` (the
  oracle), `LossWeights`, `weighting` and `objective_loss` (how the engine weights an objective's parts),
  `student_ce_terms` / `packed_ce_terms` (the gold CE), `gather_rows` / `gather_labels`.
- Probabilities: `paired_logprobs`, `kl_terms`, `log_mixture`, `check_unit_interval`, `check_temperature`;
  `fused_kl_rows` / `fused_applies` (the KL family with a closed-form student gradient, for speed).
- The LM head view: `LMHead`, `HeadView` (a student's head, read at each use; right under FSDP2 and peft),
  `head_from_model`, `head_view`, `last_hidden_state`.
- Dual-space terms: `DualSpaceSpec`, `dual_space_terms`, `paired_rows`, `least_squares_map`,
  `right_inverse_factor`, `shared_vocabulary`; row partners of index-style alignments: `row_partners`,
  `teacher_hidden`; cross-model attention: `attention_weights`, `padded`, `packed`, `sequence_has`.
- Sampling: `Rollouts`, `StudentSampling`, `split_step`, `generation_seed`, `ids_text`.
- Token bytes: `vocab_bytes`, `VocabBytes`, `ByteTable`, `token_ids`, `exact_byte_map`,
  `teacher_to_student_map`, `SPACE`, `tokenizer_fingerprint`.
- `member`: a plugin's optional member or its contract's default.
- `loss_terms_on_batch`: an objective of a job, computed on one batch of texts outside the engine.
"""

import importlib

# Names load on first use (PEP 562): the kit's helpers build on dskd's internals, which themselves use small
# kit modules, so importing everything here eagerly would make import cycles out of ordinary imports.
_EXPORTS = {
    "Aligner": "dskd.kit.aligner",
    "BatchLoss": "dskd.kit.batch_loss",
    "ByteTable": "dskd.kit.token_bytes",
    "CROSS_TOKENIZER_OBJECTIVES": "dskd.kit.objective",
    "DualSpaceSpec": "dskd.kit.dual_space",
    "HeadView": "dskd.kit.lm_head",
    "LMHead": "dskd.kit.lm_head",
    "LossWeights": "dskd.kit.weights",
    "Objective": "dskd.kit.objective",
    "ObjectiveContext": "dskd.kit.objective",
    "Policy": "dskd.kit.policy",
    "PolicyContext": "dskd.kit.policy",
    "Rollouts": "dskd.kit.rollout",
    "SPACE": "dskd.kit.token_bytes",
    "StudentSampling": "dskd.kit.sampling_policy",
    "Teacher": "dskd.models.teacher",
    "VocabBytes": "dskd.kit.token_bytes",
    "attention_weights": "dskd.kit.cross_model_attention",
    "check_temperature": "dskd.kit.probability",
    "check_unit_interval": "dskd.kit.probability",
    "chunked_loss": "dskd.kit.chunked",
    "chunked_parts": "dskd.kit.chunked",
    "auto_chunk_rows": "dskd.kit.chunked",
    "dense_loss": "dskd.kit.chunked",
    "dual_space_terms": "dskd.kit.dual_space",
    "exact_byte_map": "dskd.kit.token_bytes",
    "gather_labels": "dskd.kit.objective",
    "gather_rows": "dskd.kit.objective",
    "fused_applies": "dskd.kit.probability",
    "fused_kl_rows": "dskd.kit.probability",
    "generation_seed": "dskd.kit.rollout",
    "head_from_model": "dskd.kit.lm_head",
    "head_view": "dskd.kit.lm_head",
    "ids_text": "dskd.kit.rollout",
    "kl_terms": "dskd.kit.probability",
    "last_hidden_state": "dskd.kit.lm_head",
    "least_squares_map": "dskd.kit.dual_space",
    "log_mixture": "dskd.kit.probability",
    "loss_terms_on_batch": "dskd.kit.batch_loss",
    "member": "dskd.kit.contracts",
    "objective_loss": "dskd.kit.weights",
    "packed": "dskd.kit.cross_model_attention",
    "packed_ce_terms": "dskd.kit.objective",
    "padded": "dskd.kit.cross_model_attention",
    "paired_logprobs": "dskd.kit.probability",
    "paired_rows": "dskd.kit.dual_space",
    "right_inverse_factor": "dskd.kit.dual_space",
    "row_partners": "dskd.kit.partners",
    "sequence_has": "dskd.kit.cross_model_attention",
    "shared_vocabulary": "dskd.kit.dual_space",
    "split_step": "dskd.kit.rollout",
    "student_ce_terms": "dskd.kit.objective",
    "teacher_hidden": "dskd.kit.partners",
    "teacher_to_student_map": "dskd.kit.token_bytes",
    "token_ids": "dskd.kit.token_bytes",
    "tokenizer_fingerprint": "dskd.models.teacher",
    "vocab_bytes": "dskd.kit.token_bytes",
    "weighting": "dskd.kit.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dskd.kit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
