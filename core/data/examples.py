"""Examples from records (read by `dskd.data.sources`), the prompt template, and tokenisation of the same text for student and teacher.

`load_examples` reads a split (Dolly/Alpaca-style records) into `Example`s; `encode_example` turns one prompt and
response into ids and a prompt length for one tokenizer; `tokenize_split` does that for both tokenizers over a
split, with the alignment of the two label sequences, in `datasets` worker processes, cached on disk.

Two choices differ from the reference code on purpose (DSKD_SPEC §10.2, §14.14-15):
- prompt and response are tokenised *jointly*, and the response is the tokens that start at or after the
  prompt's last character, so a SentencePiece model never learns a spurious leading "▁" it would not see when
  it continues the prompt at inference; BOS is kept when the tokenizer adds one;
- a long prompt keeps its *last* tokens, so the "### Response:" cue survives.
Text is always data: special-token strings inside it ("</s>", "<s>" as an HTML tag) are split into ordinary
tokens, so the only special tokens are the BOS the tokenizer adds and the EOS appended here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value, load_from_disk

try:
    from datasets import List
except ImportError:  # datasets < 4 names the variable-length list feature Sequence
    from datasets import Sequence as List

from dskd.config import DataConfig
from dskd.data import chat
from dskd.data.records import (  # noqa: F401  (Example, render_prompt, ALPACA*: the names this module always had)
    ALPACA,
    ALPACA_WITH_CONTEXT,
    Example,
    check_template,
    detect_shape,
    needed_fields,
    prompt_name,
    render_prompt,
    to_example,
)
from dskd.data.sources import read_rows
from dskd.errors import DataError, PluginError
from dskd.models.teacher import tokenizer_fingerprint

CACHE_VERSION = 2  # bump when the cached columns or their meaning change


def load_examples(path: str | Path, cfg: DataConfig, split: str, tag_fields: tuple[str, ...] = ()) -> list[Example]:
    """Read one split (`dskd.data.sources`: a data file, a folder or a hub dataset) into `Example`s of any
    record shape (`dskd.data.records`); every problem is a one-line `DataError` naming the source, the sample and
    the fix. `tag_fields`: record fields kept as each example's tags (what `[[teachers]]` routes read)."""
    where = f"data.{split} ({path})"
    if cfg.format in ("auto", "instruction") and not cfg.prompt_field:
        check_template(cfg.template)
    fields = [cfg.context_field, cfg.instruction_field, cfg.response_field, cfg.messages_field, cfg.completion_field]
    columns, rows = read_rows(path, cfg, split, [name for name in fields + [prompt_name(cfg), *tag_fields] if name])
    convert = RowConverter(cfg, where, tuple(columns), tuple(tag_fields))
    return [convert(row, index) for index, row in enumerate(rows)]


@dataclass(frozen=True)
class RowConverter:
    """The one function from a record (a dict) to an `Example`, shared by the in-memory and the streaming
    reader, so both give the same examples. Built from the source's column names, from which it reads the
    record shape (`data.format` overrides it) and checks the fields that shape needs at once."""

    cfg: DataConfig
    where: str
    columns: tuple[str, ...]
    tag_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for config_key, name in needed_fields(self.shape, self.cfg):
            if name not in self.columns:
                raise DataError(
                    f"{self.where} has no field {name!r} (fields: {', '.join(self.columns)}); "
                    f"set data.{config_key} to the field that holds it"
                )

    @property
    def shape(self) -> str:
        return detect_shape(list(self.columns), self.cfg)

    def __call__(self, row: dict[str, Any], index: int) -> Example:
        cfg = self.cfg
        use_context = bool(cfg.context_field) and cfg.context_field in self.columns and not cfg.prompt_field
        return to_example(row, cfg, self.shape, self.where, index, use_context=use_context, tag_fields=self.tag_fields)


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _encode_text(tokenizer: Any, texts: list[str]) -> dict[str, list]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has no fast backend; character offsets are needed to split "
            "prompt from response: use a tokenizer folder with tokenizer.json (AutoTokenizer(..., use_fast=True))"
        )
    return tokenizer(
        texts,
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        split_special_tokens=True,
    )


