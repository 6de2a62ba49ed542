"""`dskd doctor`: check a teacher/student pair before training.

Reports, for the two tokenizers (and models, when the folders hold a config): vocabulary sizes and padded
LM-head rows, whether the vocabularies are identical, how many tokens have an exact counterpart (the
vocabulary overlap DSKDv2's projector initialisation uses), special tokens and BOS/EOS asymmetry, and the
ETA alignment on sample text against the exact-span upper bound (with the reference's greedy matching
beside it), then recommends an objective.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from dskd.config import DataConfig, ModelConfig
from dskd.console import Console
from dskd.errors import DskdError
from dskd.evaluation.alignment_bounds import exact_span_pairs, greedy_pairs
from dskd.kit.token_bytes import exact_byte_map, vocab_bytes
from dskd.models.loading import load_tokenizer

SAMPLE_LIMIT = 200


def _sample_texts(data: str | None) -> list[str]:
    if data:
        from dskd.data.examples import load_examples

        examples = load_examples(data, DataConfig(), "doctor")
        if examples[0].is_conversation:  # every assistant turn is text the two models must align on
            return [c for e in examples[:SAMPLE_LIMIT] for role, c in e.messages if role == "assistant" and c]
        return [e.response for e in examples[:SAMPLE_LIMIT] if e.response]
    # Real prose with newlines, digits and punctuation that ships with every Python.
    paragraphs = [p.strip("\n") for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key]) if p.strip()]
    return paragraphs[:SAMPLE_LIMIT] + ["Café crème: 3½ €, naïve façade 😀 — 東京\n\tdone."]


def _label_ids(tokenizer, text: str) -> list[int]:
    """A response's label ids as training makes them (`dskd.data.examples`: literal special-token strings are text), then EOS."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]


def _model_rows(folder: str) -> int | None:
    config = Path(folder) / "config.json"
    if not config.exists():
        return None
    try:
        return int(json.loads(config.read_text()).get("vocab_size"))
    except (ValueError, TypeError, json.JSONDecodeError):
        return None


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def _side(tokenizer, folder: str) -> dict[str, Any]:
    vb = vocab_bytes(tokenizer)
    rows = _model_rows(folder)
    return {
        "path": folder,
        "family": vb.family,
        "vocab_size": len(tokenizer),
        "lm_head_rows": rows,
        "padded_head_rows": None if rows is None else max(rows - len(tokenizer), 0),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "unk": tokenizer.unk_token,
        "pad": tokenizer.pad_token,
        "adds_bos": _adds_bos(tokenizer),
    }


def diagnose(teacher_path: str, student_path: str, data: str | None = None) -> dict[str, Any]:
    from dskd.kit.objective import same_vocabulary
    from dskd.registry import load_registry

    teacher = load_tokenizer(ModelConfig(tokenizer=teacher_path), "teacher")
    student = load_tokenizer(ModelConfig(tokenizer=student_path), "student")
    report: dict[str, Any] = {"teacher": _side(teacher, teacher_path), "student": _side(student, student_path)}
    same = same_vocabulary(teacher, student)
    mapping = exact_byte_map(vocab_bytes(teacher), vocab_bytes(student))
    overlap = int((mapping >= 0).sum())
    report["vocabulary"] = {
        "identical": same,
        "exact_overlap": overlap,
        "overlap_of_teacher": overlap / max(len(teacher), 1),
        "overlap_of_student": len(set(mapping[mapping >= 0].tolist())) / max(len(student), 1),
    }
    warnings = []
    if report["teacher"]["adds_bos"] != report["student"]["adds_bos"]:
        warnings.append(
            "only one tokenizer adds BOS: the sequences differ by one position; align with eta, never by index"
        )
    for side in ("teacher", "student"):
        if report[side]["padded_head_rows"]:
            warnings.append(
                f"the {side} LM head has {report[side]['padded_head_rows']} rows past its tokenizer (padding); dskd ignores them"
            )
    registry = load_registry()
    aligner = registry.get("aligners", registry.default("aligners"))(teacher, student)
    texts = _sample_texts(data)
    eta_pairs = bound = greedy = greedy_exact = student_tokens = mismatches = 0
    for text in texts:
        t_ids, s_ids = _label_ids(teacher, text), _label_ids(student, text)
        eta_pairs += len(aligner.align(t_ids, s_ids))
        mismatches += bool(getattr(aligner, "text_differs", lambda *_: False)(t_ids, s_ids))
        exact = set(exact_span_pairs(teacher, student, text)) | {(len(t_ids) - 1, len(s_ids) - 1)}
        found = greedy_pairs(
            teacher.convert_ids_to_tokens(t_ids),
            student.convert_ids_to_tokens(s_ids),
            teacher.eos_token,
            student.eos_token,
        )
        bound += len(exact)
        greedy += len(found)
        # Like for like with ETA: only the greedy pairs whose spans on the original text coincide, not its
        # pairs of space-only tokens at different places or of runs of different length.
        greedy_exact += len(exact.intersection(found))
        student_tokens += len(s_ids)
    report["alignment"] = {
        "samples": len(texts),
        "source": data or "pydoc_data.topics paragraphs",
        "student_tokens": student_tokens,
        "eta_pairs": eta_pairs,
        "exact_span_pairs": bound,
        "eta_recall": eta_pairs / max(bound, 1),
        "eta_ratio": eta_pairs / max(student_tokens, 1),
        "reference_greedy_pairs": greedy,
        "reference_greedy_exact_pairs": greedy_exact,
        "reference_greedy_ratio": greedy_exact / max(student_tokens, 1),
        "normalisation_mismatches": mismatches,
    }
    if mismatches:
        warnings.append(
            f"in {mismatches} of {len(texts)} samples the two tokenizers decode to different text (a normaliser such "
            "as NFC/NFKC, or a special-token string); ETA pairs around the difference, the tokens it touches stay unpaired"
        )
    report["warnings"] = warnings
    report["recommended"] = _recommend(same, report)
    return report


