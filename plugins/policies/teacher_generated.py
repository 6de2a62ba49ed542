"""`teacher_generated`: sequence-level KD (Kim & Rush, 2016): distil on the teacher's own answers.

Each prompt's response is replaced by a teacher sample (the server's `Generate` for a remote teacher, HF
`generate` for a local one), and both the CE and the KD are trained on it. Samples are generated once per
sample and cached on disk, keyed by the teacher's fingerprint and the sampling settings, so later epochs,
resumed runs and other students reuse them; a different teacher never reads another's cache. A sample the
teacher did not finish within `max_new_tokens` carries no EOS label: the student must not learn to stop where
the teacher was only cut off.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dskd
from dskd import Batch, PluginError
from dskd.kit import Policy, PolicyContext, Rollouts, generation_seed, ids_text, vocab_bytes

CACHE_FORMAT = 2  # part of the cache key: bump when a record's fields change (2: "ended")


class TeacherGenerated(Policy):
    def __init__(self, context: PolicyContext, *, temperature: float, top_p: float, max_new_tokens: int) -> None:
        self.context = context
        self.teacher = context.teacher
        self.teacher_bytes = vocab_bytes(self.teacher.tokenizer).table
        self.rollouts = Rollouts(context)
        self.settings = {
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": context.seed,
        }
        key = hashlib.sha256(
            json.dumps([self.teacher.fingerprint, self.settings, CACHE_FORMAT], sort_keys=True).encode()
        ).hexdigest()[:20]
        self.path = Path(context.cache_dir or ".") / f"teacher-samples-{key}.jsonl"
        self.cache: dict[int, tuple[str, bool]] = {}  # sample id -> (text, the teacher ended it with EOS)
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted run; that sample is simply generated again
                self.cache[int(record["sample_id"])] = (record["text"], bool(record["ended"]))

    def prepare(self, batch: Batch, step: int) -> list[Batch]:
        ids = [int(i) for i in batch.sample_ids]
        missing = [b for b, i in enumerate(ids) if i not in self.cache]
        if missing:
            self._generate(batch, missing)
        texts, ended = zip(*(self.cache[i] for i in ids))
        out = self.rollouts.from_texts(batch, texts, ended)
        out.meta["policy"] = "teacher_generated"
        return [out]

    def _generate(self, batch: Batch, rows: list[int]) -> None:
        tokenizer = self.teacher.tokenizer
        input_ids = batch.teacher_input_ids.cpu()
        prompts = [input_ids[b, : int(batch.teacher_prompt_lengths[b])].tolist() for b in rows]
        s = self.settings
        # One seed per generation call, derived from the first sample it serves: reproducible for a fixed order.
        seed = generation_seed(s["seed"], 0, int(batch.sample_ids[rows[0]]))
        samples = self.teacher.generate(
            prompts, max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"], seed=seed
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for b, sample in zip(rows, samples):
                ended = bool(sample) and sample[-1] == tokenizer.eos_token_id
                # The exact bytes of the sampled tokens: `decode` would drop the space of a SentencePiece
                # word-start piece at the start of the sample.
                text = ids_text(self.teacher_bytes, sample[:-1] if ended else sample)
                sample_id = int(batch.sample_ids[b])
                self.cache[sample_id] = (text, ended)
                handle.write(
                    json.dumps({"sample_id": sample_id, "text": text, "ended": ended}, ensure_ascii=False) + "\n"
                )

    # No state_dict: the on-disk sample cache is the state.


def teacher_generated(
    context: PolicyContext, *, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64
) -> TeacherGenerated:
    if context.teacher is None:
        raise PluginError("policy teacher_generated needs a teacher to sample from; configure one")
    if "generate" not in context.teacher.capabilities:
        raise PluginError(
            "policy teacher_generated needs a teacher that can generate; this teacher server does not offer Generate"
        )
    if not 0 < top_p <= 1 or temperature < 0 or max_new_tokens < 1:
        raise PluginError("policy teacher_generated: top_p must be in (0, 1], temperature >= 0, max_new_tokens >= 1")
    return TeacherGenerated(context, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)


@dskd.hookimpl
def dskd_register_policies(register) -> None:
    register("teacher_generated", teacher_generated)
