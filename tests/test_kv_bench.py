"""Chapter 4, second edition: methods registered from outside, token budgets, the needle prompts,
the KL distribution, repetition, needle accuracy and the two-model KL of chapter 3."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import companion.kv as kv
from companion.config import seed_everything
from companion.kv import EvictionMethod, KVConfigError, register_method
from companion.models import gpt2_tokenizer, load_lm


@pytest.fixture(scope="module", autouse=True)
def _settings():
    seed_everything()


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@register_method
@dataclass
class KeepEveryOther(EvictionMethod):
    """A method defined outside the package: keep the even positions first."""

    name: ClassVar[str] = "test_every_other"
    offset: int = 0

    def score(self, layer, keep):
        positions = torch.arange(layer.length) + self.offset
        return (positions % 2 == 0).float().expand(layer.keys.shape[:3])


def test_a_method_registered_outside_runs_through_the_runner_from_a_config(tmp_path):
    assert "test_every_other" in kv.available_methods()
    assert kv.method_knobs("test_every_other") == {"budget": 0.5, "offset": 0}
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny-llama-test_every_other.json").write_text(json.dumps(
        {"model": "tiny-llama", "method": "test_every_other", "method_config": {"offset": 1},
         "budgets": [0.5, 8], "max_length": 64, "new_tokens": 4, "num_prompts": 2, "prompts": "mmlu"}))
    rows = kv.run_configs(kv.load_run_configs(configs), tmp_path / "results", progress=False)
    assert [(r["label"], r["budget"], r["knobs"]["offset"]) for r in rows] == [
        ("test_every_other", 0.5, 1), ("test_every_other", 8, 1)]
    assert rows[0]["cache_fraction"] == pytest.approx(32 / 63) and rows[1]["cache_fraction"] == pytest.approx(8 / 63)
    assert 0.0 <= rows[1]["top1"] <= 1.0 and rows[1]["n_prompts"] == 2


def test_registration_errors_are_clear():
    with pytest.raises(TypeError, match="must be a @dataclass"):
        register_method(type("Plain", (EvictionMethod,), {"name": "plain"}))

    @dataclass
    class NoScore(EvictionMethod):
        name: ClassVar[str] = "no_score"

    with pytest.raises(TypeError, match="define score"):
        register_method(NoScore)
    with pytest.raises(TypeError, match="KVMethod subclass"):
        register_method(int)


def test_budget_as_a_token_count():
    method = kv.make_method("h2o", budget=16)
    assert method.keep_count(40) == 16 and method.keep_count(10) == 10
    assert kv.make_method("h2o", budget=0.25).keep_count(40) == 10
    assert kv.make_method("h2o", budget=1).keep_count(40) == 1  # an integer is a count of positions


def test_needle_is_placed_at_the_requested_depth(tokenizer):
    prompts = kv.needle_prompts(tokenizer, 3, 200, depths=(0.0, 0.5, 1.0))
    for prompt, depth in zip(prompts, (0.0, 0.5, 1.0)):
        assert len(prompt.ids) == 200 and prompt.kind == "needle" and prompt.depth == depth
        start, end = prompt.needle_span
        fact = tokenizer.decode(prompt.ids[start:end])
        assert fact.strip() == f"The secret code of {fact.split()[4]} is {prompt.answer}."
        assert len(prompt.answer) == 4 and prompt.answer.isdigit()
        # the filler sits between the question's frame and the question: find its span
        text_before = tokenizer.decode(prompt.ids[:start])
        head = text_before.index("secret code in it.") + len("secret code in it.\n\n")
        head_tokens = len(tokenizer(text_before[:head], add_special_tokens=False)["input_ids"])
        tail = tokenizer.decode(prompt.ids[end:])
        question = tail.index("\n\nWhat is the secret code")
        filler_after = len(tokenizer(tail[:question], add_special_tokens=False)["input_ids"])
        filler = (start - head_tokens) + filler_after
        assert start - head_tokens == round(depth * filler)
    assert tokenizer.decode(prompts[0].ids).endswith(f"Assistant: The secret code of {prompts[0].answer and 'Portia'} is")
    with pytest.raises(ValueError, match="needle depths must be fractions"):
        kv.needle_prompts(tokenizer, 1, 200, depths=(1.5,))


def test_needle_and_book_questions_go_through_the_chat_template():
    _, tokenizer = load_lm("tiny-llama")  # has a ChatML template
    needle = kv.needle_prompts(tokenizer, 1, 160)[0]
    text = tokenizer.decode(needle.ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\nThe secret code of Portia is")
    (qa,) = kv.book_qa_prompts(tokenizer, 1, 160)
    assert len(qa.ids) == 160 and tokenizer.decode(qa.ids).endswith("<|im_start|>assistant\n")
    suite = kv.long_prompts(tokenizer, 7, 160, "suite")
    assert [p.kind for p in suite] == ["needle"] * 3 + ["book_qa"] * 2 + ["mmlu"] * 2


def test_percentiles_of_a_known_kl_vector():
    values = list(range(101))  # 0, 1, ..., 100
    assert kv.percentiles(values) == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert kv.percentiles([0.0, 1.0], (90,)) == {"p90": pytest.approx(0.9)}
    with pytest.raises(ValueError, match="no values"):
        kv.percentiles([])


def test_repetition_rate():
    assert kv.repetition_rate([1, 2, 3, 4, 5, 6, 7, 8]) == 0.0
    loop = [1, 2, 3] * 10  # "I am a man, I am a man, ..."
    assert kv.repetition_rate(loop) > 0.8
    assert kv.repetition_rate([1, 2]) == 0.0


def test_result_rows_carry_intervals_percentiles_and_needle_accuracy():
    prompts = [
        {"tokens": 4, "top1_hits": 4, "top5_hits": 4, "kl_sum": 0.0, "kl_tokens": [0.0] * 4, "first_disagreement": None,
         "kind": "needle", "depth": 0.5, "degenerate": False, "needle_correct": True},
        {"tokens": 4, "top1_hits": 2, "top5_hits": 3, "kl_sum": 2.0, "kl_tokens": [0.0, 0.0, 1.0, 1.0],
         "first_disagreement": 1, "kind": "needle", "depth": 0.1, "degenerate": True, "needle_correct": False},
        {"tokens": 4, "top1_hits": 3, "top5_hits": 4, "kl_sum": 0.4, "kl_tokens": [0.1] * 4, "first_disagreement": 0,
         "kind": "mmlu", "depth": None, "degenerate": False, "needle_correct": None},
    ]
    result = kv.FidelityResult("x", {}, 0.75, 11 / 12, 2.4 / 12, 4 / 3, 12, 1.0, 2.0, 0.1, "one pass", prompts)
    row = result.as_row()
    assert row["n_prompts"] == 3 and row["top1_low"] <= 0.75 <= row["top1_high"]
    assert row["kl_p90"] == pytest.approx(0.91) and row["kl_p99"] == pytest.approx(1.0)  # 12 tokens, linear
    assert row["needle_accuracy"] == 0.5 and row["needle_n"] == 2
    assert row["degenerate"] == 1 and row["top1_fluent"] == pytest.approx(7 / 8)
    by_depth = kv.needle_by_depth([{"label": "x", "budget": 0.5, **row}])
    assert [(d["depth"], d["accuracy"], d["n"]) for d in by_depth] == [(0.1, 0.0, 1), (0.5, 1.0, 1)]


def test_needle_accuracy_is_exact_from_teacher_forcing():
    state = kv.PromptState(torch.arange(5), [], torch.arange(6), torch.zeros(6, 3), torch.zeros(6, 3),
                           kind="needle", answer="42", answer_end=3)
    assert kv.harness.needle_correct(state, None) and kv.harness.needle_correct(state, 3)
    assert not kv.harness.needle_correct(state, 2)
    missed = kv.PromptState(torch.arange(5), [], torch.arange(6), torch.zeros(6, 3), torch.zeros(6, 3),
                            kind="needle", answer="42", answer_end=None)
    assert kv.harness.needle_correct(missed, None) is None


def test_needle_prompts_know_where_the_full_models_answer_ends():
    model, tokenizer = load_lm("tiny-llama")
    (needle,) = kv.needle_prompts(tokenizer, 1, 96)
    state = kv.prepare_prompt(model, needle, 6, tokenizer)
    assert state.kind == "needle" and state.answer == needle.answer
    text = tokenizer.decode(state.continuation)
    assert (state.answer_end is None) == (needle.answer not in text)  # a random model rarely says it
    with pytest.raises(ValueError, match="needs the tokenizer"):
        kv.prepare_prompt(model, needle, 2)


def test_sequence_kl_between_two_models():
    model, _ = load_lm("tiny-llama")
    other, _ = load_lm("tiny-llama")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    sequences = [torch.randint(100, 5000, (12,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    assert kv.sequence_kl(model, model, sequences) == [0.0, 0.0]
    values = kv.sequence_kl(model, other, sequences, starts=[4, 6])
    with torch.no_grad():
        teacher = model(sequences[1][None]).logits[0, 5:-1]
        student = other(sequences[1][None]).logits[0, 5:-1]
    assert values[1] == pytest.approx(float(kv.kl_per_token(teacher, student).mean())) and values[1] > 0
    with pytest.raises(ValueError, match="leaves no token to score"):
        kv.sequence_kl(model, other, sequences[:1], starts=[12])


def test_real_quantized_cache_matches_the_simulation_and_measures_its_bytes():
    pytest.importorskip("optimum.quanto", reason='the kvquant extra: pip install -e ".[kvquant]"')
    model, _ = load_lm("tiny-llama")
    prompt = torch.randint(100, 5000, (65,), generator=torch.Generator().manual_seed(0))
    states = kv.prepare_prompts(model, [prompt], 6, progress=False)
    real = kv.evaluate(model, states, kv.make_method("quantized_cache", {"backend": "quanto", "bits": 4, "group_size": 16}))
    simulated = kv.evaluate(model, states, kv.make_method("quantize", {"bits": 4, "group_size": 16}))
    assert real.kl == pytest.approx(simulated.kl, rel=1e-3) and real.kl > 0  # the same min/max rounding
    # packed 4-bit codes plus an fp32 scale and shift per 16 values: (4 + 64 / 16) / 32 of fp32
    assert real.cache_fraction == pytest.approx((4 + 64 / 16) / 32)


def test_quantized_cache_errors_name_the_fix(monkeypatch):
    with pytest.raises(KVConfigError, match=r"the quanto backend takes bits \(2, 4\), got 8"):
        kv.make_method("quantized_cache", {"backend": "quanto", "bits": 8})
    with pytest.raises(KVConfigError, match="knob 'backend' must be one of quanto, hqq"):
        kv.make_method("quantized_cache", {"backend": "gptq"})
    method = kv.make_method("quantized_cache", {"backend": "hqq", "bits": 8, "residual_length": 4})
    with pytest.raises(KVConfigError, match="residual_length 4 must exceed the 6 tokens"):
        method.check_tokens(6)
    monkeypatch.setattr(kv.quantized, "backend_available", lambda backend: False)
    with pytest.raises(KVConfigError, match=r"the hqq backend is not installed; pip install -e \".\[kvquant\]\""):
        method.check_model(64)
