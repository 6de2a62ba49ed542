"""Bad input to the dual-space objectives fails at once with a `DskdError` sentence, not a torch traceback,
and `head_from_model` describes heads with a bias, a logit scale or a soft-cap but refuses a model whose
forward does something else to its logits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from dual_space_models import make_batch, make_context, student_and_teacher, tiny_llama, tiny_tokenizer, tokenizer
from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from dskd.errors import ModelError, PluginError
from dskd.kit.lm_head import head_from_model, last_hidden_state, verify_head
from dskd.kit.objective import same_vocabulary
from dskd.models.teacher import LocalTeacher
from dskd.plugins.divergences.forward_kl import forward_kl
from dskd.plugins.objectives.dskd import dskd_objective
from dskd.plugins.objectives.dskd_v2 import dskd_v2
from dskd.types import SignalRequest

FACTORIES = {"dskd": dskd_objective, "dskd_v2": dskd_v2}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def models():
    return student_and_teacher(tiny_tokenizer())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_teacher_hidden_states_that_do_not_fit_its_head_are_refused(models, name):
    student, teacher = models
    objective = FACTORIES[name](make_context(student, teacher, divergence=forward_kl))
    batch = make_batch([6, 5], [1, 1])
    hidden = last_hidden_state(student, batch.student_input_ids, batch.student_attention_mask)
    signal = teacher.score(
        batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_rows, SignalRequest(hidden_states=True)
    )
    signal.hidden_states = torch.randn(signal.hidden_states.shape[0], 32)  # a server whose head is not its model's
    with pytest.raises(ModelError) as error:
        objective.compute(batch, hidden, signal)
    message = one_line(error)
    assert "hidden states of size 32" in message and "expects 24" in message
    signal.hidden_states = None
    with pytest.raises(ModelError, match="needs the teacher's hidden states"):
        objective.compute(batch, hidden, signal)


def test_dskd_v1_refuses_different_vocabularies_and_names_the_alternative():
    gpt2, llama = tokenizer("gpt2"), tokenizer("tinyllama")
    assert not same_vocabulary(gpt2, llama)
    student = tiny_llama(16, 0, len(gpt2))
    teacher = LocalTeacher(tiny_llama(24, 1, len(llama)), llama)
    context = make_context(student, teacher, divergence=forward_kl, same_vocab=False, student_tokenizer=gpt2)
    with pytest.raises(ModelError) as error:
        dskd_objective(context)
    message = one_line(error)
    assert "dskd_v2" in message and "eta" in message
    # dskd_v2 takes different vocabularies, but only through an aligner's vocabulary map.
    with pytest.raises(ModelError, match='aligner.name = "eta"'):
        dskd_v2(context)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_dual_space_objectives_without_a_teacher_are_refused(models, name):
    student, teacher = models
    context = replace(make_context(student, teacher, divergence=forward_kl), teacher=None)
    with pytest.raises(PluginError, match=f"objective {name} needs a teacher"):
        FACTORIES[name](context)


def test_dskd_v2_options_out_of_range_are_refused(models):
    student, teacher = models
    context = make_context(student, teacher, divergence=forward_kl)
    with pytest.raises(PluginError, match="objective.terms must be one of both, student, teacher"):
        dskd_v2(context, terms="neither")
    with pytest.raises(PluginError, match="shared_vocab_limit must be >= 0"):
        dskd_v2(context, shared_vocab_limit=-1)


# -- heads that do more than a plain linear map ---------------------------------------------------------------


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.arange(3, 13).remainder(vocab_size).unsqueeze(0)


def assert_head_reproduces_logits(model, head) -> None:
    ids = probe_ids(head.vocab_size)
    with torch.no_grad():
        own = model(input_ids=ids).logits.float()
        ours = head.logits(last_hidden_state(model, ids))
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-5)


def test_a_head_with_a_bias_is_described_and_verified():
    model = tiny_llama(16, 0, 61)
    linear = torch.nn.Linear(16, 61, bias=True)
    with torch.no_grad():
        linear.weight.copy_(model.lm_head.weight * 50)
        linear.bias.normal_(0, 2.0)
    model.lm_head = linear
    head = head_from_model(model, 61)
    assert head.bias is not None and torch.equal(head.bias, linear.bias)
    assert_head_reproduces_logits(model, head)
    assert_needed(model, head, bias=None)


def assert_needed(model, head, **undeclared) -> None:
    """The transform matters for this model: a head without it fails the verification."""
    with pytest.raises(ModelError):
        verify_head(model, replace(head, **undeclared))


def test_a_soft_capped_head_is_described_and_verified():
    config = Gemma2Config(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=2.0,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits of a few units, so the cap of 2 bends them
    head = head_from_model(model, 61)
    assert head.softcap == 2.0
    assert_head_reproduces_logits(model, head)
    assert_needed(model, head, softcap=0.0)


def test_a_scaled_head_is_described_and_verified():
    config = CohereConfig(
        vocab_size=61,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        logit_scale=0.25,
    )
    torch.manual_seed(0)
    model = CohereForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    head = head_from_model(model, 61)
    assert head.scale == 0.25
    assert_head_reproduces_logits(model, head)
    assert_needed(model, head, scale=1.0)


class DoubledLogits(LlamaForCausalLM):
    """A model whose forward scales its logits without declaring it in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if out.logits is not None:
            out.logits = out.logits * 2
        return out


def test_a_head_that_does_something_undeclared_is_refused():
    source = tiny_llama(16, 0, 61)
    model = DoubledLogits(source.config)
    model.load_state_dict(source.state_dict())
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    with pytest.raises(ModelError) as error:
        head_from_model(model, 61, name="student")
    message = one_line(error)
    assert message.startswith("student: the last hidden state of DoubledLogits is not the input of its LM head")
    assert "soft-cap" in message  # names the transforms it checked for
    # The undoubled model passes, so the refusal is about the doubling, not the architecture.
    head_from_model(source, 61, name="student")
