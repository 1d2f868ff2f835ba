"""KV-cache compression methods: small classes with their knobs as dataclass fields.

A method turns the prompt's key/value cache (one ``LayerKV`` per layer, captured after the
prefill) into a smaller or cheaper one. Eviction methods only implement ``score``: one number
per cached position and key head; the base class keeps the ``budget`` fraction with the
highest scores, per head and per layer, in their original order (the design of NVIDIA's
kvpress). Every method is registered by name, and a JSON config maps straight onto its fields:

    make_method("snapkv", {"budget": 0.25, "window": 16})

Methods: ``full`` (no compression), ``random``, ``streaming_llm`` (attention sinks + recent
window), ``h2o`` (accumulated attention, heavy hitters + recent), ``snapkv`` (observation
window + pooling), ``tova`` (last query's attention), ``key_norm`` (low key norm),
``topk`` (each query attends to its top-k keys only; the cache itself is kept) and
``quantize`` (8/4/2-bit KV values).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (batch, kv_heads, positions, head_dim)


class KVConfigError(ValueError):
    """A method name, knob or budget is wrong; the message says what is allowed."""


@dataclass
class LayerKV:
    """One layer's prompt cache after the prefill, with what scoring methods may need.

    ``queries`` are the query states exactly as the attention saw them (after RoPE; OPT
    pre-scales them), and ``scaling`` the factor the attention applied to ``q @ k.T``.
    """

    index: int
    keys: torch.Tensor  # (1, kv_heads, L, d)
    values: torch.Tensor  # (1, kv_heads, L, d)
    queries: torch.Tensor | None = None  # (1, q_heads, L, d)
    scaling: float | None = None

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def attention(self, last: int | None = None) -> torch.Tensor:
        """Causal softmax attention of the last ``last`` prompt queries (all if None) over the
        prompt keys, averaged over the query heads sharing each key head: ``(1, kv_heads, last, L)``.

        Computed here from the captured queries and the cached keys, because transformers'
        sdpa attention never returns its weights and eager attention would materialise them
        for every layer and every query; the methods need only a few rows.
        """
        if self.queries is None:
            raise ValueError("this LayerKV has no captured queries; build it with companion.kv_fidelity.prefill")
        length = self.length
        last = length if last is None else max(1, min(int(last), length))
        queries = self.queries[:, :, length - last :, :].float()
        kv_heads, q_heads = self.keys.shape[1], queries.shape[1]
        group = q_heads // kv_heads
        keys = self.keys.float().repeat_interleave(group, dim=1)
        scaling = self.scaling if self.scaling is not None else queries.shape[-1] ** -0.5
        scores = queries @ keys.transpose(-1, -2) * scaling  # (1, q_heads, last, L)
        query_pos = torch.arange(length - last, length).view(-1, 1)
        causal = torch.arange(length).view(1, -1) <= query_pos
        weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return weights.view(1, kv_heads, group, last, length).mean(dim=2)


# --- knob checks (clear errors instead of failures deep inside torch) ----------------------


def _check_int(method: str, knob: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVConfigError(f"{method}: knob {knob!r} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(method: str, knob: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 <= value <= 1.0 if allow_zero else 0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise KVConfigError(
            f"{method}: {knob!r} must be a number in {interval}"
            f"{' (a fraction of the prompt cache)' if knob == 'budget' else ''}, got {value!r}"
        )


# --- the method interface -----------------------------------------------------------------


@dataclass
class KVMethod:
    """Base class: a method with no knobs that leaves the cache as it is."""

    name: ClassVar[str] = ""
    uses_budget: ClassVar[bool] = False

    @property
    def needs_stepping(self) -> bool:
        """True if the method changes the cache while decoding, so the harness must step."""
        return False

    def compress(self, layers: list[LayerKV]) -> list[KV]:
        """The prompt cache to decode from, one (keys, values) per layer."""
        return [(layer.keys, layer.values) for layer in layers]

    def attend(self, module, query, key, value, attention_mask, scaling):
        """Replace the attention while decoding (return ``(batch, q, heads, d)``), or None."""
        return None

    def after_step(self, cache, prompt_length: int) -> None:
        """Called after each decoding step (only for methods that need stepping)."""

    def cache_bytes(self, compressed: list[KV]) -> int:
        """Bytes the compressed prompt cache takes (as stored: dtype of the tensors)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in compressed)

    def config(self) -> dict:
        """The knobs as a JSON-able dict (what a config file holds)."""
        return dataclasses.asdict(self)


@dataclass
class Full(KVMethod):
    """No compression: the reference every other method is compared with."""

    name: ClassVar[str] = "full"


