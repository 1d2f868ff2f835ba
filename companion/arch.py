"""One small adapter that hides how architectures differ (OPT vs Llama and its kin).

OPT keeps its decoder layers at ``model.model.decoder.layers`` and its final norm at
``model.model.decoder.final_layer_norm``; Llama-style models (SmolLM2, Qwen2, Mistral...)
keep them at ``model.model.layers`` and ``model.model.norm``. Chapters ask this module
instead of reaching into the model, so every chapter works on both.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Attention projections that LoRA targets by default ("q" and "v", as in the LoRA paper).
# OPT and Llama happen to share these names; other families would be added here.
_LORA_TARGETS = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_type(model: nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)
    if config is None:
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    return config.model_type


def _decoder(model: nn.Module) -> nn.Module:
    """The module that owns the layer list (``model.model.decoder`` or ``model.model``)."""
    base = unwrap(model)
    inner = getattr(base, "model", base)
    if hasattr(inner, "decoder") and hasattr(inner.decoder, "layers"):
        return inner.decoder  # OPT
    if hasattr(inner, "layers"):
        return inner  # Llama and kin
    raise NotImplementedError(
        f"companion.arch does not know where {type(base).__name__} keeps its layers; "
        "supported: OPT and Llama-style models (add the family to companion/arch.py)"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks, bottom first."""
    return _decoder(model).layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    return unwrap(model).config.hidden_size


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last block (identity if the model has none)."""
    decoder = _decoder(model)
    norm = getattr(decoder, "final_layer_norm", None) or getattr(decoder, "norm", None)
    return norm if norm is not None else nn.Identity()


def lora_target_modules(model: nn.Module) -> list[str]:
    """Module names LoRA-style delta methods wrap by default for this architecture."""
    kind = model_type(model)
    if kind not in _LORA_TARGETS:
        raise NotImplementedError(
            f"no default LoRA targets for model type {kind!r}; known: {sorted(_LORA_TARGETS)}"
        )
    return list(_LORA_TARGETS[kind])


def mlp_target_modules(model: nn.Module) -> list[str]:
    """The feed-forward output projection (IA3 scales it; ``fc2`` in OPT, ``down_proj`` else)."""
    return ["fc2"] if model_type(model) == "opt" else ["down_proj"]


def keep_first_layers(model: nn.Module, n: int) -> nn.Module:
    """A copy of ``model`` with only its first ``n`` blocks (the blocks above are removed).

    The copy really is smaller: the removed blocks' parameters are gone, and the config
    says ``num_hidden_layers = n``, so caches and generation see the new depth. The kept
    blocks are deep copies, so pruning never changes the original model.
    """
    total = num_layers(model)
    if not 1 <= n <= total:
        raise ValueError(f"can keep between 1 and {total} layers, got {n}")
    layers = decoder_layers(model)
    # Copy everything but the blocks we drop: temporarily detach them so deepcopy
    # does not spend memory on layers that are thrown away at once.
    decoder = _decoder(model)
    decoder.layers = nn.ModuleList(list(layers)[:n])
    try:
        pruned = copy.deepcopy(unwrap(model))
    finally:
        decoder.layers = layers
    pruned.config.num_hidden_layers = n
    layer_types = getattr(pruned.config, "layer_types", None)
    if layer_types is not None:
        pruned.config.layer_types = list(layer_types)[:n]
    return pruned


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real (non-pad) token; works with left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(dim=1)


@torch.no_grad()
def hidden_states_at_last_token(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Every block's raw output at each row's last real token: ``(layers, batch, d)``.

    Read with forward hooks rather than ``output_hidden_states``, because transformers
    puts the *final-normed* state in the last entry of ``hidden_states``; here entry ``i``
    is always exactly what block ``i`` returned, so a model pruned to ``k`` blocks gives
    the same first ``k`` entries as the full model.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        unwrap(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    states = torch.stack(captured)  # (layers, batch, seq, d)
    batch = torch.arange(input_ids.shape[0], device=input_ids.device)
    return states[:, batch, last_token_index(attention_mask), :]
