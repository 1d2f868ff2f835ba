"""KV compression methods: registry and knob errors, what eviction keeps, quantisation, attention rows."""

import pytest
import torch

from companion.config import seed_everything
from companion.kv import (
    build_cache, prefill, EvictionMethod, KVConfigError, LayerKV, available_methods, fake_quantize, make_method, method_knobs,
)
from companion.models import load_lm

ARCHS = ["tiny-llama", "tiny-opt"]
EVICTION = [name for name in available_methods() if isinstance(make_method(name), EvictionMethod)]


@pytest.fixture(scope="module", autouse=True)
def _settings():
    seed_everything()  # the course's seed and COURSE_THREADS


@pytest.fixture(scope="module", params=ARCHS)
def prefilled(request):
    model, _ = load_lm(request.param)
    prompt = torch.randint(100, 5000, (41,), generator=torch.Generator().manual_seed(1))
    return model, prefill(model, prompt)  # 40 cached positions


def test_registry_lists_every_method_of_the_issue():
    assert {"full", "random", "streaming_llm", "h2o", "snapkv", "tova", "key_norm", "topk", "quantize"} <= set(
        available_methods()
    )
    builtin_eviction = {n for n in EVICTION if not n.startswith("test_")}  # other tests register test_* methods
    assert builtin_eviction == {"random", "streaming_llm", "h2o", "snapkv", "tova", "key_norm"}


def test_config_maps_onto_fields():
    method = make_method("snapkv", {"window": 8, "kernel_size": 3}, budget=0.3)
    assert (method.window, method.kernel_size, method.budget) == (8, 3, 0.3)
    assert method.config() == {"budget": 0.3, "window": 8, "kernel_size": 3}
    assert method_knobs("quantize") == {"bits": 8, "group_size": 32}


@pytest.mark.parametrize(
    "name, knobs, message",
    [
        ("snapkv2", {}, r"unknown method 'snapkv2'; known: full, random, streaming_llm"),
        ("snapkv", {"windw": 8}, r"method 'snapkv' has no knob 'windw'; its knobs: budget \(default 0.5\), window"),
        ("full", {"budget": 0.5}, r"method 'full' has no knob 'budget'; its knobs: none"),
        ("h2o", {"budget": 0.0}, r"h2o: 'budget' must be a fraction of the prompt cache in \(0, 1\]"),
        ("h2o", {"budget": 1.5}, r"in \(0, 1\] \(e.g. 0.25\) or a whole number of positions >= 1"),
        ("h2o", {"budget": 0}, r"or a whole number of positions >= 1 \(e.g. 128\), got 0"),
        ("topk", {"budget": "0.5"}, r"topk: 'budget' must be a fraction"),
        ("snapkv", {"kernel_size": 4}, r"'kernel_size' must be odd"),
        ("snapkv", {"window": 0}, r"'window' must be an integer >= 1"),
        ("quantize", {"bits": 3}, r"'bits' must be 2, 4 or 8"),
        ("streaming_llm", {"rolling": "yes"}, r"'rolling' must be true or false"),
        ("h2o", {"recent": 2}, r"'recent' must be a number in \[0, 1\]"),
    ],
)
def test_config_errors_are_clear(name, knobs, message):
    with pytest.raises(KVConfigError, match=message):
        make_method(name, knobs)


def test_method_config_must_be_an_object():
    with pytest.raises(KVConfigError, match="must be a JSON object"):
        make_method("h2o", [0.5])


@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("budget, expected", [(0.1, 4), (0.25, 10), (0.5, 20), (0.9, 36), (1.0, 40)])
def test_eviction_keeps_exactly_the_budget_per_layer(prefilled, name, budget, expected):
    model, layers = prefilled
    compressed = make_method(name, budget=budget).compress(layers)
    assert len(compressed) == len(layers)
    for (keys, values), layer in zip(compressed, layers):
        assert keys.shape == values.shape == (*layer.keys.shape[:2], expected, layer.keys.shape[3])
    cache = build_cache(model, compressed)  # and transformers' cache reports that length
    assert cache.get_seq_length() == expected


