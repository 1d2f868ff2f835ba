"""Delta tuning with PEFT: method configs by name, a CPU training loop, evaluation, save/load, ask.

A *delta* is the small set of new parameters trained on top of a frozen backbone (LoRA
matrices, soft prompt vectors, prefix key/values, IA3 scaling vectors). This module gives
every chapter one way to make, train, save, reload and query one:

- ``peft_config(method, model, **knobs)`` and ``attach(model, method, **knobs)`` for the
  methods in ``METHODS`` (targets found per architecture by ``companion.arch``);
- ``train(model, tokenizer, pairs, num_steps=..., lr=..., batch_size=..., max_length=...)``
  trains on ``(prompt, target)`` pairs with the loss on the target tokens only;
- ``generate_answers`` / ``evaluate_qa`` / ``ask`` / ``interactive`` query a model;
- ``save_delta`` / ``load_delta`` write and read a delta checkpoint that remembers which
  backbone it was made for, and refuse another one with a clear error.

The package's modules: ``training`` (the loop), ``answering`` (generation, scores, the
question loop), ``checkpoint`` (save/load with the backbone check), ``command`` (the CLI);
adapter configs come from ``companion.adapters``.

Command line, like the original tutorial's ``--mode interactive_inference``::

    python -m companion.delta ask --delta PATH                # interactive loop
    python -m companion.delta ask --delta PATH -q "Capital of France?"
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..adapters import METHODS, attach, peft_config, trainable_parameters
from ..config import seed_everything
from ..prompting import DEFAULT_TEMPLATE
from .answering import FirstLineDone, ask, evaluate_qa, generate_answers, interactive
from .checkpoint import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    DELTA_INFO_FILE,
    DeltaMismatchError,
    backbone_bytes,
    backbone_fingerprint,
    checkpoint_bytes,
    delta_info,
    load_delta,
    load_delta_tokenizer,
    save_delta,
)
from .command import main
from .training import encode_pair, train, training_tokens

__all__ = [
    "ADAPTER_FILES", "ADAPTER_WEIGHTS", "DELTA_INFO_FILE", "DeltaMismatchError", "FirstLineDone", "METHODS",
    "SUGGESTED_LR", "ask", "attach", "backbone_bytes", "backbone_fingerprint", "checkpoint_bytes", "delta_info",
    "encode_pair", "evaluate_qa", "generate_answers", "interactive", "load_delta", "load_delta_tokenizer", "main",
    "peft_config", "save_delta", "train", "trainable_parameters", "training_tokens", "tune_and_evaluate",
]

# --- one method end to end ----------------------------------------------------------------------

# Learning rates that work for a few dozen steps on the course's models (measured on
# short_qa with SmolLM2-135M): soft prompts and scaling vectors need larger steps than LoRA.
SUGGESTED_LR = {"lora": 2e-3, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "ia3": 1e-2}


def tune_and_evaluate(
    method: str,
    pairs: Sequence[tuple[str, str]],
    eval_rows: Sequence[Mapping],
    *,
    num_steps: int,
    batch_size: int,
    max_length: int,
    lr: float | None = None,
    save_dir: str | Path | None = None,
    model_name: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 16,
    knobs: Mapping | None = None,
) -> dict:
    """Fresh backbone -> attach ``method`` -> train -> save -> evaluate; returns a record.

    The record holds: method, trainable (parameters), losses, train_seconds,
    tokens_per_second, checkpoint_bytes, backbone_bytes, em, f1, predictions, and the
    trained ``model`` and ``tokenizer``. ``lr`` defaults to ``SUGGESTED_LR[method]``.
    """
    from ..models import load_lm

    if method not in METHODS:
        raise ValueError(f"unknown delta method {method!r}; known: {', '.join(METHODS)}")
    lr = SUGGESTED_LR[method] if lr is None else lr
    seed_everything()
    base, tokenizer = load_lm(model_name)
    model = attach(base, method, **dict(knobs or {}))
    start = time.perf_counter()
    losses = train(model, tokenizer, pairs, num_steps=num_steps, lr=lr, batch_size=batch_size,
                   max_length=max_length, desc=method)
    seconds = time.perf_counter() - start
    tokens = training_tokens(tokenizer, pairs, num_steps=num_steps, batch_size=batch_size, max_length=max_length)
    record = {
        "method": method,
        "trainable": trainable_parameters(model),
        "losses": losses,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "backbone_bytes": backbone_bytes(model),
    }
    if save_dir is not None:
        path = save_delta(model, Path(save_dir) / method, template=template)
        record["checkpoint_bytes"] = checkpoint_bytes(path)
        record["path"] = path
    scores = evaluate_qa(model, tokenizer, eval_rows, template=template, max_new_tokens=max_new_tokens,
                         desc=f"{method} eval")
    record.update(em=scores["em"], f1=scores["f1"], contains=scores["contains"], items=scores["items"],
                  predictions=scores["predictions"], eval_seconds=scores["seconds"], model=model,
                  tokenizer=tokenizer)
    return record
