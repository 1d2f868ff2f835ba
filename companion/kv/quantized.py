"""Real quantised caches: transformers' ``QuantizedCache`` with the optimum-quanto or HQQ backend.

``quantize`` (in ``builtin``) *simulates* a quantised cache by rounding the keys and values;
``quantized_cache`` stores the prompt's cache in transformers' ``QuantizedCache`` itself, so
the attention reads what the backend dequantises, and the memory is measured on the stored
tensors (packed codes, scales and zero points). Tokens generated afterwards stay in the
cache's full-precision residual (``residual_length`` must exceed the continuation, so one
forward pass and the token loop see the same cache).

The backends are an optional extra, not part of the core install::

    pip install -e ".[kvquant]"            # optimum-quanto 0.2.7 (+ HQQ's own dependencies)
    pip install --no-deps hqq==0.2.8       # HQQ declares dependencies it does not need here

optimum-quanto compiles a small CPU extension on its first call (about two minutes, once).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..arch import unwrap
from .methods import KVConfigError, KVMethod, check_group_size, check_int, register_method

BACKENDS = {"quanto": ("optimum.quanto", "optimum-quanto==0.2.7", (2, 4)),
            "hqq": ("hqq", "hqq==0.2.8", (2, 4, 8))}
INSTALL = 'pip install -e ".[kvquant]" && pip install --no-deps hqq==0.2.8'


def backend_available(backend: str) -> bool:
    """True if the backend's package is installed."""
    module = BACKENDS[backend][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (optimum) is missing
        return False


def stored_bytes(value) -> int:
    """Bytes of every tensor inside ``value`` (tensor subclasses are opened up, so a packed
    4-bit tensor counts its packed storage; tuples, lists and dicts are walked)."""
    if isinstance(value, torch.Tensor):
        if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
            names, _ = value.__tensor_flatten__()
            return sum(stored_bytes(getattr(value, name)) for name in names)
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(stored_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(stored_bytes(item) for item in value.values())
    return 0


@register_method
@dataclass
class QuantizedCacheMethod(KVMethod):
    """The prompt cache stored in transformers' ``QuantizedCache`` (``backend`` quanto or hqq)."""

    name: ClassVar[str] = "quantized_cache"
    backend: str = "quanto"
    bits: int = 4
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise KVConfigError(f"{self.name}: knob 'backend' must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        allowed = BACKENDS[self.backend][2]
        if isinstance(self.bits, bool) or self.bits not in allowed:
            raise KVConfigError(f"{self.name}: the {self.backend} backend takes bits {allowed}, got {self.bits!r}")
        check_int(self.name, "group_size", self.group_size, 1)
        check_int(self.name, "residual_length", self.residual_length, 1)

    def check_model(self, head_dim, where=""):
        check_group_size(self.name, self.group_size, head_dim, where)
        if not backend_available(self.backend):
            raise KVConfigError(f"{where}{self.name}: the {self.backend} backend is not installed; {INSTALL}")

    def check_tokens(self, tokens: int) -> None:
        if tokens >= self.residual_length:
            raise KVConfigError(f"{self.name}: residual_length {self.residual_length} must exceed the "
                                f"{tokens} tokens fed after the prompt; raise it")

    def make_cache(self, model, compressed):
        from transformers import QuantizedCache

        if not backend_available(self.backend):
            raise KVConfigError(f"{self.name}: the {self.backend} backend is not installed; {INSTALL}")
        cache = QuantizedCache(backend=self.backend, config=unwrap(model).config, nbits=self.bits,
                               q_group_size=self.group_size, residual_length=self.residual_length)
        for index, (keys, values) in enumerate(compressed):
            cache.update(keys, values, index)  # the first update stores the quantised prompt
        return cache

    def stored_bytes(self, cache) -> int:
        return sum(stored_bytes((layer._quantized_keys, layer._quantized_values, layer.keys, layer.values))
                   for layer in cache.layers)
