"""The method interface: small classes whose knobs are dataclass fields, and their registry.

A method turns the prompt's key/value cache (one ``LayerKV`` per layer, captured after the
prefill) into a smaller or cheaper one. Eviction methods only implement ``score``: one number
per cached position and key head; the base class keeps the ``budget`` with the highest
scores, per head and per layer, in their original order (the design of NVIDIA's kvpress).
A budget is a fraction of the prompt cache (a float in (0, 1]) or a number of positions (an
integer >= 1). A method is registered by name with ``register_method``, and a JSON config maps
straight onto its fields::

    @register_method
    @dataclass
    class KeepEveryOther(EvictionMethod):
        name: ClassVar[str] = "every_other"
        def score(self, layer, keep):
            return (torch.arange(layer.length) % 2 == 0).float().expand(layer.keys.shape[:3])

    make_method("every_other", {"budget": 0.5})

The course's own methods are in ``companion.kv.builtin``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

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
            raise ValueError("this LayerKV has no captured queries; build it with companion.kv.prefill")
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

    def attention_received(self) -> torch.Tensor:
        """Attention each position received, summed over every prompt query: ``(1, kv_heads, L)``.

        Computed once per layer and kept (every budget of H2O scores with it).
        """
        if getattr(self, "_received", None) is None:
            self._received = self.attention().sum(dim=2)
        return self._received


# --- knob checks (clear errors instead of failures deep inside torch) ----------------------


def check_int(method: str, knob: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVConfigError(f"{method}: knob {knob!r} must be an integer >= {minimum}, got {value!r}")


def check_group_size(method: str, group_size: int, head_dim: int, where: str = "") -> None:
    """Quantisation groups split each head's vector; the group size must divide the head size."""
    if head_dim % group_size:
        divisors = [d for d in (8, 16, 32, 64, 128) if head_dim % d == 0]
        raise KVConfigError(f"{where}{method}: group_size {group_size} does not divide the model's head "
                            f"size {head_dim}; use one of {divisors}")


def check_fraction(method: str, knob: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 <= value <= 1.0 if allow_zero else 0.0 < value <= 1.0)
    if not ok:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise KVConfigError(f"{method}: {knob!r} must be a number in {interval}, got {value!r}")


def check_budget(method: str, value) -> None:
    """A budget is a fraction in (0, 1] (a float) or a number of positions (an integer >= 1)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return
    raise KVConfigError(f"{method}: 'budget' must be a fraction of the prompt cache in (0, 1] "
                        f"(e.g. 0.25) or a whole number of positions >= 1 (e.g. 128), got {value!r}")


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

    def check_model(self, head_dim: int, where: str = "") -> None:
        """Raise ``KVConfigError`` if the knobs cannot work on a model with this head size."""

    def compress(self, layers: list[LayerKV]) -> list[KV]:
        """The prompt cache to decode from, one (keys, values) per layer."""
        return [(layer.keys, layer.values) for layer in layers]

    def attend(self, module, query, key, value, attention_mask, scaling):
        """Replace the attention while decoding (return ``(batch, q, heads, d)``), or None."""
        return None

    def after_step(self, cache, prompt_length: int) -> None:
        """Called after each decoding step (only for methods that need stepping)."""

    def make_cache(self, model, compressed: list[KV]):
        """The cache object to decode from, or None for a ``DynamicCache`` of ``compressed``."""
        return None

    def stored_bytes(self, cache) -> int | None:
        """Bytes the cache made by ``make_cache`` holds (None: use ``cache_bytes``)."""
        return None

    def check_tokens(self, tokens: int) -> None:
        """Raise ``KVConfigError`` if the method cannot take ``tokens`` tokens after the prompt."""

    def cache_bytes(self, compressed: list[KV]) -> int:
        """Bytes the compressed prompt cache takes (as stored: dtype of the tensors)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in compressed)

    def config(self) -> dict:
        """The knobs as a JSON-able dict (what a config file holds)."""
        return dataclasses.asdict(self)


@dataclass
class BudgetMethod(KVMethod):
    """A method that keeps a ``budget`` of the prompt cache: a fraction, or a position count."""

    uses_budget: ClassVar[bool] = True
    budget: float | int = 0.5

    def __post_init__(self):
        check_budget(self.name, self.budget)

    def keep_count(self, length: int) -> int:
        """Positions kept out of ``length`` (a fraction is rounded half up; at least one)."""
        if isinstance(self.budget, int):
            return min(length, self.budget)
        return max(1, min(length, int(self.budget * length + 0.5)))


@dataclass
class EvictionMethod(BudgetMethod):
    """Keep, per layer and key head, the ``keep_count`` positions with the highest score."""

    def score(self, layer: LayerKV, keep: int) -> torch.Tensor:
        """One score per position and key head: ``(batch, kv_heads, L)``; higher is kept."""
        raise NotImplementedError(f"{type(self).__name__} must define score(layer, keep)")

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


def protect(scores: torch.Tensor, positions: slice) -> torch.Tensor:
    """Make ``positions`` win over every other score (keeping their order among themselves)."""
    scores = scores.clone()
    span = scores.max() - scores.min() + 1.0
    scores[..., positions] += span + 1.0
    return scores


# --- registry -----------------------------------------------------------------------------

METHODS: dict[str, type[KVMethod]] = {}


def register_method(cls: type[KVMethod]) -> type[KVMethod]:
    """Class decorator: make a ``KVMethod`` dataclass available to ``make_method`` and run configs
    under its ``name`` (re-registering a name replaces the class, so a notebook cell can be re-run)."""
    if not (isinstance(cls, type) and issubclass(cls, KVMethod)):
        raise TypeError(f"register_method takes a KVMethod subclass, got {cls!r}")
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in vars(cls):
        raise TypeError(f"{cls.__name__} must be a @dataclass (put @register_method above @dataclass)")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier such as 'my_method', got {cls.name!r}")
    if isinstance(cls, type) and issubclass(cls, EvictionMethod) and cls.score is EvictionMethod.score:
        raise TypeError(f"{cls.__name__} is an EvictionMethod: define score(self, layer, keep)")
    METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names ``make_method`` accepts."""
    return list(METHODS)


def method_knobs(name: str) -> dict:
    """A method's knobs and their defaults."""
    cls = _method_class(name)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _method_class(name: str) -> type[KVMethod]:
    if name not in METHODS:
        raise KVConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)} "
                            "(register your own with @register_method)")
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
