"""One raw record (a dict) -> one `Example`: the three record shapes and their checks.

- instruction records: an instruction (and optional context) rendered through `data.template`, and a response
  (or a list of references); or a complete prompt in `data.prompt_field`. Unchanged from before the other shapes.
- prompt/completion records (TRL's convention): `prompt` and `completion` strings, used as they are; or TRL's
  conversational form, where both are lists of messages (the completion's assistant turns are the labels).
- conversations: `messages`, a list of `{role, content}` with roles system, user and assistant (the OpenAI/TRL
  format). Each model renders them with its own chat template (`dskd.data.chat`).

`detect_shape` picks the shape from a split's fields (`data.format` overrides it) and `to_example` converts one
row, so a reader that streams rows converts each on its own. Every problem is a one-line `DataError` naming the
split, the sample and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from dskd.config import DataConfig
from dskd.errors import DataError

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{context}\n\n### Response:\n"
)
_PLACEHOLDER = re.compile(r"\{(instruction|context)\}")

ROLES = ("system", "user", "assistant")
SHAPES = ("instruction", "prompt_completion", "conversation")


@dataclass(frozen=True)
class Example:
    """One sample: the complete prompt text and its reference responses (the first is trained on).

    A conversation has `messages` (`(role, content)` pairs) and `trained`, the indices of the assistant messages
    that are labels; its `prompt` is empty (each model renders its own) and its reference is the last assistant
    turn, which evaluation scores the reply to the conversation before it against.
    """

    prompt: str
    references: tuple[str, ...]
    messages: tuple[tuple[str, str], ...] = ()
    trained: tuple[int, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()  # (field, value) of the fields teachers are routed by (`[[teachers]] route`)

    @property
    def response(self) -> str:
        return self.references[0]

    @property
    def is_conversation(self) -> bool:
        return bool(self.messages)


def render_prompt(instruction: str, context: str, template: str) -> str:
    """The prompt for one record: the Alpaca template (with an input section only when there is context) or a
    custom template whose `{instruction}` and `{context}` are substituted (other braces are left alone)."""
    if template == "alpaca":
        template = ALPACA_WITH_CONTEXT if context.strip() else ALPACA
    # One pass, so a "{context}" written inside the instruction text stays as it is.
    values = {"instruction": instruction, "context": context}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def prompt_name(cfg: DataConfig) -> str:
    return cfg.prompt_field or "prompt"


def detect_shape(columns: list[str], cfg: DataConfig) -> str:
    """The record shape of a split with these fields: `data.format`, or read from the fields."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_field in columns:
        return "conversation"
    if prompt_name(cfg) in columns and cfg.completion_field in columns:
        return "prompt_completion"
    return "instruction"


def needed_fields(shape: str, cfg: DataConfig) -> list[tuple[str, str]]:
    """`(config key, field)` a split of this shape must have."""
    if shape == "conversation":
        return [("messages_field", cfg.messages_field)]
    if shape == "prompt_completion":
        return [("prompt_field", prompt_name(cfg)), ("completion_field", cfg.completion_field)]
    key = "prompt_field" if cfg.prompt_field else "instruction_field"
    return [(key, cfg.prompt_field or cfg.instruction_field), ("response_field", cfg.response_field)]


def check_template(template: str) -> None:
    if template != "alpaca" and "{instruction}" not in template:
        raise DataError(
            f'data.template {template[:40]!r} has no {{instruction}}; use "alpaca" or a string with {{instruction}} (and {{context}})'
        )


def to_example(
    row: dict[str, Any],
    cfg: DataConfig,
    shape: str,
    where: str,
    index: int,
    *,
    use_context: bool = True,
    tag_fields: tuple[str, ...] = (),
) -> Example:
    """One record of the given shape as an `Example` (`use_context`: the split has the context field), with the
    values of `tag_fields` as its tags (a field the record lacks, or null, gives no tag)."""
    example = _to_example(row, cfg, shape, where, index, use_context=use_context)
    if not tag_fields:
        return example
    tags = tuple((name, str(row[name])) for name in tag_fields if row.get(name) is not None)
    return dataclasses.replace(example, tags=tags)


