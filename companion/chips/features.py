"""Reading a frozen model's layers: one forward per example, cached; and Block Influence.

``extract_features`` keeps every block's output at the last prompt token (what the chips
read) and, in the same forward, the model's next-token logits of the label words (the
zero-shot baseline). ``block_influence`` measures how much each block changes the hidden
states it is given (ShortGPT, arXiv 2403.03853).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import decoder_layers, unwrap
from ..progress import progress as progress_bar


@dataclass
class Features:
    """Cached results of one frozen forward per example.

    ``states``: every block's output at the last prompt token, ``(layers, examples, hidden)``.
    ``label_scores``: the model's own next-token logits of the task's label words,
    ``(examples, classes)`` (the zero-shot baseline), or ``None``.
    """

    states: torch.Tensor
    label_scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.states.shape[1]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> Features:
        indices = torch.as_tensor(indices, dtype=torch.long)
        scores = None if self.label_scores is None else self.label_scores[indices]
        return Features(self.states[:, indices], scores)


def check_max_length(max_length) -> int:
    """``max_length`` must be a whole number of tokens, at least 1."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a whole number of tokens >= 1, got {max_length!r}")
    return max_length


@torch.no_grad()
def _last_token_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_logits: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every block's output at each row's last token, and optionally that token's logits.

    Batches are left-padded, so the last position is every row's last real token. One
    forward also gives the next-token logits at that position only (``logits_to_keep=1``);
    without logits the LM head is skipped (a quarter of SmolLM2's forward).
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, -1, :])

    base = unwrap(model)
    handles = [layer.register_forward_hook(hook) for layer in decoder_layers(model)]
    try:
        if with_logits:
            logits = base(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1
            ).logits[:, -1, :]
        else:
            base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = None
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured), logits


def _token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    if isinstance(prompts, str):
        raise TypeError("expected a list of prompts, got a single string; wrap it in a list")
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def count_truncated(tokenizer, prompts: Sequence[str], max_length: int) -> int:
    """How many prompts are longer than ``max_length`` tokens (and would be cut)."""
    check_max_length(max_length)
    return sum(len(ids) > max_length for ids in _token_ids(tokenizer, prompts))


def _encode(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per prompt, cut from the left if longer than ``max_length``.

    Cutting from the left keeps the end of the prompt (the choices and ``Answer:``), which
    is where the chips read.
    """
    check_max_length(max_length)
    ids = _token_ids(tokenizer, prompts)
    cut = sum(len(row) > max_length for row in ids)
    if cut:
        warnings.warn(
            f"{cut} of {len(ids)} prompts are longer than max_length={max_length} tokens and are cut "
            "from the left; raise max_length to keep them whole",
            stacklevel=3,
        )
    return [row[-max_length:] for row in ids]


def extract_features(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    label_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    progress: bool = True,
    desc: str = "forward passes",
) -> Features:
    """One frozen forward per prompt: every block's output at the last token (+ label scores).

    Prompts are batched by length (less padding, same results) and returned in input order.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    if tokenizer.padding_side != "left":
        raise ValueError("chips read the last position of each row: set tokenizer.padding_side = 'left'")
    encoded = _encode(tokenizer, prompts, max_length)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    states = [None] * len(encoded)
    scores = [None] * len(encoded)
    batches = range(0, len(order), batch_size)
    for start in progress_bar(batches, desc=desc, disable=not progress):
        rows = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
        hidden, logits = _last_token_forward(
            model, batch["input_ids"], batch["attention_mask"], with_logits=label_ids is not None
        )
        for j, i in enumerate(rows):
            states[i] = hidden[:, j]
            if logits is not None:
                scores[i] = logits[j, list(label_ids)]
    return Features(
        torch.stack(states, dim=1),
        torch.stack(scores) if label_ids is not None else None,
    )


@torch.no_grad()
def block_influence(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_length: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """ShortGPT's Block Influence of every block: ``1 - cos(block input, block output)``.

    Averaged over every real (non-pad) token of ``prompts``; ``(layers,)``. A block that
    returns its input unchanged scores 0; ShortGPT removes the blocks that score lowest.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    encoded = _encode(tokenizer, prompts, check_max_length(max_length))
    layers = decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask: torch.Tensor | None = None

    def hook_for(index):
        def hook(_module, args, kwargs, output):
            given = args[0] if args else kwargs["hidden_states"]
            returned = output[0] if isinstance(output, tuple) else output
            cosine = F.cosine_similarity(given.float(), returned.float(), dim=-1)  # (batch, tokens)
            total[index] += (cosine * mask).sum().double()
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in progress_bar(range(0, len(encoded), batch_size), desc="block influence", disable=not progress):
            batch = tokenizer.pad({"input_ids": encoded[start : start + batch_size]}, return_tensors="pt")
            mask = batch["attention_mask"].float()
            unwrap(model).base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False)
            count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return (1 - total / count).float()