def _recommend(same: bool, report: dict[str, Any]) -> dict[str, str]:
    if same:
        return {"objective": "dskd_v2", "aligner": "", "why": "identical vocabularies: positions pair one to one"}
    ratio = report["alignment"]["eta_ratio"]
    if ratio >= 0.3 and report["vocabulary"]["exact_overlap"] >= 1000:
        return {
            "objective": "dskd_v2",
            "aligner": "eta",
            "why": f"{ratio:.0%} of student tokens have an exact teacher counterpart; DSKDv2 with ETA distils on those",
        }
    return {
        "objective": "dskd_cma",
        "aligner": "",
        "why": f"only {ratio:.0%} of student tokens align exactly; cross-model attention needs no exact alignment",
    }


# A conversation that uses every role, for `--chat` without data: what the two templates must agree on.
SAMPLE_CONVERSATION = (
    ("system", "You are a concise assistant."),
    ("user", "What is 17 plus 25?"),
    ("assistant", "42"),
    ("user", "Now spell 'river' backwards, please."),
    ("assistant", "revir\n\nAnything else?"),
)


def diagnose_chat(
    teacher_path: str, student_path: str, data: str | None = None, templates: tuple[str, str] = ("", "")
) -> dict[str, Any]:
    """Both renderings of one conversation with their label spans, the aligned fraction of assistant tokens
    (against the exact-span bound), and warnings: a template that drops or folds a role the conversation uses, and
    assistant spans whose text differs between the two templates."""
    from dskd.data import chat
    from dskd.data.examples import load_examples
    from dskd.data.records import Example
    from dskd.registry import load_registry

    tokenizers = {
        side: load_tokenizer(ModelConfig(tokenizer=path, chat_template=template), side)
        for side, path, template in (("teacher", teacher_path, templates[0]), ("student", student_path, templates[1]))
    }
    for (side, tok), flag in zip(tokenizers.items(), ("--teacher-template", "--student-template")):
        if not chat.template_of(tok):
            raise DskdError(f"the {side} tokenizer {tok.name_or_path!r} has no chat template; pass {flag} FILE.jinja")
    if data:
        conversations = [e for e in load_examples(data, DataConfig(format="conversation"), "doctor")]
        sample, source = conversations[0], f"{data}, sample 0"
    else:
        sample = Example("", (SAMPLE_CONVERSATION[-1][1],), SAMPLE_CONVERSATION, (2, 4))
        source = "built-in sample"
    encoded = {
        side: chat.encode_conversation(tok, sample.messages, side=side, where=f"{source}")
        for side, tok in tokenizers.items()
    }
    registry = load_registry()
    aligner = registry.get("aligners", registry.default("aligners"))(tokenizers["teacher"], tokenizers["student"])
    pairs = bound = student_tokens = 0
    warnings = []
    roles_used = {role for role, _ in sample.messages}
    for side, enc in encoded.items():
        if enc.folded_system:
            warnings.append(
                f"the {side} template has no system role: the system prompt is folded into the first user turn"
            )
        for k in enc.dropped:
            warnings.append(
                f"the {side} template drops message {k} ({sample.messages[k][0]}): its text is not in the rendering"
            )
    t_enc, s_enc = encoded["teacher"], encoded["student"]
    for t_turn, s_turn in zip(t_enc.turns, s_enc.turns):
        t_text, s_text = t_enc.text[slice(*t_turn.chars)], s_enc.text[slice(*s_turn.chars)]
        if t_text != s_text:
            warnings.append(
                f"assistant message {t_turn.message}: the templates put different text in its span "
                f"({t_text[:30]!r} vs {s_text[:30]!r}); tokens outside the common text stay unpaired"
            )
        t_ids, s_ids = t_enc.ids[slice(*t_turn.content)], s_enc.ids[slice(*s_turn.content)]
        pairs += len(aligner.align(t_ids, s_ids)) + (
            t_turn.marker[1] > t_turn.marker[0] and s_turn.marker[1] > s_turn.marker[0]
        )
        exact = exact_span_pairs(tokenizers["teacher"], tokenizers["student"], s_text if t_text == s_text else "")
        bound += len(exact) + 1
        student_tokens += (s_turn.content[1] - s_turn.content[0]) + (s_turn.marker[1] - s_turn.marker[0])
    return {
        "source": source,
        "roles": sorted(roles_used),
        "teacher": {"rendering": _marked(t_enc), "end_of_turn": [_marker_text(t_enc, t) for t in t_enc.turns]},
        "student": {"rendering": _marked(s_enc), "end_of_turn": [_marker_text(s_enc, t) for t in s_enc.turns]},
        "assistant_tokens": student_tokens,
        "aligned_pairs": pairs,
        "aligned_fraction": pairs / max(student_tokens, 1),
        "exact_span_bound": bound,
        "recall_of_bound": pairs / max(bound, 1),
        "warnings": warnings,
    }


