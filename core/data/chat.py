"""Conversations through each model's own chat template: rendering, assistant spans, labels, generation prompts.

A conversation is rendered by one tokenizer's Jinja `chat_template` (or the job's `<side>.chat_template` file, which
`dskd.models.loading` installs on the tokenizer), exactly as `apply_chat_template` renders it, and the whole rendering
is tokenised at once with `add_special_tokens=False` (the template writes BOS itself, as transformers assumes), so
the ids are the ones the model sees when it is prompted through its template.

Where the assistant turns are, is read from the rendering, never from a table of known templates:

- the content of assistant turn k starts at or after the end of the *generation prompt* of the messages before it
  (`add_generation_prompt=True`) when that rendering is a prefix of the full one, else after the previous message's
  content; it is searched forward from there. A template may trim the content (`| trim` is common): then the
  stripped content is searched. Any other change (escaping, rewording, dropping it) is "rendered differently" and
  a `DataError` naming the sample, because no span of the rendering is the data's text;
- the turn's *end-of-turn marker* is what the template writes after the assistant content when that turn is the
  last message (`</s>`, `<|im_end|>`, `<|eot_id|>`, ...), trailing whitespace removed; where the full rendering has
  that text right after the content, its tokens are labels too (one special token, or several text tokens when the
  tokenizer does not know the marker as a token), so the model learns to end its turn.

Labels are the tokens that overlap an assistant content span, plus the end-of-turn tokens; scaffolding (role
markers, BOS, whitespace between turns) never is. A template that rejects a system message (Mistral's raises
"Conversation roles must alternate") gets the system text folded into the first user turn ("system\\n\\nuser"),
the convention of templates that support it that way; `folded_system` records it for `dskd doctor`.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from dskd.errors import DataError

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Turn:
    """One assistant turn in a tokenised rendering: token ranges `[start, end)`."""

    message: int  # index of the assistant message in the conversation
    content: tuple[int, int]  # tokens overlapping the content span
    marker: tuple[int, int]  # end-of-turn tokens right after it (empty range when the template writes none)
    chars: tuple[int, int]  # the content span in the rendered text


@dataclass(frozen=True)
class EncodedConversation:
    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    turns: tuple[Turn, ...]
    folded_system: bool
    dropped: tuple[int, ...]  # messages (not assistant) whose content the rendering does not hold

    def label_tokens(self, trained: tuple[int, ...]) -> list[int]:
        """Token positions that are labels: the content and end-of-turn tokens of the trained assistant messages."""
        out: list[int] = []
        for turn in self.turns:
            if turn.message in trained:
                out.extend(range(turn.content[0], turn.content[1]))
                out.extend(range(turn.marker[0], turn.marker[1]))
        return out


def template_of(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template or ""


def template_fingerprint(tokenizer: Any) -> str:
    return _hash(template_of(tokenizer))


@functools.lru_cache(maxsize=64)
def _hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def require_template(tokenizer: Any, side: str, where: str) -> None:
    if not template_of(tokenizer):
        raise DataError(
            f"{where} holds conversations but the {side} tokenizer {_name(tokenizer)!r} has no chat template; "
            f"set {side}.chat_template to a Jinja template file (.jinja)"
        )


def _dicts(messages: tuple[Message, ...] | list[Message]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


def _fold_system(messages: list[Message]) -> tuple[list[Message], list[int]]:
    """The messages with the system text folded into the first user turn, and each one's index in `messages`."""
    system = [content for role, content in messages if role == "system"]
    rest = [(k, role, content) for k, (role, content) in enumerate(messages) if role != "system"]
    for j, (k, role, content) in enumerate(rest):
        if role == "user":
            rest[j] = (k, role, "\n\n".join(system + [content]))
            break
    else:
        first_system = next(k for k, (role, _) in enumerate(messages) if role == "system")
        rest.insert(0, (first_system, "user", "\n\n".join(system)))
    return [(role, content) for _, role, content in rest], [k for k, _, _ in rest]


def _apply(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        _dicts(messages), tokenize=False, add_generation_prompt=generation_prompt, continue_final_message=False
    )


