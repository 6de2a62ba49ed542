"""Conversations through each model's own chat template: labels, per-turn alignment, train_on, generation prompts.

Real tokenizers (`examples/tokenizers/`) with their real templates (Mistral's `[INST]`, TinyLlama's Zephyr), and a
ChatML template written here that no bundled tokenizer knows (its `<|im_end|>` is then ordinary text), so nothing
depends on a table of known templates.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from tiny_job import TOKENIZERS
from transformers import AutoTokenizer

from dskd.config import DataConfig
from dskd.data import chat
from dskd.data.batching import collate
from dskd.data.examples import encode_turns, load_examples, tokenize_split
from dskd.data.records import to_example
from dskd.errors import DataError
from dskd.registry import load_registry
from dskd.types import IGNORE_INDEX

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A Llama-3-like template that trims content and ends turns with a marker after a newline-free header.
TRIMMING = (
    "{{ bos_token }}{% for message in messages %}{{ '[' + message['role'] + ']: ' + message['content'] | trim + ' <<END>>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]: ' }}{% endif %}"
)

CONVERSATION = (
    ("system", "You are terse."),
    ("user", "What is 12 plus 30?"),
    ("assistant", "42"),
    ("user", "Spell it backwards: river\nthen stop."),
    ("assistant", "The answer is revir, done.\n  Bye!"),
)


@functools.lru_cache(maxsize=None)  # loading a tokenizer is most of these tests' time; none of them changes one
def tokenizer(name: str, template: str | None = None):
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    if template is not None:
        tok.chat_template = template
    return tok


def pairs_under_test():
    """(label, tokenizer) for the bundled templates and two written here (one of them on GPT-2, which has none)."""
    return {
        "mistral-inst": lambda: tokenizer("mistral"),
        "tinyllama-zephyr": lambda: tokenizer("tinyllama"),
        "gpt2-chatml": lambda: tokenizer("gpt2", CHATML),
        "tinyllama-chatml": lambda: tokenizer("tinyllama", CHATML),
        "mistral-trimming": lambda: tokenizer("mistral", TRIMMING),
    }


def example(messages=CONVERSATION, train_on="all"):
    row = {"messages": [{"role": r, "content": c} for r, c in messages]}
    return to_example(row, DataConfig(train_on=train_on), "conversation", "data.train", 0)


def covered_text(text: str, offsets, positions) -> str:
    """The characters of the rendering that the tokens at `positions` cover, in order, without overlaps."""
    out, cursor = [], 0
    for p in positions:
        a, b = offsets[p]
        out.append(text[max(a, cursor) : b])
        cursor = max(cursor, b)
    return "".join(out)


@pytest.mark.parametrize("name", list(pairs_under_test()))
def test_labels_are_exactly_each_assistant_content_and_its_end_of_turn_marker(name):
    tok = pairs_under_test()[name]()
    ex = example()
    encoded = chat.encode_conversation(tok, ex.messages, side="student", where="t")
    assert [t.message for t in encoded.turns] == [2, 4]
    for turn in encoded.turns:
        content = dict(enumerate(ex.messages))[turn.message][1]
        got = covered_text(encoded.text, encoded.offsets, range(*turn.content))
        # The content tokens cover the content (stripped where the template trims it), nothing of the scaffolding
        # except what a token merges across the edge (spaces of a SentencePiece word start).
        assert got.strip() == content.strip()
        end = covered_text(encoded.text, encoded.offsets, range(*turn.marker))
        assert end and end == encoded.text[turn.chars[1] : turn.chars[1] + len(end)]
        assert end.strip() in {"</s>", "<|im_end|>", "<<END>>"}
    # Decoding the label ids gives the same text back (specials kept).
    labels = encoded.label_tokens(ex.trained)
    decoded = tok.decode([encoded.ids[p] for p in labels])
    for text in ("42", "revir", "Bye!"):
        assert text in decoded
    for scaffold in ("[INST]", "<|user|>", "<|im_start|>", "[user]", "You are terse", "12 plus 30"):
        assert scaffold not in decoded


@pytest.mark.parametrize("name", list(pairs_under_test()))
def test_the_collated_labels_are_the_assistant_tokens_and_minus_100_elsewhere(name):
    tok = pairs_under_test()[name]()
    ex = example()
    enc = encode_turns(tok, ex.messages, ex.trained, DataConfig(), "train", 0, "student")
    full = chat.encode_conversation(tok, ex.messages, side="student", where="t")
    row = {
        "sample_id": 0,
        "student_ids": enc.ids,
        "student_prompt_len": enc.prompt_len,
        "teacher_ids": enc.ids,
        "teacher_prompt_len": enc.prompt_len,
        "student_label_mask": enc.mask,
        "teacher_label_mask": enc.mask,
    }
    batch = collate([row], student_pad_id=0, teacher_pad_id=0)
    labels = batch.student_labels[0].tolist()
    expected = [IGNORE_INDEX] * len(labels)
    for p in full.label_tokens(ex.trained):
        expected[p - 1] = full.ids[p]  # position p - 1 predicts token p
    assert labels == expected


def _trimmed(text: str, a: int, b: int) -> tuple[int, int] | None:
    piece = text[a:b]
    if not piece.strip(" "):  # a token of spaces only stands for those spaces (as ETA keeps them)
        return (a, b) if piece else None
    return a + len(piece) - len(piece.lstrip(" ")), b - (len(piece) - len(piece.rstrip(" ")))


def independent_pairs(t_enc, s_enc, t_turns, s_turns):
    """Per turn: tokens whose content-relative character spans (edge spaces trimmed) coincide, plus the two
    end-of-turn tokens; in label positions. ASCII text, so a character is a byte."""
    out = []
    for (t0, t1, te), (s0, s1, se), (ta, _), (sa, _) in zip(
        t_turns, s_turns, [t.chars for t in t_enc[1]], [t.chars for t in s_enc[1]]
    ):
        t_spans = {}
        for i in range(t0, t1):
            span = _trimmed(t_enc[0].text, *t_enc[0].offsets[i])
            if span:
                t_spans[(span[0] - ta, span[1] - ta)] = i
        for j in range(s0, s1):
            span = _trimmed(s_enc[0].text, *s_enc[0].offsets[j])
            if span and (span[0] - sa, span[1] - sa) in t_spans:
                out.append((t_spans[(span[0] - sa, span[1] - sa)], j))
        if te > t1 and se > s1:
            out.append((te - 1, se - 1))
    return out


@pytest.mark.parametrize(
    "teacher_name,student_name",
    [("mistral-inst", "tinyllama-zephyr"), ("gpt2-chatml", "mistral-inst"), ("tinyllama-chatml", "gpt2-chatml")],
)
def test_alignment_pairs_lie_inside_corresponding_turns_and_match_an_independent_computation(
    teacher_name, student_name
):
    teacher, student = pairs_under_test()[teacher_name](), pairs_under_test()[student_name]()
    ex = example()
    aligner = load_registry().get("aligners", "eta")(teacher, student)
    row = tokenize_split([ex], student, teacher, DataConfig(), aligner=aligner)[0]
    pairs = [tuple(p) for p in np.asarray(row["alignment"]).reshape(-1, 2).tolist()]
    t_full = chat.encode_conversation(teacher, ex.messages, side="teacher", where="t")
    s_full = chat.encode_conversation(student, ex.messages, side="student", where="t")
    t_turns = [(t.content[0], t.content[1], t.marker[1]) for t in t_full.turns]
    s_turns = [(t.content[0], t.content[1], t.marker[1]) for t in s_full.turns]
    tp, sp = row["teacher_prompt_len"], row["student_prompt_len"]
    absolute = [(a + tp, b + sp) for a, b in pairs]
    # Every pair is inside turn k on both sides, for the same k.
    for a, b in absolute:
        k_t = [k for k, (x, _, e) in enumerate(t_turns) if x <= a < e]
        k_s = [k for k, (x, _, e) in enumerate(s_turns) if x <= b < e]
        assert k_t and k_t == k_s
    expected = independent_pairs((t_full, t_full.turns), (s_full, s_full.turns), t_turns, s_turns)
    assert absolute == expected
    assert len(expected) >= 8  # the texts share most words: the check is not vacuous
    # The collated batch keeps every pair (each sits on two valid labels).
    batch = collate([row], student_pad_id=0, teacher_pad_id=0)
    assert batch.aligned_rows.shape[0] == len(pairs)


def test_train_on_last_labels_only_the_final_assistant_turn():
    tok = tokenizer("tinyllama")
    all_turns, last = example(), example(train_on="last")
    assert all_turns.trained == (2, 4) and last.trained == (4,)
    enc = encode_turns(tok, last.messages, last.trained, DataConfig(), "train", 0, "student")
    labelled = [i for i, m in zip(enc.ids[enc.prompt_len :], enc.mask) if m]
    decoded = tok.decode(labelled)
    assert "revir" in decoded and "42" not in decoded
    full = encode_turns(tok, all_turns.messages, all_turns.trained, DataConfig(), "train", 0, "student")
    assert full.prompt_len < enc.prompt_len and full.ids == enc.ids


def test_a_template_without_a_system_role_gets_the_system_text_folded_into_the_first_user_turn():
    tok = tokenizer("mistral")
    encoded = chat.encode_conversation(tok, CONVERSATION, side="teacher", where="t")
    assert encoded.folded_system
    assert "[INST] You are terse.\n\nWhat is 12 plus 30? [/INST]" in encoded.text
    assert [t.message for t in encoded.turns] == [2, 4]  # indices of the conversation as written


@pytest.mark.parametrize("name", ["tinyllama-zephyr", "tinyllama-chatml", "mistral-inst", "mistral-trimming"])
def test_the_evaluation_prompt_is_the_history_with_the_generation_prompt_and_a_prefix_of_the_training_text(name):
    tok = pairs_under_test()[name]()
    ex = example()
    ids = chat.generation_prompt_ids(tok, ex.messages, side="student", where="t")
    text = tok.decode(ids)
    history = chat.prompt_messages(ex.messages)
    assert history == CONVERSATION[:4]
    rendered, _, _ = chat.render(tok, history, side="student", where="t", generation_prompt=True)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    tail = {"tinyllama-zephyr": "<|assistant|>", "tinyllama-chatml": "<|im_start|>assistant", "mistral-inst": "[/INST]"}
    assert text.rstrip().endswith(tail.get(name, "[assistant]:"))
    # What training sees before the last answer is the same text: the model is prompted as it was trained.
    full = chat.encode_conversation(tok, ex.messages, side="student", where="t")
    assert full.text.startswith(rendered)


def test_the_end_of_turn_marker_is_read_from_the_rendering_and_is_a_stop_id_when_it_is_one_token():
    assert chat.end_of_turn(tokenizer("tinyllama"), CONVERSATION, side="s", where="t") == "</s>"
    chatml = tokenizer("tinyllama", CHATML)
    marker = chat.end_of_turn(chatml, CONVERSATION, side="s", where="t")
    assert marker == "<|im_end|>" and chat.end_of_turn_ids(chatml, marker) == []  # text here, not a token
    tok = tokenizer("mistral")
    assert chat.end_of_turn_ids(tok, chat.end_of_turn(tok, CONVERSATION, side="t", where="t")) == [tok.eos_token_id]


def test_the_teacher_scaffolding_measure_names_the_teacher_templates_own_words():
    words = chat.foreign_scaffolding(tokenizer("mistral"), tokenizer("tinyllama"), CONVERSATION, "t")
    assert words == ("[/INST]", "[INST]")


# -- record shapes ---------------------------------------------------------------------------------------------


def write(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_strings_train_on_the_completion_exactly_like_an_instruction_with_a_full_prompt(tmp_path):
    rows = [{"prompt": "Q: two plus two?\nA:", "completion": " 4"}]
    pc = load_examples(write(tmp_path, rows), DataConfig(), "train")
    same = load_examples(
        write(tmp_path, [{"p": rows[0]["prompt"], "response": " 4"}]), DataConfig(prompt_field="p"), "train"
    )
    assert pc == same and not pc[0].is_conversation


def test_conversational_prompt_completion_labels_only_the_completion_turns(tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Sum 1 2"},
            ],
            "completion": [{"role": "assistant", "content": "3"}],
        }
    ]
    (ex,) = load_examples(write(tmp_path, rows), DataConfig(), "train")
    assert ex.is_conversation and ex.trained == (3,) and ex.references == ("3",)


def test_the_format_setting_overrides_detection(tmp_path):
    rows = [{"messages": "not used", "instruction": "Say hi", "response": "hi"}]
    (ex,) = load_examples(write(tmp_path, rows), DataConfig(format="instruction", template="{instruction}"), "train")
    assert ex.prompt == "Say hi" and not ex.is_conversation


# -- bad input: one line naming the sample and the fix -----------------------------------------------------------


@pytest.mark.parametrize(
    "messages,needle",
    [
        ("hello", "not a list of messages"),
        ([], "an empty list"),
        ([["user", "hi"]], "not a {role, content} object"),
        ([{"role": "user"}], "not a {role, content} object"),
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "not a string"),
    ],
)
def test_malformed_conversations_are_one_line_errors_naming_the_sample(tmp_path, messages, needle):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 2
    rows.append({"messages": messages})
    with pytest.raises(DataError) as error:
        load_examples(write(tmp_path, rows), DataConfig(format="conversation"), "train")
    assert needle in str(error.value) and "sample 2" in str(error.value) and "\n" not in str(error.value)


def test_a_template_that_raises_names_the_sample_and_the_templates_message():
    ex = example((("user", "a"), ("user", "b"), ("assistant", "c")))
    with pytest.raises(DataError) as error:
        encode_turns(tokenizer("mistral"), ex.messages, ex.trained, DataConfig(), "train", 7, "teacher")
    line = str(error.value)
    assert "sample 7" in line and "roles must alternate" in line and "teacher.chat_template" in line


def test_a_template_that_rewrites_the_assistant_content_is_an_error_naming_the_sample():
    tok = tokenizer("tinyllama", CHATML.replace("message['content']", "message['content'] | upper"))
    ex = example((("user", "a"), ("assistant", "lower case")))
    with pytest.raises(DataError) as error:
        encode_turns(tok, ex.messages, ex.trained, DataConfig(), "valid", 3, "student")
    assert "sample 3" in str(error.value) and "not in the rendering" in str(error.value)


def test_a_model_without_a_chat_template_names_the_setting_to_give_it():
    ex = example()
    with pytest.raises(DataError) as error:
        tokenize_split([ex], tokenizer("gpt2"), tokenizer("tinyllama"), DataConfig(), split="train")
    assert "student.chat_template" in str(error.value) and "gpt2" in str(error.value)


def test_a_conversation_longer_than_max_length_is_an_error_never_cut():
    ex = example()
    with pytest.raises(DataError, match="max_length = 16"):
        encode_turns(tokenizer("tinyllama"), ex.messages, ex.trained, DataConfig(max_length=16), "train", 0, "s")


# -- doctor --------------------------------------------------------------------------------------------------------


def test_doctor_chat_marks_both_label_spans_reports_the_aligned_fraction_and_warns_about_a_folded_system_role():
    from dskd.evaluation.doctor import diagnose_chat

    report = diagnose_chat(str(TOKENIZERS / "mistral"), str(TOKENIZERS / "tinyllama"))
    assert "[/INST]«42</s>»" in report["teacher"]["rendering"]
    assert "<|assistant|>\n«42</s>»" in report["student"]["rendering"]
    assert 0.5 < report["aligned_fraction"] <= 1 and report["aligned_pairs"] > 0
    assert any("teacher template has no system role" in w for w in report["warnings"])
    assert not any("student template" in w for w in report["warnings"])


def test_doctor_chat_warns_when_a_template_drops_a_role_or_changes_the_assistant_text(tmp_path):
    from dskd.evaluation.doctor import diagnose_chat

    no_system = tmp_path / "no_system.jinja"
    no_system.write_text(
        CHATML.replace("{% for message in messages %}", "{% for message in messages if message['role'] != 'system' %}")
    )
    trimming = tmp_path / "trimming.jinja"
    trimming.write_text(TRIMMING)
    data = tmp_path / "chat.jsonl"
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    messages[-1]["content"] += "\n"  # the trimming template leaves this newline out of its assistant span
    data.write_text(json.dumps({"messages": messages}) + "\n")
    report = diagnose_chat(
        str(TOKENIZERS / "gpt2"), str(TOKENIZERS / "tinyllama"), str(data), (str(no_system), str(trimming))
    )
    assert any("teacher template drops message 0 (system)" in w for w in report["warnings"])
    assert any("different text in its span" in w for w in report["warnings"])  # "...Bye!" vs trimmed


# -- through the CLI: one line, exit status 2, nothing written over -------------------------------------------------


def chat_job(tmp_path):
    import shutil

    from tiny_job import write_job

    path = write_job(tmp_path)
    rows = (TOKENIZERS.parent / "chat" / "data" / "train.jsonl").read_text().splitlines()
    for split, n in (("train", 24), ("valid", 8), ("test", 4)):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows[:n]) + "\n")
    bare = tmp_path / "bare-tokenizer"  # TinyLlama's tokenizer without its chat template
    shutil.copytree(TOKENIZERS / "tinyllama", bare, ignore=shutil.ignore_patterns("chat_template.jinja"))
    return path, bare


@pytest.mark.integration
def test_the_cli_names_the_chat_template_setting_for_a_student_without_a_template(tmp_path):
    from test_cli_bad_input import one_line_error, run

    path, bare = chat_job(tmp_path)
    line = one_line_error(run(path, f"student.tokenizer={bare}", "data.max_length=200", "data.max_prompt_length=96"))
    assert "student.chat_template" in line and "no chat template" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_the_cli_refuses_a_sampling_policy_on_conversations_naming_off_policy(tmp_path):
    from test_cli_bad_input import one_line_error, run

    path, _ = chat_job(tmp_path)
    line = one_line_error(run(path, "policy.name=on_policy", "data.max_length=200", "data.max_prompt_length=96"))
    assert "conversations" in line and "off_policy" in line


@pytest.mark.parametrize("content", ["m", "end", "|", "im"])
def test_the_end_of_turn_marker_is_found_when_the_content_is_a_piece_of_the_marker(content):
    tok = tokenizer("gpt2", CHATML)
    messages = (("user", "Say it."), ("assistant", content), ("user", "Again."), ("assistant", content))
    enc = chat.encode_conversation(tok, messages, side="student", where="t")
    for turn in enc.turns:
        assert covered_text(enc.text, enc.offsets, range(*turn.marker)) == "<|im_end|>"
        assert enc.text[slice(*turn.chars)] == content


def test_scoring_conversations_prompts_with_the_template_cuts_at_the_marker_and_counts_teacher_scaffolding():
    import torch
    from tiny_job import llama_config
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dskd.evaluation.scoring import generate_and_score

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**llama_config(16)))
    tok = tokenizer("tinyllama", CHATML)  # "<|im_end|>" is text here: answers are cut at it, not stopped by an id
    ids = chat.generation_prompt_ids(tok, CONVERSATION, side="student", where="t")
    words = ("[INST]", "e")  # "e" shows up in nearly any sampled text: the measure must count it
    scored = generate_and_score(
        model, tok, [""], [("revir",)], max_new_tokens=12, temperature=1.0, prompt_ids=[ids],
        stop_text="<|im_end|>", scaffolding=words,
    )  # fmt: skip
    (answer,) = scored["predictions"]
    assert "<|im_end|>" not in answer
    assert scored["teacher_scaffolding"] == (100.0 if any(w in answer for w in words) else 0.0)


def test_the_committed_chat_data_is_byte_identical_to_a_fresh_generation_with_the_planned_shape(tmp_path):
    import subprocess
    import sys

    chat_dir = TOKENIZERS.parent / "chat"
    subprocess.run([sys.executable, str(chat_dir / "make_chat.py"), "--out", str(tmp_path)], check=True)
    for split, size in (("train", 1500), ("valid", 100), ("test", 100)):
        committed = (chat_dir / "data" / f"{split}.jsonl").read_bytes()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == committed, split
        rows = [json.loads(line) for line in committed.decode().splitlines()]
        assert len(rows) == size
        users = [sum(m["role"] == "user" for m in r["messages"]) for r in rows]
        assert set(users) == {1, 2, 3}
        with_system = sum(r["messages"][0]["role"] == "system" for r in rows)
        assert 0.2 * size < with_system < 0.5 * size
