"""PEFT adapter configurations by method name, one home for every chapter.

``peft_config(method, model, **knobs)`` returns a PEFT config for one of ``METHODS``
(``lora``, ``prompt_tuning``, ``prefix_tuning``, ``ia3``) whose target modules suit the
model's architecture (found by ``companion.arch``); ``attach`` wraps a model with a fresh
trainable adapter. Chapter 1 trains these with ``companion.delta``; chapter 3 uses the
same LoRA configuration for instruction tuning with TRL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)

from . import arch
from .models import parameter_count

METHODS = ("lora", "prompt_tuning", "prefix_tuning", "ia3")


def _defaults(method: str, model) -> dict:
    if method == "lora":
        # r=8, alpha=16 on q_proj/v_proj: the LoRA paper's and the tutorial's setting.
        return dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=arch.lora_target_modules(model))
    if method == "prompt_tuning":
        # Soft prompt initialised from real token embeddings: trains faster than random.
        return dict(num_virtual_tokens=8, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    if method == "prefix_tuning":
        return dict(num_virtual_tokens=8)
    if method == "ia3":
        mlp = arch.mlp_target_modules(model)
        return dict(target_modules=arch.lora_target_modules(model) + mlp, feedforward_modules=mlp)
    raise ValueError(f"unknown delta method {method!r}; known: {', '.join(METHODS)}")


_CONFIG_CLASSES = {
    "lora": LoraConfig,
    "prompt_tuning": PromptTuningConfig,
    "prefix_tuning": PrefixTuningConfig,
    "ia3": IA3Config,
}


def peft_config(method: str, model, **knobs) -> PeftConfig:
    """A PEFT config for ``method`` (one of ``METHODS``) suited to ``model``'s architecture.

    ``knobs`` override the defaults (e.g. ``r=4`` for LoRA, ``num_virtual_tokens=16``).
    """
    method = method.strip().lower() if isinstance(method, str) else method
    if method not in _CONFIG_CLASSES:
        raise ValueError(f"unknown delta method {method!r}; known: {', '.join(METHODS)}")
    cls = _CONFIG_CLASSES[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(knobs) - fields)
    if unknown:
        raise ValueError(
            f"{method} has no setting(s) {unknown}; see peft.{cls.__name__} for the valid ones "
            "(e.g. r, lora_alpha for lora; num_virtual_tokens for prompt/prefix tuning)"
        )
    settings = {**_defaults(method, model), **knobs}
    return cls(task_type=TaskType.CAUSAL_LM, **settings)


def attach(model, method: str = "lora", **knobs) -> PeftModel:
    """Wrap ``model`` with a fresh, trainable delta; the backbone's own weights are frozen.

    NB: like ``peft.get_peft_model``, this modifies ``model`` in place (LoRA and IA3 insert
    their layers into it); load a fresh backbone to compare with the untouched model.
    """
    config = peft_config(method, model, **knobs)
    with _quiet_peft():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft():
    with warnings.catch_warnings():
        # peft asks transformers a deprecated question; nothing the reader can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def trainable_parameters(model) -> int:
    return parameter_count(model, trainable_only=True)


