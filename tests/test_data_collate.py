"""`collate`: dynamic padding, causal labels with IGNORE_INDEX on prompt and padding, alignment rows in label
positions, and the packed-row indices, checked against a direct per-position construction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_text_aligner import EqualTextAligner
from transformers import AutoTokenizer

from dskd.config import DataConfig
from dskd.data.batching import collate
from dskd.data.examples import load_examples, tokenize_split
from dskd.types import IGNORE_INDEX

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROWS = [
    {
        "sample_id": 4,
        "student_ids": [10, 11, 12, 13, 14],
        "student_prompt_len": 3,
        "teacher_ids": [1, 20, 21, 22, 23, 24, 25, 2],
        "teacher_prompt_len": 4,
        "alignment": [0, 0, 3, 1],
    },
    {
        "sample_id": 9,
        "student_ids": [30, 31, 32],
        "student_prompt_len": 1,
        "teacher_ids": [1, 40, 41],
        "teacher_prompt_len": 2,
        "alignment": [],
    },
    {
        "sample_id": 2,
        "student_ids": [50, 51, 52, 53, 54, 55, 56],
        "student_prompt_len": 5,
        "teacher_ids": [1, 60, 61, 2],
        "teacher_prompt_len": 2,
        "alignment": [0, 0, 1, 1],
    },
]


def expected_tensors(ids_list, prompt_lens, pad_id):
    """Position by position: input p is ids[p]; label p is ids[p+1] when that token is a response token."""
    width = max(len(ids) for ids in ids_list) - 1
    inputs, masks, labels = [], [], []
    for ids, prompt_len in zip(ids_list, prompt_lens):
        row_in, row_mask, row_lab = [], [], []
        for p in range(width):
            real = p + 1 < len(ids)
            row_in.append(ids[p] if real else pad_id)
            row_mask.append(1 if real else 0)
            row_lab.append(ids[p + 1] if real and p + 1 >= prompt_len else IGNORE_INDEX)
        inputs.append(row_in)
        masks.append(row_mask)
        labels.append(row_lab)
    return torch.tensor(inputs), torch.tensor(masks), torch.tensor(labels)


def test_collate_pads_each_model_to_its_own_longest_sequence_with_causal_labels():
    batch = collate(ROWS, student_pad_id=0, teacher_pad_id=7)
    s_in, s_mask, s_lab = expected_tensors([r["student_ids"] for r in ROWS], [r["student_prompt_len"] for r in ROWS], 0)
    t_in, t_mask, t_lab = expected_tensors([r["teacher_ids"] for r in ROWS], [r["teacher_prompt_len"] for r in ROWS], 7)
    assert batch.student_input_ids.shape == (3, 6) and batch.teacher_input_ids.shape == (3, 7)
    assert torch.equal(batch.student_input_ids, s_in) and torch.equal(batch.student_attention_mask, s_mask)
    assert torch.equal(batch.student_labels, s_lab)
    assert torch.equal(batch.teacher_input_ids, t_in) and torch.equal(batch.teacher_attention_mask, t_mask)
    assert torch.equal(batch.teacher_labels, t_lab)
    assert batch.student_prompt_lengths.tolist() == [3, 1, 5] and batch.teacher_prompt_lengths.tolist() == [
        4,
        2,
        2,
    ]
    assert batch.sample_ids.tolist() == [4, 9, 2]
    assert all(t.dtype == torch.int64 for t in (batch.student_input_ids, batch.student_labels, batch.teacher_labels))


def test_labels_are_the_response_and_eos_only():
    batch = collate(ROWS, student_pad_id=0, teacher_pad_id=0)
    for b, row in enumerate(ROWS):
        for side in ("student", "teacher"):
            labels = getattr(batch, f"{side}_labels")[b]
            ids, prompt_len = row[f"{side}_ids"], row[f"{side}_prompt_len"]
            assert labels[labels != IGNORE_INDEX].tolist() == ids[prompt_len:]
            assert (labels[: prompt_len - 1] == IGNORE_INDEX).all()  # prompt positions
            assert (labels[len(ids) - 1 :] == IGNORE_INDEX).all()  # padding positions


def test_alignment_rows_are_label_positions_and_packed_rows_point_at_them():
    batch = collate(ROWS, student_pad_id=0, teacher_pad_id=0)
    # (b, teacher_prompt_len - 1 + i, student_prompt_len - 1 + j) for each pair (i, j)
    assert batch.alignment.tolist() == [[0, 3, 2], [0, 6, 3], [2, 1, 4], [2, 2, 5]]
    t_width, s_width = batch.teacher_labels.shape[1], batch.student_labels.shape[1]
    for (b, t, s), (tr, sr) in zip(batch.alignment.tolist(), batch.aligned_rows.tolist()):
        assert batch.teacher_rows[tr] == b * t_width + t and batch.student_rows[sr] == b * s_width + s
    assert batch.student_rows.numel() == (batch.student_labels != IGNORE_INDEX).sum()
    assert batch.teacher_rows.numel() == (batch.teacher_labels != IGNORE_INDEX).sum()


def test_rows_without_alignment_give_no_alignment_tensor():
    rows = [{k: v for k, v in r.items() if k != "alignment"} for r in ROWS]
    batch = collate(rows, student_pad_id=0, teacher_pad_id=0)
    assert batch.alignment is None and batch.aligned_rows is None
    empty = collate([dict(ROWS[1])], student_pad_id=0, teacher_pad_id=0)
    assert empty.alignment.shape == (0, 3) and empty.aligned_rows.shape == (0, 2)


@pytest.mark.parametrize("student, teacher", [("gpt2", "tinyllama"), ("tinyllama", "mistral")])
def test_aligned_positions_of_real_tokenizers_hold_tokens_of_the_same_text(student, teacher):
    s_tok = AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / student)
    t_tok = AutoTokenizer.from_pretrained(EXAMPLES / "tokenizers" / teacher)
    examples = load_examples(EXAMPLES / "data" / "tasks" / "test.jsonl", DataConfig(), "test")[:16]
    rows = tokenize_split(examples, s_tok, t_tok, DataConfig(), aligner=EqualTextAligner(t_tok, s_tok), split="test")
    batch = collate(
        [rows[k] for k in range(len(rows))],
        student_pad_id=s_tok.eos_token_id,
        teacher_pad_id=t_tok.eos_token_id,
    )
    assert batch.alignment.shape[0] > len(rows)
    for b, t, s in batch.alignment.tolist():
        t_label, s_label = int(batch.teacher_labels[b, t]), int(batch.student_labels[b, s])
        assert t_label != IGNORE_INDEX and s_label != IGNORE_INDEX
        if t_label == t_tok.eos_token_id:
            assert s_label == s_tok.eos_token_id
        else:
            assert t_tok.decode([t_label]).strip() == s_tok.decode([s_label]).strip()
    widths = [len(r["student_ids"]) - 1 for r in rows]
    assert batch.student_input_ids.shape[1] == max(widths) < 512
