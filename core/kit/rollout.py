"""Sampled responses -> training batches, built exactly like the data loader builds them.

Policies that distil on sequences other than the dataset's (the student's samples, the teacher's samples)
use `Rollouts` to turn responses into a `Batch`: the student side keeps the sampled ids themselves (that is
what on-policy means), the teacher side re-tokenises the same text with the teacher's tokenizer, prompt
and padding positions carry -100, and across vocabularies the pairs come from the configured aligner — all in
one host-side pass per micro-batch, before the batch reaches the device.

Fixes of the reference's on-policy batch builder (spec §7.2-7.3, §14.2, §14.16): no crash on cross-tokenizer
batches; a generated EOS is a label (the student learns when to stop); teacher sequences longer than the
limit are cut like the student's instead of becoming ragged rows. Sampled ids become text through their exact
bytes (`dskd.kit.token_bytes`), not `decode`, which drops the space of a SentencePiece word-start piece at the start
of a continuation (spec §7.3: decode/encode is not an identity); and a token of the other tokenizer that would
merge the prompt's last characters with the sample's first is split at the boundary instead of failing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from dskd.data.batching import collate
from dskd.data.examples import encode_example
from dskd.errors import DataError
from dskd.kit.objective import same_vocabulary
from dskd.kit.policy import PolicyContext
from dskd.kit.token_bytes import ByteTable, vocab_bytes
from dskd.types import Batch


class Rollouts:
    def __init__(self, context: PolicyContext) -> None:
        self.student_tokenizer = context.student_tokenizer
        self.teacher_tokenizer = None if context.teacher is None else context.teacher.tokenizer
        self.same_vocab = self.teacher_tokenizer is None or same_vocabulary(
            self.teacher_tokenizer, self.student_tokenizer
        )
        self.aligner = None if self.same_vocab else context.aligner
        self.data = context.data
        # Re-tokenised responses may be longer in the other tokenizer; they are cut to max_length afterwards.
        self.unbounded = dataclasses.replace(context.data, max_length=1 << 30)
        self.prompts = context.prompts
        if self.prompts and not all(self.prompts):
            # Conversations carry no prompt text: each model renders its own template, and re-tokenising a sample
            # for the other model would need that model's rendering of the history, which rollouts do not build yet.
            raise DataError(
                "data.train holds conversations, and policies that sample (on-policy, teacher-generated, mixed) do not "
                'distil on conversations yet; use policy.name = "off_policy"'
            )
        self.eos = self.student_tokenizer.eos_token_id
        self.student_bytes = vocab_bytes(self.student_tokenizer).table
        self.pads = (
            self.student_tokenizer.pad_token_id,
            (self.teacher_tokenizer or self.student_tokenizer).pad_token_id,
        )

    def student_prompts(self, batch: Batch) -> list[list[int]]:
        """The prompt ids of each sequence, as the data loader tokenised them (BOS included)."""
        ids = batch.student_input_ids.cpu()
        return [ids[b, : int(n)].tolist() for b, n in enumerate(batch.student_prompt_lengths.cpu())]

    def max_new_tokens(self, batch: Batch, limit: int) -> int:
        longest_prompt = int(batch.student_prompt_lengths.max())
        return max(1, min(limit, self.data.max_length - longest_prompt))

    def prompt_text(self, batch: Batch, b: int) -> str:
        if batch.sample_ids is None or not self.prompts:
            raise DataError(
                "a sampled batch needs the prompts of its samples; the policy was built without the training prompts"
            )
        return self.prompts[int(batch.sample_ids[b])]

    def from_student_samples(self, batch: Batch, continuations: Sequence[list[int]]) -> Batch:
        """A batch whose responses are the student's sampled ids (EOS kept as a label when it was sampled)."""
        return self.collate(self.student_sample_rows(batch, continuations), batch)

    def student_sample_rows(self, batch: Batch, continuations: Sequence[list[int]]) -> list[dict[str, Any]]:
        """The dataset-style rows of `from_student_samples` (kept by replay buffers)."""
        prompts = self.student_prompts(batch)
        rows = []
        for b, (prompt, continuation) in enumerate(zip(prompts, continuations)):
            continuation = list(continuation)[: max(self.data.max_length - len(prompt), 1)]
            ended = bool(continuation) and continuation[-1] == self.eos
            student_ids = prompt + continuation
            if not continuation:  # nothing sampled: distil on the EOS the student should have produced
                student_ids, ended = prompt + [self.eos], True
            text = ids_text(self.student_bytes, continuation[:-1] if ended else continuation)
            rows.append(self._row(batch, b, student_ids, len(prompt), text, ended))
        return rows

    def from_texts(self, batch: Batch, responses: Sequence[str], ended: Sequence[bool] | None = None) -> Batch:
        """A batch whose responses are texts (teacher samples): both sides tokenised like the dataset.

        `ended[b]` says whether response b was finished (its sampler stopped at EOS); an unfinished one, or one cut at
        `data.max_length`, gets no EOS label on either side.
        """
        rows = []
        for b, text in enumerate(responses):
            prompt = self.prompt_text(batch, b)
            student_ids, student_prompt = encode_example(
                self.student_tokenizer, prompt, text, self.unbounded, split_straddling=True
            )
            finished = (ended is None or bool(ended[b])) and len(student_ids) <= self.data.max_length
            student_ids = student_ids[: self.data.max_length] if finished else student_ids[:-1][: self.data.max_length]
            rows.append(self._row(batch, b, student_ids, student_prompt, text, finished))
        return self.collate(rows, batch)

    def _row(
        self, batch: Batch, b: int, student_ids: list[int], student_prompt: int, text: str, ended: bool
    ) -> dict[str, Any]:
        sample_id = int(batch.sample_ids[b]) if batch.sample_ids is not None else b
        if self.same_vocab:
            teacher_ids, teacher_prompt = student_ids, student_prompt
        else:
            teacher_ids, teacher_prompt = encode_example(
                self.teacher_tokenizer, self.prompt_text(batch, b), text, self.unbounded, split_straddling=True
            )
            if not ended:  # the student's sample was cut: the teacher's copy must not claim an EOS either
                teacher_ids = teacher_ids[:-1]
            teacher_ids = teacher_ids[: self.data.max_length]
        row = {
            "sample_id": sample_id,
            "student_ids": student_ids,
            "student_prompt_len": student_prompt,
            "teacher_ids": teacher_ids,
            "teacher_prompt_len": teacher_prompt,
        }
        if self.aligner is not None:
            pairs = self.aligner.align(teacher_ids[teacher_prompt:], student_ids[student_prompt:]).pairs
            row["alignment"] = np.asarray(pairs, dtype=np.int64).reshape(-1).tolist()
        return row

    def collate(self, rows: list[dict[str, Any]], source: Batch) -> Batch:
        out = collate(rows, student_pad_id=self.pads[0], teacher_pad_id=self.pads[1])
        out.meta = dict(source.meta)
        return out


def ids_text(table: ByteTable, ids: Sequence[int]) -> str:
    """The text sampled ids stand for: their tokens' bytes end to end, as UTF-8. Special tokens stand for none, and
    so do ids past the tokenizer's vocabulary (the sampler masks padded head rows, `dskd.models.generation.PaddedRowsMask`,
    but ids given from elsewhere are not trusted)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    data, _ = table.gather(ids[(ids >= 0) & (ids < table.size)])
    return data.tobytes().decode("utf-8", errors="replace")


def split_step(gold: Batch, sampled: Batch, *, ce_on_gold: bool) -> list[Batch]:
    """The micro-batches of an on-policy step: KD on the samples; the CE on the dataset's responses (spec
    §7.1) unless `ce_on_gold` is off (GKD style, KD only)."""
    sampled.ce, sampled.kd = False, True
    if not ce_on_gold:
        return [sampled]
    gold.ce, gold.kd = True, False
    return [gold, sampled]


def generation_seed(seed: int, step: int, index: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, optimizer step, micro-batch)."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def restore_rng(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
