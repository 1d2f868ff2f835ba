"""The course's KV-cache methods, each a small registered class.

``full`` (no compression), ``random``, ``streaming_llm`` (attention sinks + recent window),
``h2o`` (accumulated attention, heavy hitters + recent), ``snapkv`` (observation window +
pooling), ``tova`` (last query's attention), ``key_norm`` (low key norm), ``topk`` (each
query attends to its top-k keys only; the cache itself is kept) and ``quantize`` (8/4/2-bit
KV values, simulated). Writing your own: see ``companion.kv.methods``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .methods import (
    BudgetMethod, EvictionMethod, KVConfigError, KVMethod, check_fraction, check_group_size, check_int, protect,
    register_method,
)


@register_method
@dataclass
class Full(KVMethod):
    """No compression: the reference every other method is compared with."""

    name: ClassVar[str] = "full"


@register_method
@dataclass
class RandomEviction(EvictionMethod):
    """Keep random positions: the baseline any real method must beat."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int(self.name, "seed", self.seed, 0)

    def score(self, layer, keep):
        generator = torch.Generator().manual_seed(self.seed * 1000 + layer.index)
        return torch.rand(layer.keys.shape[:3], generator=generator)


@register_method
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
        check_int(self.name, "sinks", self.sinks, 0)
        if not isinstance(self.rolling, bool):
            raise KVConfigError(f"{self.name}: knob 'rolling' must be true or false, got {self.rolling!r}")

    @property
    def needs_stepping(self) -> bool:
        return self.rolling

    def _sinks(self, keep: int) -> int:
        return min(self.sinks, keep - 1)  # always keep the most recent token

    def score(self, layer, keep):
        scores = torch.arange(layer.length, dtype=torch.float32).expand(layer.keys.shape[:3])
        return protect(scores, slice(0, self._sinks(keep)))

    def after_step(self, cache, prompt_length):
        keep = self.keep_count(prompt_length)
        drop = self._sinks(keep)  # the oldest token after the sinks
        for layer in cache.layers:
            while layer.keys.shape[2] > keep:
                layer.keys = torch.cat([layer.keys[:, :, :drop], layer.keys[:, :, drop + 1 :]], dim=2)
                layer.values = torch.cat([layer.values[:, :, :drop], layer.values[:, :, drop + 1 :]], dim=2)


@register_method
@dataclass
class H2O(EvictionMethod):
    """Heavy hitters: positions that received the most attention during the prefill, summed
    over every prompt query, plus a ``recent`` share of the budget for the latest tokens
    (the prefill form of H2O, as kvpress evaluates it)."""

    name: ClassVar[str] = "h2o"
    recent: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        check_fraction(self.name, "recent", self.recent, allow_zero=True)

    def score(self, layer, keep):
        scores = layer.attention_received()
        recent = int(self.recent * keep)
        return protect(scores, slice(layer.length - recent, None)) if recent else scores


@register_method
@dataclass
class SnapKV(EvictionMethod):
    """Attention from the last ``window`` prompt queries (the observation window), smoothed
    with a ``kernel_size`` average pool; the window itself is always kept."""

    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel_size: int = 5

    def __post_init__(self):
        super().__post_init__()
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise KVConfigError(f"{self.name}: knob 'kernel_size' must be odd, got {self.kernel_size}")

    def score(self, layer, keep):
        window = min(self.window, layer.length)
        scores = layer.attention(last=window).sum(dim=2)  # (1, kv_heads, L)
        pad = self.kernel_size // 2
        scores = F.avg_pool1d(scores, self.kernel_size, stride=1, padding=pad, count_include_pad=False)
        return protect(scores, slice(layer.length - window, None))


@register_method
@dataclass
class TOVA(EvictionMethod):
    """Token omission via attention: the last prompt query's attention, averaged over all
    heads of the layer (so every head keeps the same positions)."""

    name: ClassVar[str] = "tova"

    def score(self, layer, keep):
        scores = layer.attention(last=1)[:, :, 0, :].mean(dim=1, keepdim=True)
        return scores.expand(layer.keys.shape[:3])


@register_method
@dataclass
class KeyNorm(EvictionMethod):
    """Keep the keys with the smallest L2 norm (low-norm keys draw high attention)."""

    name: ClassVar[str] = "key_norm"

    def score(self, layer, keep):
        return -layer.keys.float().norm(dim=-1)


@register_method
@dataclass
class TopKAttention(BudgetMethod):
    """Every query attends only to its top-k keys by ``q . k`` (k = the budget of the keys it
    can see); the cache itself is kept whole, so this saves compute, not memory."""

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
        if isinstance(self.budget, int):
            k = visible.clamp(max=self.budget)
        else:
            k = (self.budget * visible + 0.5).long().clamp(min=1)
        k_max = int(k.max())
        threshold = scores.topk(k_max, dim=-1).values.gather(-1, k - 1)  # the k-th largest score
        scores = scores.masked_fill(scores < threshold, float("-inf"))
        output = scores.softmax(dim=-1) @ value
        return output.transpose(1, 2).contiguous()


def fake_quantize(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round ``x`` to a ``bits``-bit asymmetric (min/max) grid per group of ``group_size``
    channels of each token, and map it back: what a quantised cache would give the attention
    (the round-to-nearest scheme of transformers' QuantizedCache backends)."""
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


@register_method
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
        check_int(self.name, "group_size", self.group_size, 1)

    def check_model(self, head_dim, where=""):
        check_group_size("quantize", self.group_size, head_dim, where)

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
