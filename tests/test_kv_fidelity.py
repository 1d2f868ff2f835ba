"""The fidelity harness on tiny OPT and Llama models: exactness, the fast path, bounds."""

import pytest
import torch

from companion.config import seed_everything
from companion.kv import (
    available_methods, companion_attention, compare, evaluate, kv_bytes_per_token, make_method, prepare_prompts,
)
from companion.kv.harness import ATTENTION_NAME
from companion.models import load_lm

ARCHS = ["tiny-llama", "tiny-opt"]
NEW_TOKENS = 8
PREFILL_ONLY = ["random", "streaming_llm", "h2o", "snapkv", "tova", "key_norm", "topk"]


@pytest.fixture(scope="module", autouse=True)
def _settings():
    seed_everything()  # the course's seed and COURSE_THREADS


@pytest.fixture(scope="module", params=ARCHS)
def bench(request):
    model, _ = load_lm(request.param)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 5000, (25,), generator=generator) for _ in range(2)]
    return model, prepare_prompts(model, prompts, NEW_TOKENS, progress=False)


def _method(name, budget=0.25):
    if name == "quantize":
        return make_method(name, {"group_size": 16})
    if name == "quantized_cache":  # the optional extra: a clear skip when it is not installed
        pytest.importorskip("optimum.quanto", reason='the kvquant extra: pip install -e ".[kvquant]"')
        return make_method(name, {"group_size": 16})
    return make_method(name) if name == "full" else make_method(name, budget=budget)


def test_full_gives_total_agreement_and_zero_kl(bench):
    model, states = bench
    for reference in (False, True):
        result = evaluate(model, states, make_method("full"), reference=reference)
        assert (result.top1, result.top5, result.kl) == (1.0, 1.0, 0.0)
        assert result.first_disagreement == NEW_TOKENS and result.tokens == 2 * NEW_TOKENS
        assert result.cache_fraction == 1.0


def test_continuation_is_the_models_greedy_generation(bench):
    model, states = bench
    state = states[0]
    generated = model.generate(state.prompt_ids[None], attention_mask=torch.ones(1, 25, dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated[0, 25:], state.continuation)
    # and the teacher's distributions are the model's own on the whole sequence
    with torch.no_grad():
        logits = model(torch.cat([state.prompt_ids, state.continuation])[None]).logits[0, 24:-1]
    torch.testing.assert_close(state.pass_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.step_logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in available_methods() if n not in ("full", "quantize", "quantized_cache")])
def test_budget_covering_the_prompt_gives_total_agreement(bench, name):
    model, states = bench
    method = _method(name, budget=1.0)
    result = evaluate(model, states, method)
    if method.needs_stepping:  # never: the rolling window is a knob, checked below
        pytest.fail("a default-configured method should not need stepping")
    assert (result.top1, result.top5) == (1.0, 1.0)
    assert result.kl < 1e-6  # exactly 0 for eviction; topk's own attention differs by rounding
    if name != "topk":
        assert result.kl == 0.0 and result.cache_fraction == 1.0


def test_rolling_window_at_full_budget_evicts_once_decoding_passes_it(bench):
    """StreamingLLM's rolling window holds the prompt's length; later tokens push old ones out."""
    model, states = bench
    rolling = evaluate(model, states, make_method("streaming_llm", {"rolling": True}, budget=1.0))
    assert rolling.path == "token by token"
    assert rolling.kl > 0.0


@pytest.mark.parametrize("name", available_methods() + ["streaming_llm-rolling", "topk-tokens"])
def test_fast_path_gives_the_reference_loops_numbers(bench, name):
    """Every registered method (and the rolling window, and a budget in tokens): same numbers."""
    model, states = bench
    if name == "streaming_llm-rolling":
        method = make_method("streaming_llm", {"rolling": True}, budget=0.5)
    elif name == "topk-tokens":
        method = make_method("topk", budget=5)
    else:
        method = _method(name)
    fast = evaluate(model, states, method)
    slow = evaluate(model, states, method, reference=True)
    expected = "token by token" if method.needs_stepping else "one pass"
    assert (fast.path, slow.path) == (expected, "reference")
    for mine, theirs in zip(fast.per_prompt, slow.per_prompt):
        assert mine["top1_hits"] == theirs["top1_hits"]
        assert mine["top5_hits"] == theirs["top5_hits"]
        assert mine["first_disagreement"] == theirs["first_disagreement"]
        assert mine["kl_sum"] == pytest.approx(theirs["kl_sum"], rel=1e-3, abs=1e-9)
    assert fast.cache_bytes == slow.cache_bytes


def test_eviction_loses_fidelity_and_kl_grows_as_budget_shrinks(bench):
    model, states = bench
    kl = [evaluate(model, states, _method("random", budget)).kl for budget in (0.9, 0.5, 0.1)]
    assert 0.0 < kl[0] < kl[1] < kl[2]


def test_8bit_quantisation_stays_within_the_kl_bound(bench):
    """Stated bound on the tiny models: mean KL below 1e-5, and far below 2-bit's."""
    model, states = bench
    eight = evaluate(model, states, make_method("quantize", {"bits": 8, "group_size": 16}))
    two = evaluate(model, states, make_method("quantize", {"bits": 2, "group_size": 16}))
    assert 0.0 < eight.kl < 1e-5
    assert eight.kl < two.kl / 10
    assert eight.cache_fraction == pytest.approx((8 + 2) / 32)


def test_attention_implementation_is_restored(bench):
    model, _ = bench
    before = model.config._attn_implementation
    with companion_attention(model):
        assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config._attn_implementation == before


def test_compare_counts_agreement_kl_and_first_disagreement():
    continuation = torch.tensor([0, 1, 2])
    logits = torch.full((3, 8), -10.0)
    logits[0, 0] = logits[1, 3] = logits[2, 2] = 5.0  # step 1 predicts 3 instead of 1
    logits[1, 1] = 4.0  # ... but has 1 second
    result = compare(logits, logits, continuation)
    assert result == {"tokens": 3, "top1_hits": 2, "top5_hits": 3, "kl_sum": 0.0, "kl_tokens": [0.0, 0.0, 0.0],
                      "first_disagreement": 1}
    uniform = torch.zeros(3, 8)
    kl = compare(uniform, logits, continuation)["kl_sum"]
    teacher = logits.log_softmax(-1)
    expected = (teacher.exp() * (teacher - uniform.log_softmax(-1))).sum().item()
    assert kl == pytest.approx(expected) and kl > 0


def test_bad_prompts_and_empty_batches_are_clear(bench):
    model, _ = bench
    with pytest.raises(ValueError, match="at least 2 token ids"):
        prepare_prompts(model, [torch.tensor([5])], 4, progress=False)
    with pytest.raises(ValueError, match="exceed the model's 2048 positions"):
        prepare_prompts(model, [torch.arange(2040)], 16, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(model, [], make_method("full"))


def test_bytes_per_token_matches_the_cache(bench):
    model, states = bench
    full = evaluate(model, states[:1], make_method("full"))
    assert full.full_cache_bytes == kv_bytes_per_token(model) * 24
