"""`dskd.kit`: the public toolkit for plugin authors.

A plugin, built-in or third-party, imports only `dskd` (hooks, errors, the values that pass between stages)
and `dskd.kit` (this package): everything else in `dskd` may change without notice. docs/plugins.md shows
each piece in use.

- Contracts, with the defaults of their optional members: `Objective`, `Aligner`, `Policy`, and the contexts
  their factories receive (`ObjectiveContext`, `PolicyContext`).
- Losses: `chunked_parts` / `chunked_loss` (row chunks, gradients taken chunk by chunk), `dense_loss` (the
  oracle), `LossWeights`, `weighting` and `objective_loss` (how the engine weights an objective's parts),
  `student_ce_terms` / `packed_ce_terms` (the gold CE), `gather_rows` / `gather_labels`.
- Probabilities: `paired_logprobs`, `kl_terms`, `log_mixture`, `check_unit_interval`, `check_temperature`.
- The LM head view: `LMHead`, `head_from_model`, `last_hidden_state`.
- Dual-space terms: `DualSpaceSpec`, `dual_space_terms`, `paired_rows`, `least_squares_map`,
  `right_inverse_factor`, `shared_vocabulary`; row partners of index-style alignments: `row_partners`,
  `teacher_hidden`; cross-model attention: `attention_weights`, `padded`, `packed`, `sequence_has`.
- Sampling: `Rollouts`, `StudentSampling`, `split_step`, `generation_seed`, `ids_text`.
- Token bytes: `vocab_bytes`, `VocabBytes`, `ByteTable`, `token_ids`, `exact_byte_map`,
  `teacher_to_student_map`, `SPACE`, `tokenizer_fingerprint`.
- `member`: a plugin's optional member or its contract's default.
- `loss_terms_on_batch`: an objective of a job, computed on one batch of texts outside the engine.
"""

from dskd.kit.aligner import Aligner
from dskd.kit.chunked import chunked_loss, chunked_parts, dense_loss
from dskd.kit.contracts import member
from dskd.kit.cross_model_attention import attention_weights, packed, padded, sequence_has
from dskd.kit.dual_space import (
    DualSpaceSpec,
    dual_space_terms,
    least_squares_map,
    paired_rows,
    right_inverse_factor,
    shared_vocabulary,
)
from dskd.kit.lm_head import LMHead, head_from_model, last_hidden_state
from dskd.kit.objective import (
    CROSS_TOKENIZER_OBJECTIVES,
    Objective,
    ObjectiveContext,
    gather_labels,
    gather_rows,
    packed_ce_terms,
    student_ce_terms,
)
from dskd.kit.policy import Policy, PolicyContext
from dskd.kit.probability import check_temperature, check_unit_interval, kl_terms, log_mixture, paired_logprobs
from dskd.kit.rollout import Rollouts, generation_seed, ids_text, split_step
from dskd.kit.row_partners import row_partners, teacher_hidden
from dskd.kit.sampling_policy import StudentSampling
from dskd.kit.token_bytes import (
    SPACE,
    ByteTable,
    VocabBytes,
    exact_byte_map,
    teacher_to_student_map,
    token_ids,
    vocab_bytes,
)
from dskd.kit.weights import LossWeights, objective_loss, weighting
from dskd.models.teacher import tokenizer_fingerprint

__all__ = [
    "CROSS_TOKENIZER_OBJECTIVES",
    "SPACE",
    "Aligner",
    "ByteTable",
    "DualSpaceSpec",
    "LMHead",
    "LossWeights",
    "Objective",
    "ObjectiveContext",
    "Policy",
    "PolicyContext",
    "Rollouts",
    "StudentSampling",
    "VocabBytes",
    "attention_weights",
    "check_temperature",
    "check_unit_interval",
    "chunked_loss",
    "chunked_parts",
    "dense_loss",
    "dual_space_terms",
    "exact_byte_map",
    "gather_labels",
    "gather_rows",
    "generation_seed",
    "head_from_model",
    "ids_text",
    "kl_terms",
    "last_hidden_state",
    "least_squares_map",
    "log_mixture",
    "member",
    "objective_loss",
    "packed",
    "packed_ce_terms",
    "padded",
    "paired_logprobs",
    "paired_rows",
    "right_inverse_factor",
    "row_partners",
    "sequence_has",
    "shared_vocabulary",
    "split_step",
    "student_ce_terms",
    "teacher_hidden",
    "teacher_to_student_map",
    "token_ids",
    "tokenizer_fingerprint",
    "vocab_bytes",
    "weighting",
]