def _split_specials(ids: list[int], special: list[int]) -> tuple[int, int]:
    """(number of leading, index after the last non-special) for the specials the tokenizer added (BOS, EOS)."""
    start = 0
    while start < len(ids) and special[start]:
        start += 1
    end = len(ids)
    while end > start and special[end - 1]:
        end -= 1
    return start, end


def _keep_prompt(prefix: list[int], body: list[int], max_prompt_length: int) -> list[int]:
    room = max(max_prompt_length - len(prefix), 0)
    return prefix + body[max(len(body) - room, 0) :] if room else list(prefix)


def _fragment(tokenizer: Any, text: str) -> list[int]:
    """The ids of a piece of text on its own, without the specials the tokenizer adds."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _encode_many(
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    cfg: DataConfig,
    split: str,
    indices: list[int],
    split_straddling: bool = False,
) -> list[tuple[list[int], int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has no EOS token; set tokenizer.eos_token before tokenising data"
        )
    texts = [p + r for p, r in zip(prompts, responses)]
    encoded = _encode_text(tokenizer, texts)
    out = []
    for k, (prompt, index) in enumerate(zip(prompts, indices)):
        ids, offsets = encoded["input_ids"][k], encoded["offset_mapping"][k]
        start, end = _split_specials(ids, encoded["special_tokens_mask"][k])
        boundary = len(prompt)
        cut, straddling = start, None
        while cut < end and offsets[cut][0] < boundary:
            if offsets[cut][1] > boundary:
                if not split_straddling:
                    raise DataError(
                        f"data.{split}, sample {index}: token {tokenizer.convert_ids_to_tokens(ids[cut])!r} of "
                        f"{_tokenizer_name(tokenizer)!r} spans the end of the prompt and the start of the response; "
                        "end the prompt or template without trailing whitespace (start the response with it instead)"
                    )
                straddling = cut
                break
            cut += 1
        body, response_ids = ids[start:cut], ids[cut:end]
        if straddling is not None:
            # A generated response is not ours to fix (a sample starting with "\n" after a prompt ending in "\n"
            # is one GPT-2 token "\n\n"): the merged token is split at the boundary and each part tokenised on
            # its own, so that prompt and response keep their exact text.
            a, b = offsets[straddling]
            body = body + _fragment(tokenizer, texts[k][a:boundary])
            response_ids = _fragment(tokenizer, texts[k][boundary:b]) + ids[straddling + 1 : end]
        prompt_ids = _keep_prompt(ids[:start], body, cfg.max_prompt_length)
        if not prompt_ids:
            raise DataError(
                f"data.{split}, sample {index}: the prompt is empty for {_tokenizer_name(tokenizer)!r}; give every sample a prompt"
            )
        full = prompt_ids + response_ids + [eos]
        if len(full) > cfg.max_length:
            raise DataError(
                f"data.{split}, sample {index}: {len(full)} tokens with {_tokenizer_name(tokenizer)!r} exceed "
                f"data.max_length = {cfg.max_length}; raise data.max_length or drop that sample"
            )
        out.append((full, len(prompt_ids)))
    return out


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    cfg: DataConfig,
    *,
    split: str = "train",
    index: int = 0,
    split_straddling: bool = False,
) -> tuple[list[int], int]:
    """`(ids, prompt_len)`: BOS (if the tokenizer adds one) + prompt + response + EOS, tokenised jointly.

    `ids[prompt_len:]` (the label sequence) is the response's tokens and EOS. The prompt keeps its last tokens
    (and BOS) so that `prompt_len <= cfg.max_prompt_length`; more than `cfg.max_length` ids is a `DataError`.
    A token spanning the end of the prompt and the start of the response is a `DataError`, or, with
    `split_straddling` (for generated responses), split there with each part tokenised on its own.
    `split` and `index` only name the sample in error messages.
    """
    return _encode_many(tokenizer, [prompt], [response], cfg, split, [index], split_straddling)[0]


def encode_prompt(tokenizer: Any, prompt: str, cfg: DataConfig) -> list[int]:
    """The prompt alone, as a model continues it at inference: BOS if added, text, last `max_prompt_length` ids."""
    encoded = _encode_text(tokenizer, [prompt])
    ids = encoded["input_ids"][0]
    start, end = _split_specials(ids, encoded["special_tokens_mask"][0])
    return _keep_prompt(ids[:start], ids[start:end], cfg.max_prompt_length)


def encoder_columns(examples: list[Example], sample_ids: list[int]) -> dict[str, list]:
    """The input of `_PairEncoder` for `examples`: the columns it reads (the streaming reader builds the
    same, so both paths encode alike). Conversations travel as JSON text of their messages and the indices of
    their trained assistant turns; the encoder renders them with each tokenizer's template."""
    if examples and examples[0].is_conversation:
        return {
            "sample_id": list(sample_ids),
            "messages": [json.dumps(e.messages, ensure_ascii=False) for e in examples],
            "trained": [list(e.trained) for e in examples],
        }
    return {
        "sample_id": list(sample_ids),
        "prompt": [e.prompt for e in examples],
        "response": [e.response for e in examples],
    }


