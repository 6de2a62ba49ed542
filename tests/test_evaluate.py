"""Generation evaluation and the teacher-forced distillation metrics, on tiny random models with real tokenizers."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dskd.config import DataConfig
from dskd.data.examples import encode_example
from dskd.errors import DataError, DskdError
from dskd.evaluation.metrics import corpus_exact_match, corpus_rouge_l
from dskd.evaluation.scoring import _encode_prompt, generate_and_score, teacher_agreement
from dskd.models.teacher import LocalTeacher
from dskd.types import IGNORE_INDEX, Batch

TOKENIZERS = Path(__file__).resolve().parents[1] / "examples" / "tokenizers"

PROMPTS = [
    "Below is an instruction.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
    "Below is an instruction.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n",
    "Below is an instruction.\n\n### Instruction:\nSay hello in French, please.\n\n### Response:\n",
]
REFERENCES = [("Blue.", "red"), ("four",), ("Bonjour !",)]
SAMPLES = [(p, r[0]) for p, r in zip(PROMPTS, REFERENCES)]
LONG_SAMPLES = [
    (PROMPTS[0], "Blue is the colour of a clear sky, and it is also the colour of the deep sea."),
    (PROMPTS[1], "Two plus two is four; adding two more would make six, which is not asked."),
]


def tokenizer(name: str):
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def gpt2_tok():
    return tokenizer("gpt2")


@pytest.fixture(scope="module")
def llama_tok():
    return tokenizer("tinyllama")


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2_model():
    return tiny_gpt2()


# ---------------------------------------------------------------------------------------------------------------
# Held-out batches built by hand (the causal-LM convention of dskd.types.Batch), with an exact-span alignment.


def encode_sample(tok, prompt: str, response: str):
    """Input ids, labels, and each label's character span, of `prompt + response` plus EOS (BOS where added)."""
    text = prompt + response
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    bos = [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id else []
    ids = bos + enc["input_ids"] + [tok.eos_token_id]
    spans = [(-1, -1)] * len(bos) + [tuple(o) for o in enc["offset_mapping"]] + [(len(text), len(text) + 1)]
    labels = ids[1:]
    label_spans = spans[1:]
    # A label is a response token when its text starts at or after the end of the prompt.
    labels = [lab if start >= len(prompt) else IGNORE_INDEX for lab, (start, _) in zip(labels, label_spans)]
    return ids[:-1], labels, label_spans


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def make_batch(student_tok, teacher_tok, samples, *, align: bool) -> Batch:
    s = [encode_sample(student_tok, p, r) for p, r in samples]
    t = [encode_sample(teacher_tok, p, r) for p, r in samples]
    alignment = None
    if align:
        rows = []
        for b, ((_, s_lab, s_spans), (_, t_lab, t_spans)) in enumerate(zip(s, t)):
            s_at = {span: i for i, (span, lab) in enumerate(zip(s_spans, s_lab)) if lab != IGNORE_INDEX}
            rows += [
                (b, i, s_at[span])
                for i, (span, lab) in enumerate(zip(t_spans, t_lab))
                if lab != IGNORE_INDEX and span in s_at
            ]
        alignment = torch.tensor(rows, dtype=torch.long)
    return Batch(
        student_input_ids=pad([x[0] for x in s], student_tok.pad_token_id),
        student_attention_mask=pad([[1] * len(x[0]) for x in s], 0),
        student_labels=pad([x[1] for x in s], IGNORE_INDEX),
        teacher_input_ids=pad([x[0] for x in t], teacher_tok.pad_token_id),
        teacher_attention_mask=pad([[1] * len(x[0]) for x in t], 0),
        teacher_labels=pad([x[1] for x in t], IGNORE_INDEX),
        alignment=alignment,
    )


def gpt2_to_llama_map(gpt2_tok, llama_tok) -> torch.Tensor:
    """Teacher (GPT-2) id -> student (Llama) id of the same token text, -1 where Llama has no such token."""
    llama_vocab = llama_tok.get_vocab()
    mapping = torch.full((len(gpt2_tok),), -1, dtype=torch.long)
    for piece, i in gpt2_tok.get_vocab().items():
        j = llama_vocab.get(piece.replace("Ġ", "▁").replace("Ċ", "<0x0A>"))
        if j is not None:
            mapping[i] = j
    mapping[gpt2_tok.eos_token_id] = llama_tok.eos_token_id
    return mapping


def dense_logits(model, ids, mask, labels, vocab_size):
    """Logits `(N, V)` of the model's own forward at the valid label positions, in row-major order."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab_size].float()
    return logits[labels != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------------------------
# generate_and_score


def test_prompt_ids_start_with_bos_only_where_the_tokenizer_adds_one(gpt2_tok, llama_tok):
    prompt = PROMPTS[0]
    assert _encode_prompt(gpt2_tok, prompt) == gpt2_tok(prompt)["input_ids"]
    assert _encode_prompt(gpt2_tok, prompt)[0] != gpt2_tok.bos_token_id
    for tok in (llama_tok, tokenizer("mistral")):
        ids = _encode_prompt(tok, prompt)
        assert ids[0] == tok.bos_token_id == 1
        assert ids[1:] == tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["gpt2", "tinyllama", "mistral"])
@pytest.mark.parametrize("max_prompt_length", [0, 7])
def test_prompts_are_encoded_as_training_encodes_the_prompt_part_of_a_sample(name, max_prompt_length):
    tok = tokenizer(name)
    cfg = DataConfig(max_prompt_length=max_prompt_length or 256)
    for prompt, response in SAMPLES + [("Is </s> a tag?\n", "Yes, in HTML.")]:
        ids, prompt_len = encode_example(tok, prompt, response, cfg)
        assert _encode_prompt(tok, prompt, max_prompt_length) == ids[:prompt_len]


def test_long_prompts_keep_bos_and_their_last_tokens(llama_tok):
    full = _encode_prompt(llama_tok, PROMPTS[2])
    cut = _encode_prompt(llama_tok, PROMPTS[2], max_prompt_length=6)
    assert len(cut) == 6
    assert cut == [llama_tok.bos_token_id] + full[-5:]


def test_generation_continues_the_encoded_prompts(llama_tok, monkeypatch):
    model = tiny_llama()
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate_and_score(model, llama_tok, PROMPTS, REFERENCES, max_new_tokens=2, batch_size=8)
    ((ids, mask),) = seen
    for row, row_mask, prompt in zip(ids, mask, PROMPTS):
        assert row[row_mask.bool()].tolist() == _encode_prompt(llama_tok, prompt)


def test_greedy_generation_is_deterministic_across_calls_and_seeds(gpt2_tok, gpt2_model):
    first = generate_and_score(gpt2_model, gpt2_tok, PROMPTS, REFERENCES, max_new_tokens=6, seeds=(1, 2), batch_size=2)
    again = generate_and_score(gpt2_model, gpt2_tok, PROMPTS, REFERENCES, max_new_tokens=6, seeds=(3,), batch_size=3)
    assert first["predictions"] == again["predictions"]
    assert first["per_seed"][0]["rougeL"] == first["per_seed"][1]["rougeL"] == again["rougeL"]
    assert first["seeds"] == [1, 2] and first["num_examples"] == 3


def test_sampling_seeds_change_the_output_and_a_seed_reproduces_it(gpt2_tok, gpt2_model):
    def sample(seed):
        return generate_and_score(
            gpt2_model, gpt2_tok, PROMPTS, REFERENCES, max_new_tokens=8, temperature=1.0, seeds=(seed,)
        )["predictions"]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_scores_are_the_metrics_of_the_predictions_averaged_over_seeds(gpt2_tok, gpt2_model):
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    result = generate_and_score(gpt2_model, gpt2_tok, PROMPTS, REFERENCES, seeds=(4, 5), **kwargs)
    singles = [generate_and_score(gpt2_model, gpt2_tok, PROMPTS, REFERENCES, seeds=(s,), **kwargs) for s in (4, 5)]
    assert result["predictions"] == singles[0]["predictions"]
    for single in singles:
        assert single["rougeL"] == pytest.approx(corpus_rouge_l(single["predictions"], REFERENCES))
        assert single["exact_match"] == pytest.approx(corpus_exact_match(single["predictions"], REFERENCES))
    for key in ("rougeL", "exact_match", "avg_new_tokens"):
        assert result[key] == pytest.approx((singles[0][key] + singles[1][key]) / 2)
    # The answers themselves as references score an exact match.
    echoed = generate_and_score(
        gpt2_model, gpt2_tok, PROMPTS, [(p,) for p in result["predictions"]], seeds=(4,), **kwargs
    )
    assert echoed["exact_match"] == 100.0


def head_with_bias(model: GPT2LMHeadModel, eos: int, eos_bias: float) -> GPT2LMHeadModel:
    """Replace the LM head by one whose bias pushes EOS up (always chosen) or down (never chosen)."""
    weight = model.lm_head.weight.detach().clone()
    model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(weight if eos_bias < 0 else torch.zeros_like(weight))
        model.lm_head.bias.zero_()
        model.lm_head.bias[eos] = eos_bias
    return model


def test_avg_new_tokens_counts_generated_tokens_including_the_stopping_eos(gpt2_tok):
    eos = gpt2_tok.eos_token_id
    stops = generate_and_score(head_with_bias(tiny_gpt2(), eos, 50.0), gpt2_tok, PROMPTS, [("",)] * 3, max_new_tokens=5)
    assert stops["avg_new_tokens"] == 1.0
    assert stops["predictions"] == ["", "", ""]  # EOS is a special token and is not decoded
    assert stops["exact_match"] == 100.0
    runs_on = generate_and_score(
        head_with_bias(tiny_gpt2(), eos, -1e4), gpt2_tok, PROMPTS, REFERENCES, max_new_tokens=5
    )
    assert runs_on["avg_new_tokens"] == 5.0


def test_bad_generation_arguments_are_one_line_errors(gpt2_tok, gpt2_model):
    with pytest.raises(DskdError, match="3 prompts but 2 reference lists"):
        generate_and_score(gpt2_model, gpt2_tok, PROMPTS, REFERENCES[:2], max_new_tokens=2)
    with pytest.raises(DskdError, match="exceeds the model's context of 128 tokens"):
        generate_and_score(gpt2_model, gpt2_tok, PROMPTS, REFERENCES, max_new_tokens=120)
    with pytest.raises(DskdError, match="seeds is empty"):
        generate_and_score(gpt2_model, gpt2_tok, PROMPTS, REFERENCES, max_new_tokens=2, seeds=())


# ---------------------------------------------------------------------------------------------------------------
# teacher_agreement


def test_a_student_that_is_the_teacher_agrees_everywhere_with_zero_kl(gpt2_tok):
    model = tiny_gpt2(seed=3)
    teacher = LocalTeacher(model, gpt2_tok)
    batch = make_batch(gpt2_tok, gpt2_tok, SAMPLES, align=False)
    result = teacher_agreement(model, teacher, [batch])
    assert result["teacher_agreement"] == 100.0
    assert result["teacher_kl"] == pytest.approx(0.0, abs=1e-6)


def test_same_vocabulary_metrics_equal_a_dense_softmax_computation(llama_tok):
    student, teacher_model = tiny_llama(seed=1), tiny_llama(seed=2)
    teacher = LocalTeacher(teacher_model, llama_tok)
    batches = [
        make_batch(llama_tok, llama_tok, SAMPLES[:2], align=False),
        make_batch(llama_tok, llama_tok, SAMPLES[2:], align=False),
    ]
    zs = torch.cat(
        [dense_logits(student, b.student_input_ids, b.student_attention_mask, b.student_labels, 32000) for b in batches]
    )
    zt = torch.cat(
        [
            dense_logits(teacher_model, b.teacher_input_ids, b.teacher_attention_mask, b.teacher_labels, 32000)
            for b in batches
        ]
    )
    p, q = torch.softmax(zt.double(), -1), torch.softmax(zs.double(), -1)
    expected_kl = float((p * (p.log() - q.log())).sum(-1).mean())
    expected_agreement = 100.0 * float((zt.argmax(-1) == zs.argmax(-1)).double().mean())

    for chunk_rows in (3, 10_000):  # chunking must not change the result
        result = teacher_agreement(student, teacher, batches, chunk_rows=chunk_rows)
        assert result["teacher_kl"] == pytest.approx(expected_kl, rel=1e-4)
        assert result["teacher_agreement"] == pytest.approx(expected_agreement)
    assert expected_kl > 0.1  # two different models: the comparison above is not trivially 0 == 0


def test_cross_vocabulary_metrics_equal_a_dense_computation_on_the_mapped_overlap(gpt2_tok, llama_tok):
    student, teacher_model = tiny_llama(seed=5), tiny_gpt2(seed=6)
    teacher = LocalTeacher(teacher_model, gpt2_tok)
    token_map = gpt2_to_llama_map(gpt2_tok, llama_tok)
    batch = make_batch(llama_tok, gpt2_tok, LONG_SAMPLES, align=True)
    assert batch.alignment.shape[0] > 20

    # Dense oracle: full logits from each model's own forward; the aligned positions picked by (b, t, s) directly.
    with torch.no_grad():
        zt_all = teacher_model(
            input_ids=batch.teacher_input_ids, attention_mask=batch.teacher_attention_mask
        ).logits.double()
        zs_all = student(input_ids=batch.student_input_ids, attention_mask=batch.student_attention_mask).logits.double()
    b, t, s = batch.alignment.unbind(1)
    zt, zs = zt_all[b, t], zs_all[b, s]
    mapped = token_map >= 0
    n_mapped = int(mapped.sum())
    onehot = torch.sparse_coo_tensor(
        torch.stack([torch.arange(n_mapped), token_map[mapped]]),
        torch.ones(n_mapped, dtype=torch.float64),
        (n_mapped, 32000),
        check_invariants=True,
    )  # (mapped teacher ids, student ids)
    p = torch.sparse.mm(
        onehot.t(), torch.softmax(zt[:, mapped], -1).t()
    ).t()  # teacher mass on the overlap, in student ids
    overlap = torch.zeros(32000, dtype=torch.bool)
    overlap[token_map[mapped]] = True
    q = torch.softmax(zs.masked_fill(~overlap, float("-inf")), -1)
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    expected_kl = float(terms.sum(-1).mean())
    expected_agreement = 100.0 * float((token_map[zt.argmax(-1)] == zs.argmax(-1)).double().mean())

    result = teacher_agreement(
        student, teacher, [batch], token_map=token_map, student_vocab_size=len(llama_tok), chunk_rows=4
    )
    assert result["teacher_kl"] == pytest.approx(expected_kl, rel=1e-4)
    assert result["teacher_agreement"] == pytest.approx(expected_agreement)


def test_unmappable_teacher_predictions_count_as_disagreement_while_kl_is_renormalised(gpt2_tok):
    model = tiny_gpt2(seed=9)
    teacher = LocalTeacher(model, gpt2_tok)
    batch = make_batch(gpt2_tok, gpt2_tok, SAMPLES, align=True)  # same tokenizer: the identity alignment
    identity = torch.arange(len(gpt2_tok))
    assert teacher_agreement(model, teacher, [batch], token_map=identity)["teacher_agreement"] == 100.0

    rows = batch.index_rows().aligned_rows[:, 1]
    top = dense_logits(
        model, batch.student_input_ids, batch.student_attention_mask, batch.student_labels, len(gpt2_tok)
    )
    holes = identity.clone()
    holes[top[rows].argmax(-1)] = -1  # the teacher's every prediction now has no student token
    result = teacher_agreement(model, teacher, [batch], token_map=holes)
    assert result["teacher_agreement"] == 0.0
    # Both distributions are renormalised over the same remaining ids, so a student that is the teacher still has KL 0.
    assert result["teacher_kl"] == pytest.approx(0.0, abs=1e-6)


def test_agreement_inputs_that_cannot_be_compared_are_one_line_errors(gpt2_tok, llama_tok):
    model = tiny_gpt2(seed=3)
    teacher = LocalTeacher(model, gpt2_tok)
    unaligned = make_batch(gpt2_tok, gpt2_tok, SAMPLES, align=False)
    with pytest.raises(DataError, match="no alignment"):
        teacher_agreement(model, teacher, [unaligned], token_map=torch.arange(len(gpt2_tok)))
    with pytest.raises(DskdError, match="token_map must be a 1-D int64 tensor"):
        teacher_agreement(model, teacher, [unaligned], token_map=torch.arange(10))
    mixed = make_batch(llama_tok, gpt2_tok, SAMPLES, align=False)
    with pytest.raises(DataError, match="labels differ"):
        teacher_agreement(tiny_llama(), teacher, [mixed], student_vocab_size=len(llama_tok))