def render(
    tokenizer: Any, messages: tuple[Message, ...] | list[Message], *, side: str, where: str, generation_prompt=False
) -> tuple[str, list[Message], list[int] | None]:
    """`(text, the messages rendered, None or, when the system text was folded into the first user turn, each
    rendered message's index in `messages`)`."""
    require_template(tokenizer, side, where.split(",")[0])
    messages = list(messages)
    has_system = any(role == "system" for role, _ in messages)
    key = template_fingerprint(tokenizer)
    error: Exception | None = None
    if not (has_system and _REJECTS_SYSTEM.get(key)):
        try:
            return _apply(tokenizer, messages, generation_prompt), messages, None
        except Exception as first:  # jinja2's TemplateError (raise_exception), or anything the template does
            error = first
    if has_system:
        folded, origin = _fold_system(messages)
        try:
            text = _apply(tokenizer, folded, generation_prompt)
            _REJECTS_SYSTEM[key] = True  # later conversations skip the attempt that raises (a costly render)
            return text, folded, origin
        except Exception as second:
            error = second
    raise DataError(
        f"{where}: the {side} chat template of {_name(tokenizer)!r} refused the conversation "
        f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); fix that sample "
        f"(e.g. alternate user and assistant turns) or set {side}.chat_template to a template that accepts it"
    )


_REJECTS_SYSTEM: dict[str, bool] = {}  # template fingerprint -> it raised on a system message and folding worked


def _find(text: str, content: str, start: int) -> tuple[int, int] | None:
    for needle in (content, content.strip()):
        if needle:
            at = text.find(needle, start)
            if at >= 0:
                return at, at + len(needle)
    return None


def _ambiguous(text: str, content: str, cursor: int) -> bool:
    needle = content if content in text[cursor:] else content.strip()
    return bool(needle) and text.count(needle, cursor) > 1


def _marker(tokenizer: Any, messages: list[Message], k: int, text: str, span: tuple[int, int]) -> str:
    """The text the template writes after assistant message k when it is the last message, trailing whitespace
    removed: the end-of-turn marker. `text` is the rendering of all `messages`, where k's content is at `span`."""
    if k == len(messages) - 1:
        return text[span[1] :].rstrip()
    try:
        alone = _apply(tokenizer, messages[: k + 1], False)
    except Exception:  # the template refuses a conversation ending there: no marker can be read
        return ""
    # The rendering up to the content is the same text when the template renders prefixes consistently (all the
    # templates we know); the content then sits at the same place.
    if alone.startswith(text[: span[1]]):
        return alone[span[1] :].rstrip()
    return ""


def locate(
    tokenizer: Any, messages: tuple[Message, ...] | list[Message], *, side: str, where: str
) -> tuple[str, list[tuple[int, int] | None], list[str], list[Message], list[int] | None]:
    """The rendering, each rendered message's content span in it (None where the template dropped it; assistant
    content must be there), each one's end-of-turn marker text (assistant messages), the messages rendered, and
    their indices in `messages` when the system text was folded (else None)."""
    text, rendered, folded = render(tokenizer, messages, side=side, where=where)
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for k, (role, content) in enumerate(rendered):
        start = cursor
        if role == "assistant" and k and _ambiguous(text, content, cursor):
            # The content also occurs earlier (in a header, or a user turn the template dropped): start the search
            # where the template's generation prompt for this turn ends. Rendered only when needed (it costs a
            # template render; most contents occur once).
            try:
                prompt = _apply(tokenizer, rendered[:k], True)
            except Exception:
                prompt = ""
            if prompt and text.startswith(prompt):
                start = max(start, len(prompt))
        span = _find(text, content, start)
        if role == "assistant":
            if span is None or not content.strip():
                what = "is empty" if not content.strip() else "is not in the rendering (the template changes it)"
                raise DataError(
                    f"{where}: assistant message {k} {what} for the {side} chat template of {_name(tokenizer)!r}; "
                    f"fix that sample, or set {side}.chat_template to a template that writes assistant content verbatim"
                )
        if span is not None:
            cursor = span[1]
        spans.append(span)
    # What the template writes after an assistant turn is the same for every turn of a conversation (templates do
    # not branch on the turn's position except for the last message): read once, after the last assistant turn
    # when nothing follows it, and checked at each turn by the caller (it must follow the content there).
    last = max(j for j, (r, _) in enumerate(rendered) if r == "assistant")
    marker = _marker(tokenizer, rendered, last, text, spans[last])
    markers = [marker if role == "assistant" else "" for role, _ in rendered]
    return text, spans, markers, rendered, folded


def _specials(tokenizer: Any) -> frozenset[int]:
    return frozenset(tokenizer.all_special_ids)


def encode_conversation(
    tokenizer: Any, messages: tuple[Message, ...] | list[Message], *, side: str, where: str
) -> EncodedConversation:
    """Render with the tokenizer's template and tokenise the whole text; each assistant turn's token ranges."""
    return encode_conversations(tokenizer, [messages], side=side, wheres=[where])[0]