@dataclass
class BudgetMethod(KVMethod):
    """A method that keeps a ``budget`` fraction of the prompt cache (in (0, 1])."""

    uses_budget: ClassVar[bool] = True
    budget: float = 0.5

    def __post_init__(self):
        _check_fraction(self.name, "budget", self.budget)

    def keep_count(self, length: int) -> int:
        """Positions kept out of ``length`` (rounded half up, at least one)."""
        return max(1, min(length, int(self.budget * length + 0.5)))


@dataclass
class EvictionMethod(BudgetMethod):
    """Keep, per layer and key head, the ``keep_count`` positions with the highest score."""

    def score(self, layer: LayerKV, keep: int) -> torch.Tensor:
        """One score per position and key head: ``(batch, kv_heads, L)``; higher is kept."""
        raise NotImplementedError

    def compress(self, layers: list[LayerKV]) -> list[KV]:
        compressed = []
        for layer in layers:
            keep = self.keep_count(layer.length)
            if keep == layer.length:
                compressed.append((layer.keys, layer.values))
                continue
            scores = self.score(layer, keep).expand(layer.keys.shape[:3])
            kept = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # original order
            index = kept.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            compressed.append((layer.keys.gather(2, index), layer.values.gather(2, index)))
        return compressed


def _protect(scores: torch.Tensor, positions: slice) -> torch.Tensor:
    """Make ``positions`` win over every other score (keeping their order among themselves)."""
    scores = scores.clone()
    span = scores.max() - scores.min() + 1.0
    scores[..., positions] += span + 1.0
    return scores


@dataclass
class RandomEviction(EvictionMethod):
    """Keep random positions: the baseline any real method must beat."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_int(self.name, "seed", self.seed, 0)

    def score(self, layer, keep):
        generator = torch.Generator().manual_seed(self.seed * 1000 + layer.index)
        return torch.rand(layer.keys.shape[:3], generator=generator)


@dataclass
class StreamingLLM(EvictionMethod):
    """Attention sinks (the first ``sinks`` tokens) plus the most recent tokens.

    With ``rolling=True`` the window also rolls while decoding, as published: the cache stays
    at the budget, the oldest non-sink token leaving as each new one arrives (this needs the
    token-by-token loop).
    """

    name: ClassVar[str] = "streaming_llm"
    sinks: int = 4
    rolling: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check_int(self.name, "sinks", self.sinks, 0)
        if not isinstance(self.rolling, bool):
            raise KVConfigError(f"{self.name}: knob 'rolling' must be true or false, got {self.rolling!r}")

    @property
    def needs_stepping(self) -> bool:
        return self.rolling

    def _sinks(self, keep: int) -> int:
        return min(self.sinks, keep - 1)  # always keep the most recent token

    def score(self, layer, keep):
        scores = torch.arange(layer.length, dtype=torch.float32).expand(layer.keys.shape[:3])
        return _protect(scores, slice(0, self._sinks(keep)))

    def after_step(self, cache, prompt_length):
        keep = self.keep_count(prompt_length)
        drop = self._sinks(keep)  # the oldest token after the sinks
        for layer in cache.layers:
            while layer.keys.shape[2] > keep:
                layer.keys = torch.cat([layer.keys[:, :, :drop], layer.keys[:, :, drop + 1 :]], dim=2)
                layer.values = torch.cat([layer.values[:, :, :drop], layer.values[:, :, drop + 1 :]], dim=2)


@dataclass
class H2O(EvictionMethod):
    """Heavy hitters: positions that received the most attention during the prefill, summed
    over every prompt query, plus a ``recent`` share of the budget for the latest tokens
    (the prefill form of H2O, as kvpress evaluates it)."""

    name: ClassVar[str] = "h2o"
    recent: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        _check_fraction(self.name, "recent", self.recent, allow_zero=True)

    def score(self, layer, keep):
        scores = layer.attention().sum(dim=2)
        recent = int(self.recent * keep)
        return _protect(scores, slice(layer.length - recent, None)) if recent else scores


@dataclass
class SnapKV(EvictionMethod):
    """Attention from the last ``window`` prompt queries (the observation window), smoothed
    with a ``kernel_size`` average pool; the window itself is always kept."""

    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel_size: int = 5

    def __post_init__(self):
        super().__post_init__()
        _check_int(self.name, "window", self.window, 1)
        _check_int(self.name, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise KVConfigError(f"{self.name}: knob 'kernel_size' must be odd, got {self.kernel_size}")

    def score(self, layer, keep):
        window = min(self.window, layer.length)
        scores = layer.attention(last=window).sum(dim=2)  # (1, kv_heads, L)
        pad = self.kernel_size // 2
        scores = F.avg_pool1d(scores, self.kernel_size, stride=1, padding=pad, count_include_pad=False)
        return _protect(scores, slice(layer.length - window, None))


@dataclass
class TOVA(EvictionMethod):
    """Token omission via attention: the last prompt query's attention, averaged over all
    heads of the layer (so every head keeps the same positions)."""

    name: ClassVar[str] = "tova"

    def score(self, layer, keep):
        scores = layer.attention(last=1)[:, :, 0, :].mean(dim=1, keepdim=True)
        return scores.expand(layer.keys.shape[:3])


@dataclass
class KeyNorm(EvictionMethod):
    """Keep the keys with the smallest L2 norm (low-norm keys draw high attention)."""

    name: ClassVar[str] = "key_norm"

    def score(self, layer, keep):
        return -layer.keys.float().norm(dim=-1)


@dataclass
class TopKAttention(BudgetMethod):
    """Every query attends only to its top-k keys by ``q . k`` (k = budget x the keys it can
    see); the cache itself is kept whole, so this saves compute, not memory."""

    name: ClassVar[str] = "topk"

    def attend(self, module, query, key, value, attention_mask, scaling):
        group = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query @ key.transpose(-1, -2)) * scaling  # (b, heads, q, kv)
        q_len, kv_len = scores.shape[-2:]
        if attention_mask is None:  # plain causal: the queries are the last q_len positions
            rows = torch.arange(kv_len - q_len, kv_len).view(-1, 1)
            attention_mask = (torch.arange(kv_len).view(1, -1) <= rows).view(1, 1, q_len, kv_len)
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0  # additive float mask: 0 where allowed
        scores = scores.masked_fill(~attention_mask, float("-inf"))
        visible = attention_mask.sum(dim=-1, keepdim=True).expand(*scores.shape[:-1], 1)
        k = (self.budget * visible + 0.5).long().clamp(min=1)
        ranked = scores.sort(dim=-1, descending=True).values
        threshold = ranked.gather(-1, k - 1)
        scores = scores.masked_fill(scores < threshold, float("-inf"))
        output = scores.softmax(dim=-1) @ value
        return output.transpose(1, 2).contiguous()


def fake_quantize(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round ``x`` to a ``bits``-bit asymmetric (min/max) grid per group of ``group_size``
    channels of each token, and map it back: what a quantised cache would give the attention.

    Hand-written because transformers' QuantizedCache needs the optimum-quanto or hqq
    backends, which are not installed; this is the same round-to-nearest scheme.
    """
    shape = x.shape
    if shape[-1] % group_size:
        raise KVConfigError(f"quantize: group_size {group_size} must divide the head dimension {shape[-1]}")
    groups = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    high = groups.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = (high - low).clamp(min=1e-8) / levels
    codes = ((groups - low) / scale).round().clamp(0, levels)
    return (codes * scale + low).reshape(shape).to(x.dtype)