def _kept_positions(original: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Which positions of head 0 the compressed keys are (keys are unique per position)."""
    return [int((original[0, 0] == row).all(-1).nonzero()) for row in kept[0, 0]]


def test_budget_one_keeps_the_cache_unchanged(prefilled):
    _, layers = prefilled
    for name in EVICTION:
        for (keys, values), layer in zip(make_method(name, budget=1.0).compress(layers), layers):
            assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


def test_streaming_llm_keeps_sinks_and_recent_tokens(prefilled):
    _, layers = prefilled
    (keys, _), layer = make_method("streaming_llm", {"sinks": 4}, budget=0.25).compress(layers)[1], layers[1]
    assert _kept_positions(layer.keys, keys) == [0, 1, 2, 3] + list(range(34, 40))


def test_snapkv_keeps_its_observation_window_and_order(prefilled):
    _, layers = prefilled
    (keys, _), layer = make_method("snapkv", {"window": 6}, budget=0.5).compress(layers)[2], layers[2]
    kept = _kept_positions(layer.keys, keys)
    assert kept == sorted(kept) and set(range(34, 40)) <= set(kept) and len(kept) == 20


def test_tova_keeps_the_same_positions_in_every_head(prefilled):
    _, layers = prefilled
    keys, _ = make_method("tova", budget=0.3).compress(layers)[0]
    heads = [
        [int((layers[0].keys[0, h] == row).all(-1).nonzero()) for row in keys[0, h]] for h in range(keys.shape[1])
    ]
    assert all(head == heads[0] for head in heads)


def test_h2o_keeps_the_most_attended_positions(prefilled):
    _, layers = prefilled
    layer = layers[0]
    keys, _ = make_method("h2o", {"recent": 0.0}, budget=0.25).compress(layers)[0]
    received = layer.attention().sum(dim=2)[0, 0]  # attention each position received, head 0
    assert sorted(_kept_positions(layer.keys, keys)) == sorted(received.topk(10).indices.tolist())


def test_rolling_window_stays_at_the_budget_while_decoding(prefilled):
    model, layers = prefilled
    method = make_method("streaming_llm", {"sinks": 2, "rolling": True}, budget=0.25)
    assert method.needs_stepping and not make_method("streaming_llm").needs_stepping
    cache = build_cache(model, method.compress(layers))
    sink = cache.layers[0].keys[:, :, :2].clone()
    for step in range(3):
        new = [(torch.randn_like(layer.keys[:, :, :1]),) * 2 for layer in layers]
        for i, (k, v) in enumerate(new):
            cache.layers[i].update(k, v)
        method.after_step(cache, prompt_length=40)
        assert all(layer.keys.shape[2] == 10 for layer in cache.layers)
        assert torch.equal(cache.layers[0].keys[:, :, -1:], new[0][0])  # the newest token is kept
        assert torch.equal(cache.layers[0].keys[:, :, :2], sink)  # and so are the sinks


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fake_quantize_stays_within_half_a_step(bits):
    x = torch.randn(1, 3, 7, 64) * torch.linspace(0.1, 5, 64)
    q = fake_quantize(x, bits, group_size=16)
    groups = x.view(1, 3, 7, 4, 16)
    step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    error = (q - x).abs().view(1, 3, 7, 4, 16).amax(-1)
    assert (error <= step / 2 + 1e-5).all()
    assert len(torch.unique(q.view(1, 3, 7, 4, 16)[0, 0, 0, 0])) <= 2**bits


def test_quantize_bytes_and_group_errors(prefilled):
    _, layers = prefilled
    full_bytes = make_method("full").cache_bytes([(layer.keys, layer.values) for layer in layers])
    quant = make_method("quantize", {"bits": 4, "group_size": 16})
    compressed = quant.compress(layers)
    # 4 bits per value plus an fp16 scale and zero per 16 values, against 32 bits per value.
    assert quant.cache_bytes(compressed) / full_bytes == pytest.approx((4 + 32 / 16) / 32)
    with pytest.raises(KVConfigError, match="group_size 32 must divide the head dimension 16"):
        make_method("quantize").compress(layers)


@pytest.mark.parametrize("name", ARCHS)
def test_attention_rows_match_transformers_eager_attention(name):
    """The rows methods score with equal the weights eager attention returns."""
    model, _ = load_lm(name)
    prompt = torch.randint(100, 5000, (17,), generator=torch.Generator().manual_seed(2))
    layers = prefill(model, prompt)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(prompt[None, :-1], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    for layer, weights in zip(layers, eager):
        kv_heads = layer.keys.shape[1]
        expected = weights.view(1, kv_heads, -1, *weights.shape[-2:]).mean(2)[:, :, -5:]
        torch.testing.assert_close(layer.attention(last=5), expected, atol=1e-5, rtol=1e-4)


def test_attention_needs_captured_queries():
    layer = LayerKV(0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4))
    with pytest.raises(ValueError, match="no captured queries"):
        layer.attention()