def encode_conversations(
    tokenizer: Any, conversations: list, *, side: str, wheres: list[str]
) -> list[EncodedConversation]:
    """`encode_conversation` of many conversations, with one tokenizer call for all their renderings."""
    located = [locate(tokenizer, m, side=side, where=w) for m, w in zip(conversations, wheres)]
    encoded = tokenizer([x[0] for x in located], add_special_tokens=False, return_offsets_mapping=True)
    specials = _specials(tokenizer)
    return [
        _turns(tokenizer, messages, where, loc, ids, offsets, specials)
        for messages, where, loc, ids, offsets in zip(
            conversations, wheres, located, encoded["input_ids"], encoded["offset_mapping"]
        )
    ]


def _turns(tokenizer, messages, where, located, ids, offsets, specials) -> EncodedConversation:
    text, spans, markers, rendered, origin = located
    if origin is None:
        origin = list(range(len(rendered)))
    offsets = [tuple(o) for o in offsets]
    turns = []
    starts, ends = [o[0] for o in offsets], [o[1] for o in offsets]
    for k, (role, _) in enumerate(rendered):
        if role != "assistant":
            continue
        a, b = spans[k]
        # Tokens overlapping [a, b): offsets are sorted, so a binary search finds the first and the last.
        first = bisect.bisect_right(ends, a)
        last = bisect.bisect_left(starts, b)
        for i in range(first, last):
            if ids[i] in specials:
                raise DataError(
                    f"{where}: assistant message {k} holds the special-token text "
                    f"{tokenizer.convert_ids_to_tokens(ids[i])!r} of {_name(tokenizer)!r}, which its chat template "
                    "reads as a control token; remove it from that sample"
                )
        marker = markers[k]
        m_end = last
        if marker and text.startswith(marker, b):
            m_end = bisect.bisect_left(starts, b + len(marker))
        turns.append(Turn(message=origin[k], content=(first, last), marker=(last, m_end), chars=(a, b)))
    dropped = tuple(origin[k] for k, (role, _) in enumerate(rendered) if role != "assistant" and spans[k] is None)
    folded = len(rendered) != len(messages) or origin != list(range(len(messages)))
    return EncodedConversation(text, list(ids), offsets, tuple(turns), folded, dropped)


def prompt_messages(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """The messages before the last assistant turn: what evaluation prompts a model with."""
    last = max(k for k, (role, _) in enumerate(messages) if role == "assistant")
    return tuple(messages[:last])


def generation_prompt_ids(tokenizer: Any, messages: tuple[Message, ...], *, side: str, where: str) -> list[int]:
    """Ids of the conversation up to the last assistant turn, with the template's generation prompt."""
    text, _, _ = render(tokenizer, prompt_messages(messages), side=side, where=where, generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn(tokenizer: Any, messages: tuple[Message, ...], *, side: str, where: str) -> str:
    """The end-of-turn marker text the template writes after the last assistant turn of `messages`."""
    _, _, markers, rendered, _ = locate(tokenizer, messages, side=side, where=where)
    last = max(k for k, (role, _) in enumerate(rendered) if role == "assistant")
    return markers[last]


def end_of_turn_ids(tokenizer: Any, marker: str) -> list[int]:
    """The id that ends a turn in generation: the marker when it is one token of `tokenizer`, else none (the
    caller cuts the text at the marker instead)."""
    if not marker:
        return []
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return ids if len(ids) == 1 else []


def scaffolding_words(tokenizer: Any, messages: tuple[Message, ...], *, side: str, where: str) -> frozenset[str]:
    """The words a template writes around the messages (`[INST]`, `<|assistant|>`), without the special tokens (a
    generation decoded with `skip_special_tokens` never shows those)."""
    text, spans, _, _, _ = locate(tokenizer, messages, side=side, where=where)
    pieces, cursor = [], 0
    for span in sorted(s for s in spans if s is not None):
        pieces.append(text[cursor : span[0]])
        cursor = max(cursor, span[1])
    pieces.append(text[cursor:])
    scaffold = " ".join(pieces)
    for special in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        scaffold = scaffold.replace(special, " ")
    return frozenset(scaffold.split())


def foreign_scaffolding(teacher: Any, student: Any, messages: tuple[Message, ...], where: str) -> tuple[str, ...]:
    """The teacher template's words that the student's template never writes: in a student's reply they mean it
    learned the teacher's format (the chat example's `[INST]`)."""
    theirs = scaffolding_words(teacher, messages, side="teacher", where=where)
    ours = scaffolding_words(student, messages, side="student", where=where)
    return tuple(sorted(theirs - ours))
