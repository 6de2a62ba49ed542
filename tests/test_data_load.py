"""`load_examples` and the prompt template: what is read, and the one-line DataError for each bad input."""

from __future__ import annotations

import json
import pathlib

import pytest

from dskd.config import DataConfig
from dskd.data.examples import ALPACA, ALPACA_WITH_CONTEXT, Example, load_examples, render_prompt
from dskd.errors import DataError

ALPACA_NO_INPUT_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a colour.\n\n### Response:\n"
)
ALPACA_INPUT_TEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nAdd them.\n\n### Input:\n2 and 3"
    "\n\n### Response:\n"
)


def write_jsonl(path: pathlib.Path, rows: list) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_alpaca_template_matches_the_minillm_text_with_and_without_context():
    assert ALPACA.replace("{instruction}", "Name a colour.") == ALPACA_NO_INPUT_TEXT
    assert render_prompt("Name a colour.", "", "alpaca") == ALPACA_NO_INPUT_TEXT
    assert render_prompt("Name a colour.", "  \n", "alpaca") == ALPACA_NO_INPUT_TEXT  # blank context: no section
    assert render_prompt("Add them.", "2 and 3", "alpaca") == ALPACA_INPUT_TEXT
    assert ALPACA_WITH_CONTEXT.count("{context}") == 1


def test_custom_template_substitutes_only_its_two_placeholders():
    template = 'Q: {instruction} {"json": 1} [{context}]\nA:'
    assert render_prompt("why?", "ctx", template) == 'Q: why? {"json": 1} [ctx]\nA:'
    assert render_prompt("i", "", "{instruction}|{context}") == "i|"
    assert render_prompt("say {context}", "x", "{instruction}|{context}") == "say {context}|x"
    assert render_prompt("say {context}", "x", "alpaca") == ALPACA_INPUT_TEXT.replace(
        "Add them.", "say {context}"
    ).replace("2 and 3", "x")


def test_load_examples_reads_dolly_records_with_string_or_list_responses(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"instruction": "Add them.", "context": "2 and 3", "response": "5", "category": "x"},
            {"instruction": "Name a colour.", "context": None, "response": ["red", "blue"]},
            {"instruction": "Name a colour.", "response": "green"},
        ],
    )
    examples = load_examples(path, DataConfig(), "train")
    assert examples[0] == Example(ALPACA_INPUT_TEXT, ("5",))
    assert examples[1] == Example(ALPACA_NO_INPUT_TEXT, ("red", "blue")) and examples[1].response == "red"
    assert examples[2].prompt == ALPACA_NO_INPUT_TEXT


def test_string_responses_that_look_like_json_stay_strings_when_other_records_hold_lists(tmp_path):
    # datasets types such a field as Json and would hand back 5, True, [1, 2] and 7 for these strings.
    texts = ["5", "true", "[1, 2]", " 7 ", "null", "hello"]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "response": ["x", "y"]}] + [{"instruction": "a", "response": t} for t in texts],
    )
    examples = load_examples(path, DataConfig(), "train")
    assert [e.references for e in examples] == [("x", "y")] + [(t,) for t in texts]


def test_load_examples_uses_prompt_field_verbatim_and_configured_field_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "P: hi\n", "output": "yo", "instruction": 3}])
    examples = load_examples(path, DataConfig(prompt_field="prompt", response_field="output"), "valid")
    assert examples == [Example("P: hi\n", ("yo",))]
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add them.", "input": "2 and 3", "output": "5"}])
    cfg = DataConfig(context_field="input", response_field="output")
    assert load_examples(path, cfg, "train")[0].prompt == ALPACA_INPUT_TEXT


def test_custom_template_renders_each_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add.", "context": "1 2", "response": "3"}])
    assert load_examples(path, DataConfig(template="{instruction} {context} ="), "train")[0].prompt == "Add. 1 2 ="


def test_missing_file_names_the_split_and_the_config_key(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_examples(tmp_path / "nope.jsonl", DataConfig(), "valid")
    message = one_line_error(excinfo)
    assert "data.valid" in message and "nope.jsonl" in message and "not found" in message


def test_directory_instead_of_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_examples(tmp_path, DataConfig(), "train")


def test_unset_split_path_is_reported():
    with pytest.raises(DataError, match="data.test is not set"):
        load_examples("", DataConfig(), "test")


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    real_open = pathlib.Path.open

    def deny(self, *args, **kwargs):  # root ignores file modes, so permission loss is simulated
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", deny)
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "train")
    assert "cannot be read (Permission denied)" in one_line_error(excinfo)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_split_is_reported(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "train")
    assert "split is empty" in one_line_error(excinfo)


def test_a_line_that_is_not_json_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\ninstruction,response\n')
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "train")
    message = one_line_error(excinfo)
    assert "line 2 is not JSON" in message and "JSONL" in message


def test_a_line_that_is_not_an_object_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n["a", "b"]\n')
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "train")
    assert "line 2 is a list, not a JSON object" in one_line_error(excinfo)


def test_missing_field_lists_the_fields_present_and_the_key_to_set(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "train")
    message = one_line_error(excinfo)
    assert "no field 'instruction'" in message and "question, answer" in message and "data.instruction_field" in message
    with pytest.raises(DataError, match="data.response_field"):
        load_examples(path, DataConfig(instruction_field="question"), "train")
    with pytest.raises(DataError, match="data.prompt_field"):
        load_examples(path, DataConfig(prompt_field="prompt"), "train")


def test_field_missing_in_one_record_names_the_sample(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "train")
    assert "sample 1: field 'response' is missing" in one_line_error(excinfo)


@pytest.mark.parametrize(
    "row, field",
    [
        ({"instruction": 7, "response": "b"}, "instruction"),
        ({"instruction": "a", "response": 42}, "response"),
        ({"instruction": "a", "context": ["x"], "response": "b"}, "context"),
        ({"instruction": "a", "response": ["ok", 3]}, "response"),
        ({"instruction": "a", "response": []}, "response"),
    ],
)
def test_non_string_value_names_the_sample_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "context": "", "response": "y"}, row])
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(), "valid")
    message = one_line_error(excinfo)
    assert "data.valid" in message and "sample 1" in message and f"field {field!r}" in message


def test_template_without_instruction_placeholder_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "response": "b"}])
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(template="Question: {question}"), "train")
    assert "data.template" in one_line_error(excinfo)


def test_context_that_a_custom_template_would_drop_is_an_error_unless_context_is_disabled(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "a", "context": "", "response": "b"},
            {"instruction": "a", "context": "ctx", "response": "b"},
        ],
    )
    with pytest.raises(DataError) as excinfo:
        load_examples(path, DataConfig(template="Q: {instruction}\nA:"), "train")
    assert "sample 1" in one_line_error(excinfo) and "{context}" in str(excinfo.value)
    examples = load_examples(path, DataConfig(template="Q: {instruction}\nA:", context_field=""), "train")
    assert [e.prompt for e in examples] == ["Q: a\nA:", "Q: a\nA:"]