class _PairEncoder:
    """The `Dataset.map` function of `tokenize_split` (a picklable object, so it runs in worker processes)."""

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any | None,
        cfg: DataConfig,
        aligner: Any | None,
        split: str,
        sides: tuple[str, str] = ("student", "teacher"),
    ) -> None:
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer  # None: the teacher shares the student's tokenizer
        self.cfg = cfg
        self.aligner = aligner
        self.split = split
        self.sides = sides  # the config tables the two tokenizers come from, for error messages

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if "messages" in batch:
            return self._conversations(batch)
        prompts, responses, indices = batch["prompt"], batch["response"], batch["sample_id"]
        student = _encode_many(self.student_tokenizer, prompts, responses, self.cfg, self.split, indices)
        teacher = (
            student
            if self.teacher_tokenizer is None
            else _encode_many(self.teacher_tokenizer, prompts, responses, self.cfg, self.split, indices)
        )
        out: dict[str, list] = {
            "sample_id": indices,
            "student_ids": [ids for ids, _ in student],
            "student_prompt_len": [n for _, n in student],
            "teacher_ids": [ids for ids, _ in teacher],
            "teacher_prompt_len": [n for _, n in teacher],
        }
        if self.aligner is not None:
            out["alignment"] = [self._align(t, s, i) for t, s, i in zip(teacher, student, indices)]
            from dskd.kit import Aligner, member  # local: the kit's sampling helpers import this module

            differs = member(self.aligner, Aligner, "text_differs")
            out["text_differs"] = [bool(differs(t[0][t[1] :], s[0][s[1] :])) for t, s in zip(teacher, student)]
        return out

    def _align(self, teacher: tuple[list[int], int], student: tuple[list[int], int], index: int) -> list[int]:
        """Flattened `(teacher_label_index, student_label_index)` pairs over the two label sequences."""
        t_labels, s_labels = teacher[0][teacher[1] :], student[0][student[1] :]
        pairs = np.asarray(self.aligner.align(t_labels, s_labels).pairs, dtype=np.int64).reshape(-1, 2)
        in_range = pairs.size == 0 or (
            pairs.min() >= 0 and pairs[:, 0].max() < len(t_labels) and pairs[:, 1].max() < len(s_labels)
        )
        increasing = len(pairs) < 2 or bool(np.all(np.diff(pairs, axis=0) > 0))
        if not (in_range and increasing):
            raise PluginError(
                f"aligner {type(self.aligner).__name__} returned pairs that are out of range or not strictly "
                f"increasing for data.{self.split} sample {index}; an aligner must return (teacher, student) label "
                "positions increasing down the rows"
            )
        return pairs.reshape(-1).tolist()

    def _conversations(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {key: [] for key in FEATURES}
        out.update(student_label_mask=[], teacher_label_mask=[])
        if self.aligner is not None:
            out.update(alignment=[], text_differs=[])
        indices = batch["sample_id"]
        conversations = [tuple((role, content) for role, content in json.loads(raw)) for raw in batch["messages"]]
        trained = [tuple(t) for t in batch["trained"]]
        student = encode_turns_batch(
            self.student_tokenizer, conversations, trained, self.cfg, self.split, indices, self.sides[0]
        )
        teacher = (
            student
            if self.teacher_tokenizer is None
            else encode_turns_batch(
                self.teacher_tokenizer, conversations, trained, self.cfg, self.split, indices, self.sides[1]
            )
        )
        out["sample_id"] = list(indices)
        for side, encodings in (("student", student), ("teacher", teacher)):
            out[f"{side}_ids"] = [e.ids for e in encodings]
            out[f"{side}_prompt_len"] = [e.prompt_len for e in encodings]
            out[f"{side}_label_mask"] = [e.mask for e in encodings]
        if self.aligner is not None:
            from dskd.kit import Aligner, member  # local: the kit's sampling helpers import this module

            differs = member(self.aligner, Aligner, "text_differs")
            for t, s, index in zip(teacher, student, indices):
                out["alignment"].append(self._align_turns(t, s, index))
                out["text_differs"].append(
                    any(bool(differs(t.ids[t0:t1], s.ids[s0:s1])) for (t0, t1, _), (s0, s1, _) in zip(t.turns, s.turns))
                )
        return out

    def _align_turns(self, teacher: "TurnEncoding", student: "TurnEncoding", index: int) -> list[int]:
        """Turn k of the teacher with turn k of the student: the aligner pairs the two contents (each its own
        tokenisation of the same text), shifted to label positions, and the two end-of-turn tokens (their last
        tokens, when both templates write one) pair like the EOS pair of an instruction sample."""
        blocks = []
        for (t0, t1, t_end), (s0, s1, s_end) in zip(teacher.turns, student.turns):
            t_labels, s_labels = teacher.ids[t0:t1], student.ids[s0:s1]
            pairs = self._align((t_labels, 0), (s_labels, 0), index) if t_labels and s_labels else []
            block = np.asarray(pairs, dtype=np.int64).reshape(-1, 2) + [
                t0 - teacher.prompt_len,
                s0 - student.prompt_len,
            ]
            if t_end > t1 and s_end > s1:
                block = np.concatenate([block, [[t_end - 1 - teacher.prompt_len, s_end - 1 - student.prompt_len]]])
            blocks.append(block)
        return np.concatenate(blocks).astype(np.int64).reshape(-1).tolist() if blocks else []


@dataclass(frozen=True)
class TurnEncoding:
    """One side of a tokenised conversation: ids up to the last label, the first label position, the label mask over
    `ids[prompt_len:]`, and each trained turn's `(content start, content end, end-of-turn end)` token positions."""

    ids: list[int]
    prompt_len: int
    mask: list[int]
    turns: list[tuple[int, int, int]]


def encode_turns(
    tokenizer: Any,
    messages: tuple[tuple[str, str], ...],
    trained: tuple[int, ...],
    cfg: DataConfig,
    split: str,
    index: int,
    side: str,
) -> TurnEncoding:
    """A conversation rendered with `tokenizer`'s own chat template (`dskd.data.chat`), as training rows need it.

    Labels are the trained assistant turns' content and end-of-turn tokens; the ids stop after the last label (the
    template's text after it is never trained on). More than `cfg.max_length` ids is a `DataError`; conversations
    are never cut (a cut conversation would train on a turn without its context)."""
    return encode_turns_batch(tokenizer, [messages], [trained], cfg, split, [index], side)[0]


def encode_turns_batch(
    tokenizer: Any,
    conversations: list[tuple[tuple[str, str], ...]],
    trained: list[tuple[int, ...]],
    cfg: DataConfig,
    split: str,
    indices: list[int],
    side: str,
) -> list[TurnEncoding]:
    """`encode_turns` of many conversations (one tokenizer call for all of them)."""
    wheres = [f"data.{split}, sample {index}" for index in indices]
    encoded = chat.encode_conversations(tokenizer, conversations, side=side, wheres=wheres)
    return [_turn_encoding(tokenizer, e, t, cfg, w, side) for e, t, w in zip(encoded, trained, wheres)]


def _turn_encoding(tokenizer: Any, encoded, trained: tuple[int, ...], cfg: DataConfig, where: str, side: str):
    turns = [(t.content[0], t.content[1], t.marker[1]) for t in encoded.turns if t.message in trained]
    labels = encoded.label_tokens(trained)
    first, last = labels[0], labels[-1]
    if first == 0:
        raise DataError(
            f"{where}: the {side} chat template writes nothing before the first assistant turn, so no token "
            "predicts its first token; start the conversation with a user turn"
        )
    if last + 1 > cfg.max_length:
        raise DataError(
            f"{where}: {last + 1} tokens with {_tokenizer_name(tokenizer)!r} (its chat template) exceed "
            f"data.max_length = {cfg.max_length}; raise data.max_length or drop that sample"
        )
    mask = np.zeros(last + 1 - first, dtype=np.int8)
    mask[np.asarray(labels) - first] = 1
    return TurnEncoding(encoded.ids[: last + 1], first, mask.tolist(), turns)


def data_fingerprint(examples: list[Example]) -> str:
    """Content hash of a split's prompts and references (order included)."""
    digest = hashlib.sha256()
    for example in examples:
        record = [example.prompt, list(example.references)]
        if example.is_conversation:  # instruction samples keep the hash (and cache) they always had
            record += [[list(m) for m in example.messages], list(example.trained)]
        digest.update(json.dumps(record, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def aligner_fingerprint(aligner: Any | None) -> str:
    """An aligner's own `fingerprint` if it has one, else a hash of its class and attributes, taken by
    content all the way down (tokenizers by definition, arrays by bytes, objects by their fields), so a
    changed vocabulary table invalidates the cache as surely as a changed option."""
    if aligner is None:
        return "none"
    from dskd.kit import Aligner, member  # local: the kit's sampling helpers import this module

    own = member(aligner, Aligner, "fingerprint")
    if isinstance(own, str) and own:
        return own
    digest = hashlib.sha256()
    _digest_value(digest, aligner, depth=0)
    return digest.hexdigest()[:32]


def _digest_value(digest: Any, value: Any, depth: int) -> None:
    if hasattr(value, "backend_tokenizer") or hasattr(value, "get_vocab"):
        digest.update(tokenizer_fingerprint(value).encode())
    elif isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "numpy")):
        array = np.ascontiguousarray(value if isinstance(value, np.ndarray) else value.detach().cpu().numpy())
        digest.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())
    elif isinstance(value, (list, tuple)) and depth < 8:
        digest.update(f"{type(value).__name__}[{len(value)}]".encode())
        for item in value:
            _digest_value(digest, item, depth + 1)
    elif isinstance(value, dict) and depth < 8:
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _digest_value(digest, value[key], depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type) and depth < 8:
        cls = type(value)
        digest.update(f"<{cls.__module__}.{cls.__qualname__}>".encode())
        _digest_value(digest, vars(value), depth + 1)
    else:
        digest.update(repr(value).encode())
    digest.update(b"\0")