def _to_example(
    row: dict[str, Any], cfg: DataConfig, shape: str, where: str, index: int, *, use_context: bool
) -> Example:
    if shape == "conversation":
        messages = _messages(row.get(cfg.messages_field), cfg.messages_field, where, index)
        return _conversation(messages, None, cfg, where, index)
    if shape == "prompt_completion":
        return _prompt_completion(row, cfg, where, index)
    text = _string(row, cfg.prompt_field or cfg.instruction_field, where, index)
    references = _references(row, cfg.response_field, where, index)
    if not cfg.prompt_field:
        context = _string(row, cfg.context_field, where, index, optional=True) if use_context else ""
        if context.strip() and cfg.template != "alpaca" and "{context}" not in cfg.template:
            raise DataError(
                f"{where}, sample {index}: has a {cfg.context_field!r} but data.template has no {{context}}; "
                'add {context} to the template, or set data.context_field = "" to ignore context'
            )
        text = render_prompt(text, context, cfg.template)
    return Example(prompt=text, references=references)


def _prompt_completion(row: dict[str, Any], cfg: DataConfig, where: str, index: int) -> Example:
    name = prompt_name(cfg)
    prompt, completion = row.get(name), row.get(cfg.completion_field)
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational prompt/completion: the completion's assistant turns are the labels.
        before = _messages(prompt, name, where, index)
        after = _messages(completion, cfg.completion_field, where, index)
        return _conversation(before + after, len(before), cfg, where, index)
    return Example(
        prompt=_string(row, name, where, index), references=(_string(row, cfg.completion_field, where, index),)
    )


def _conversation(
    messages: tuple[tuple[str, str], ...], first_trained: int | None, cfg: DataConfig, where: str, index: int
) -> Example:
    assistant = [k for k, (role, _) in enumerate(messages) if role == "assistant"]
    if first_trained is not None:
        assistant = [k for k in assistant if k >= first_trained]
    if not assistant:
        raise DataError(
            f"{where}, sample {index}: the conversation has no assistant turn to train on; add one or drop that sample"
        )
    trained = tuple(assistant[-1:] if cfg.train_on == "last" else assistant)
    return Example(prompt="", references=(messages[assistant[-1]][1],), messages=messages, trained=trained)


def _messages(value: Any, field: str, where: str, index: int) -> tuple[tuple[str, str], ...]:
    fix = f"store a list of {{role, content}} objects in {field!r}"
    if not isinstance(value, list) or not value:
        got = "missing" if value is None else "an empty list" if value == [] else f"a {type(value).__name__}"
        raise DataError(f"{where}, sample {index}: field {field!r} is {got}, not a list of messages; {fix}")
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            what = f"a {type(message).__name__}" if not isinstance(message, dict) else f"keys {sorted(message)}"
            raise DataError(
                f"{where}, sample {index}: message {k} of {field!r} is {what}, not a {{role, content}} object; {fix}"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(
                f"{where}, sample {index}: message {k} has unknown role {role!r}; use system, user or assistant"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where}, sample {index}: message {k} ({role}) has content of type {type(content).__name__}, "
                "not a string; write the content as text"
            )
        out.append((role, content))
    return tuple(out)


def _string(row: dict[str, Any], name: str, where: str, index: int, optional: bool = False) -> str:
    value = row.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"
        raise DataError(
            f"{where}, sample {index}: field {name!r} is {got}, not a string; store text in it or fix that sample"
        )
    return value


def _references(row: dict[str, Any], name: str, where: str, index: int) -> tuple[str, ...]:
    value = row.get(name)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, list):
        raise DataError(
            f"{where}, sample {index}: field {name!r} must be a string or a non-empty list of strings; fix that sample"
        )
    return (_string(row, name, where, index),)