@dataclass
class Quantize(KVMethod):
    """Store the prompt's keys and values with ``bits`` bits (plus an fp16 scale and zero point
    per group of ``group_size`` channels). Tokens generated afterwards stay in full precision,
    like the recent-token residual of transformers' QuantizedCache."""

    name: ClassVar[str] = "quantize"
    bits: int = 8
    group_size: int = 32

    def __post_init__(self):
        if self.bits not in (2, 4, 8) or isinstance(self.bits, bool):
            raise KVConfigError(f"{self.name}: knob 'bits' must be 2, 4 or 8, got {self.bits!r}")
        _check_int(self.name, "group_size", self.group_size, 1)

    def compress(self, layers):
        return [
            (fake_quantize(layer.keys, self.bits, self.group_size),
             fake_quantize(layer.values, self.bits, self.group_size))
            for layer in layers
        ]

    def cache_bytes(self, compressed):
        total = 0
        for keys, values in compressed:
            for tensor in (keys, values):
                groups = tensor.numel() // self.group_size
                total += math.ceil(tensor.numel() * self.bits / 8) + groups * 2 * 2  # fp16 scale + zero
        return total


# --- registry -----------------------------------------------------------------------------

METHODS: dict[str, type[KVMethod]] = {
    cls.name: cls
    for cls in (Full, RandomEviction, StreamingLLM, H2O, SnapKV, TOVA, KeyNorm, TopKAttention, Quantize)
}


def available_methods() -> list[str]:
    """Names ``make_method`` accepts."""
    return list(METHODS)


def method_knobs(name: str) -> dict:
    """A method's knobs and their defaults."""
    cls = _method_class(name)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _method_class(name: str) -> type[KVMethod]:
    if name not in METHODS:
        raise KVConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, config: dict | None = None, **overrides) -> KVMethod:
    """Build a method from its name and a dict of knobs (a JSON config's ``method_config``)."""
    cls = _method_class(name)
    if not isinstance(config or {}, dict):
        raise KVConfigError(f"{name}: the method config must be a JSON object, got {type(config).__name__}")
    knobs = {**(config or {}), **overrides}
    allowed = method_knobs(name)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        listed = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items()) or "none"
        raise KVConfigError(f"method {name!r} has no knob {unknown[0]!r}; its knobs: {listed}")
    return cls(**knobs)