FEATURES = {
    "sample_id": Value("int64"),
    "student_ids": List(Value("int32")),
    "student_prompt_len": Value("int32"),
    "teacher_ids": List(Value("int32")),
    "teacher_prompt_len": Value("int32"),
}


def tokenize_split(
    examples: list[Example],
    student_tokenizer: Any,
    teacher_tokenizer: Any | None,
    cfg: DataConfig,
    *,
    aligner: Any | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    split: str = "train",
    sides: tuple[str, str] = ("student", "teacher"),
) -> Dataset:
    """Student and teacher ids of every example, and the alignment of their label sequences when `aligner`
    is given, as a `datasets.Dataset` (columns `sample_id`, `student_ids`, `student_prompt_len`, `teacher_ids`,
    `teacher_prompt_len`, and with an aligner `alignment` and `text_differs`: whether the two tokenizations
    disagree about the sample's text, `Aligner.text_differs`).

    Conversations are rendered by each tokenizer's own chat template and add `student_label_mask` and
    `teacher_label_mask` (1 where `ids[prompt_len:]` is a label: assistant content and end-of-turn tokens); their
    alignment pairs tokens inside corresponding assistant turns only. `sides` names the config tables the two
    tokenizers come from (for error messages: which `<side>.chat_template` to set).

    Tokenisation and alignment run in `num_workers` processes (0: this one). With `cache_dir`, the result is
    stored there under a key of the data's content, both tokenizers, the aligner and the length limits, and
    reused while none of them changes.
    """
    if not examples:
        raise DataError(f"data.{split}: split is empty; add samples or point data.{split} at another file")
    conversations = examples[0].is_conversation
    student_fp = tokenizer_fingerprint(student_tokenizer)
    teacher_fp = student_fp if teacher_tokenizer is None else tokenizer_fingerprint(teacher_tokenizer)
    if conversations:
        # The templates are part of what a conversation's ids depend on; a missing one fails here, before work.
        where = f"data.{split}"
        chat.require_template(student_tokenizer, sides[0], where)
        student_fp += chat.template_fingerprint(student_tokenizer)
        if teacher_tokenizer is None:
            teacher_fp = student_fp
        else:
            chat.require_template(teacher_tokenizer, sides[1], where)
            teacher_fp += chat.template_fingerprint(teacher_tokenizer)
    if teacher_fp == student_fp:
        teacher_tokenizer = None  # same tokenizer: the teacher columns repeat the student's, tokenised once
    key = hashlib.sha256(
        "\0".join(
            [
                str(CACHE_VERSION),
                split,
                data_fingerprint(examples),
                student_fp,
                teacher_fp,
                aligner_fingerprint(aligner),
                str(cfg.max_length),
                str(cfg.max_prompt_length),
            ]
        ).encode()
    ).hexdigest()[:24]
    target = Path(cache_dir) / f"{split}-{key}" if cache_dir else None
    if target is not None and target.is_dir():
        try:
            return load_from_disk(str(target))
        except Exception:  # a partial or foreign folder: rebuild it below
            shutil.rmtree(target, ignore_errors=True)
    features = dict(
        FEATURES, **({"alignment": List(Value("int32")), "text_differs": Value("bool")} if aligner is not None else {})
    )
    if conversations:
        features.update(student_label_mask=List(Value("int8")), teacher_label_mask=List(Value("int8")))
    columns = encoder_columns(examples, list(range(len(examples))))
    raw = Dataset.from_dict(columns)
    encoded = raw.map(
        _PairEncoder(student_tokenizer, teacher_tokenizer, cfg, aligner, split, sides),
        batched=True,
        batch_size=256,
        num_proc=num_workers or None,
        remove_columns=[name for name in columns if name != "sample_id"],
        features=Features(features),
        new_fingerprint=key,  # skips hashing the tokenizers through dill: the key already says what changed
        desc=f"tokenising data.{split}",
    )
    if target is None:
        return encoded
    return _save(encoded, target)


def _save(dataset: Dataset, target: Path) -> Dataset:
    """Write atomically (a temporary folder renamed into place), so a crash or a concurrent rank that writes
    the same key never leaves a half-written cache behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    dataset.save_to_disk(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(target))
