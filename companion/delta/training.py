"""Training a delta: ``(prompt, target)`` pairs, loss on the target tokens only, a plain CPU loop."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import DataCollatorForSeq2Seq

from ..config import seed_everything
from ..models import padding_side
from ..progress import progress

def encode_pair(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """Token ids of ``prompt + target + eos`` with labels -100 on the prompt.

    If the whole does not fit in ``max_length``, the prompt loses tokens from its start
    (the answer is what is learnt, so it is kept).
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not target_ids[:-1]:
        raise ValueError(f"empty target for prompt {prompt[:60]!r}")
    target_ids = target_ids[: max_length - 1]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(target_ids))):]
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
        "labels": [-100] * len(prompt_ids) + target_ids,
    }


def train(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    num_steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int | None = None,
    desc: str = "train",
) -> list[float]:
    """Train the trainable parameters of ``model`` on ``(prompt, target)`` pairs; losses per step.

    The loss is the model's own causal-LM loss on the target tokens (prompt and padding
    are labelled -100). Batches are drawn from a seeded shuffle of the pairs, cycling
    when the steps outnumber them. A short explicit loop rather than ``transformers.Trainer``:
    for a few dozen CPU steps the Trainer's logging, checkpointing and accelerate set-up
    cost more than the loop they replace, and this loop is what the chapter explains.
    """
    if num_steps < 1 or batch_size < 1:
        raise ValueError("num_steps and batch_size must be at least 1")
    if not pairs:
        raise ValueError("no training pairs")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call companion.delta.attach first")
    seed = seed_everything(seed)
    order_rng = random.Random(seed)
    encoded = [encode_pair(tokenizer, p, t, max_length) for p, t in pairs]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses: list[float] = []
    order: list[int] = []
    model.train()
    # training rows: real tokens first, then padding
    with padding_side(tokenizer, "right"), progress(total=num_steps, desc=desc) as bar:
        try:
            for _ in range(num_steps):
                if len(order) < batch_size:
                    fresh = list(range(len(encoded)))
                    order_rng.shuffle(fresh)
                    order += fresh
                picked, order = order[:batch_size], order[batch_size:]
                batch = collator([encoded[i] for i in picked])
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
        finally:
            model.eval()
    return losses


def training_tokens(tokenizer, pairs: Sequence[tuple[str, str]], *, num_steps: int, batch_size: int,
                    max_length: int) -> int:
    """Approximate number of real tokens ``train`` processes (mean pair length x rows seen)."""
    lengths = [len(encode_pair(tokenizer, p, t, max_length)["input_ids"]) for p, t in pairs]
    return round(sum(lengths) / len(lengths) * num_steps * batch_size)