def _marker_text(enc, turn) -> str:
    return "".join(enc.text[slice(*enc.offsets[i])] for i in range(*turn.marker))


def _marked(enc) -> str:
    """The rendering with each label span (assistant content and its end-of-turn tokens) in «guillemets»."""
    out, cursor = [], 0
    for turn in enc.turns:
        start = enc.offsets[turn.content[0]][0] if turn.content[1] > turn.content[0] else turn.chars[0]
        end = enc.offsets[turn.marker[1] - 1][1] if turn.marker[1] > turn.marker[0] else turn.chars[1]
        out += [enc.text[cursor:start], "«", enc.text[start:end], "»"]
        cursor = end
    out.append(enc.text[cursor:])
    return "".join(out)


def run_doctor(
    teacher: str,
    student: str,
    *,
    data: str | None = None,
    as_json: bool = False,
    chat: bool = False,
    templates: tuple[str, str] = ("", ""),
) -> int:
    for role, path in (("teacher", teacher), ("student", student)):
        if not Path(path).exists():
            raise DskdError(f"--{role} {path}: no such folder; pass a model or tokenizer folder")
    for role, path in zip(("teacher", "student"), templates):
        if path and not Path(path).is_file():
            raise DskdError(f"--{role}-template {path}: no such file; pass a Jinja chat template file")
    report = diagnose(teacher, student, data)
    if chat:
        report["chat"] = diagnose_chat(teacher, student, data, templates)
        report["warnings"] += report["chat"]["warnings"]
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    console = Console()
    rows = [
        [key, str(report["teacher"][key]), str(report["student"][key])]
        for key in ("family", "vocab_size", "lm_head_rows", "padded_head_rows", "bos", "eos", "unk", "pad", "adds_bos")
    ]
    console.table("tokenizers", ["", "teacher", "student"], rows)
    v, a, r = report["vocabulary"], report["alignment"], report["recommended"]
    console.print(
        f"vocabularies identical: {v['identical']}; exact overlap {v['exact_overlap']} tokens "
        f"({v['overlap_of_teacher']:.1%} of the teacher's, {v['overlap_of_student']:.1%} of the student's)"
    )
    console.print(
        f"ETA on {a['samples']} samples ({a['source']}): {a['eta_pairs']} pairs of {a['exact_span_pairs']} exact spans "
        f"(recall {a['eta_recall']:.3f}); {a['eta_ratio']:.1%} of student tokens aligned; "
        f"the reference's greedy matching: {a['reference_greedy_exact_pairs']} exact pairs "
        f"({a['reference_greedy_ratio']:.1%} of student tokens) of the {a['reference_greedy_pairs']} it makes"
    )
    if chat:
        c = report["chat"]
        for side in ("teacher", "student"):
            console.print(f"[bold]{side} rendering[/bold] ({c['source']}; «labels»):")
            console.print(c[side]["rendering"], markup=False)  # a rendering is full of [brackets]
        console.print(
            f"chat: {c['aligned_pairs']} of {c['assistant_tokens']} student assistant tokens aligned "
            f"({c['aligned_fraction']:.1%}); {c['recall_of_bound']:.3f} of the exact-span bound ({c['exact_span_bound']})"
        )
    for warning in report["warnings"]:
        console.warn(warning)
    aligner = f" with aligner {r['aligner']}" if r["aligner"] else ""
    console.print(f"[bold]recommended:[/bold] objective {r['objective']}{aligner} — {r['why']}")
    return 0
