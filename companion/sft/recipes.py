"""The chapter's training loop: the same task batches for every recipe, diverse rows on top.

A *recipe* is plain SFT (``ratio=0``), DELIA (``ratio`` self-sampled rows per task row,
trained with cross-entropy on the model's own answers, ``replay="ce"``), or a variant
beyond the paper, *KL replay* (``replay="kl"``): on the diverse rows the loss is
KL(base || tuned) of the next-token distributions along the self-sampled answer, where the
base is the same model with its adapter switched off (PEFT's ``disable_adapter()``), so
replay pulls the model back towards its own *distributions* instead of sharpening them
on one sampled answer.

``plan_batches`` fixes which task rows each step sees from the seed alone, so every recipe
trains on exactly the same task rows the same number of times; DELIA adds its diverse rows
to the same steps (the step's loss is the mean over all its completion tokens, as SFT on
the mixed data would be). Rows are run in micro-batches so memory stays bounded.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from peft import get_peft_model

from ..adapters import _quiet_peft
from ..config import get_settings, seed_everything
from ..progress import progress as progress_bar
from .sampling import cache_rows_to_sft
from .training import SFTRun, check_rows, lora_config

REPLAY_LOSSES = ("ce", "kl")


def encode_row(tokenizer, row: Mapping, max_length: int = 160) -> tuple[list[int], list[int]]:
    """Token ids of a prompt/completion row through the chat template, and labels that are
    -100 on the prompt (the loss falls on the completion and its end-of-turn token only)."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                         return_dict=True)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently with a completion after it; "
                         "completion-only labels need the prompt to be a prefix")
    full = full[:max_length]
    labels = [-100] * min(len(prompt), len(full)) + full[len(prompt):]
    return full, labels


def _cycle(n: int, rng: random.Random) -> Iterator[int]:
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def plan_batches(num_task: int, num_diverse: int, *, steps: int, batch_size: int, ratio: float,
                 seed: int) -> list[tuple[list[int], list[int]]]:
    """Per step, the task row indices and the diverse row indices it trains on.

    Task rows are drawn epoch by epoch (reshuffled each epoch) from a generator seeded by
    ``seed`` alone, so the task side is the same for every ``ratio``; each step adds
    ``round(ratio * batch_size)`` diverse rows, cycling through them the same way.
    """
    if steps < 1 or batch_size < 1 or num_task < 1:
        raise ValueError(f"need steps, batch_size and task rows >= 1 (got {steps}, {batch_size}, {num_task})")
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    per_step = round(ratio * batch_size)
    if per_step and num_diverse < 1:
        raise ValueError(f"ratio {ratio} needs diverse rows; build the self-sampled cache first")
    task = _cycle(num_task, random.Random(f"task-{seed}"))
    diverse = _cycle(max(num_diverse, 1), random.Random(f"diverse-{seed}"))
    return [([next(task) for _ in range(batch_size)], [next(diverse) for _ in range(per_step)])
            for _ in range(steps)]


def _pad(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (tokens, targets) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, : len(targets)] = torch.tensor(targets)
        mask[row, : len(tokens)] = 1
    return ids, labels, mask


def token_losses(model, ids, labels, mask, *, replay: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses on the labelled positions (flat) and their count.

    ``replay="ce"``: cross-entropy of the label tokens. ``replay="kl"``: KL(base || model)
    of the next-token distributions at those positions, the base being ``model`` with its
    adapter switched off (no gradient through it).
    """
    # Logits only where a label is predicted (transformers' boolean ``logits_to_keep``): the
    # output head over a 49k vocabulary is a fifth of a small model's work per position.
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    logits = _kept(model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits)
    if replay == "ce":
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
    elif replay == "kl":
        with torch.no_grad(), model.disable_adapter():
            teacher = _kept(model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits)
        losses = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher.float(), -1),
                          log_target=True, reduction="none").sum(-1)
    else:
        raise ValueError(f"unknown replay loss {replay!r}; known: {', '.join(REPLAY_LOSSES)}")
    return losses, keep.sum()


def _kept(logits: torch.Tensor) -> torch.Tensor:
    """The ``[positions, vocab]`` logits of a boolean ``logits_to_keep`` (some models keep a batch axis)."""
    return logits.reshape(-1, logits.shape[-1])


def train_recipe(model, tokenizer, task_rows: Sequence[Mapping], diverse_rows: Sequence[Mapping] = (), *,
                 ratio: float = 0.0, replay: str = "ce", steps: int = 50, batch_size: int = 8,
                 lr: float = 1e-3, r: int = 8, trainable_tokens: Sequence[int] = (), max_length: int = 160,
                 micro_batch: int = 8, seed: int | None = None, progress: bool = True,
                 on_step: Callable[[int, object], None] | None = None) -> SFTRun:
    """LoRA (and ``trainable_tokens`` rows) trained on a *copy* of ``model`` by one recipe.

    Every step sees ``batch_size`` task rows (``plan_batches``) and, for DELIA/KL replay,
    ``round(ratio * batch_size)`` diverse rows (cache rows or prompt/completion rows).
    AdamW at a constant ``lr``; the step's loss is the mean over all its completion tokens.
    ``SFTRun.losses`` holds the task rows' mean cross-entropy per step. ``on_step(step, model)``
    is called after each optimizer step (e.g. to score the model after its first N task rows).
    """
    if replay not in REPLAY_LOSSES:
        raise ValueError(f"unknown replay loss {replay!r}; known: {', '.join(REPLAY_LOSSES)}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("SFT on chat rows needs a tokenizer with a chat template (smollm2-135m, tiny-llama)")
    diverse_rows = [dict(r) if "prompt" in r else cache_rows_to_sft([r])[0] for r in diverse_rows
                    if "prompt" in r or r["response"].strip()]
    check_rows(task_rows)
    seed = get_settings().seed if seed is None else seed
    seed_everything(seed)
    task = [encode_row(tokenizer, row, max_length) for row in task_rows]
    diverse = [encode_row(tokenizer, row, max_length) for row in diverse_rows]
    plan = plan_batches(len(task), len(diverse), steps=steps, batch_size=batch_size, ratio=ratio, seed=seed)
    with _quiet_peft():
        tuned = get_peft_model(copy.deepcopy(model), lora_config(model, trainable_tokens=trainable_tokens, r=r))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tuned.train()
    losses, tokens, start = [], 0, time.perf_counter()
    bar = progress_bar(plan, desc=f"training ({'task' if not ratio else f'x{ratio:g} {replay}'})",
                       disable=not progress)
    for task_ids, diverse_ids in bar:
        parts = [(task[i], "ce", True) for i in task_ids] + [(diverse[j], replay, False) for j in diverse_ids]
        total = sum(sum(t != -100 for t in labels[1:]) for (_, labels), _, _ in parts)
        task_sum, task_count = 0.0, 0
        for kind in ("task", "diverse"):
            # Rows of similar length share a micro-batch (less padding; the step's loss is the same sum).
            chunk = sorted((p for p in parts if p[2] == (kind == "task")), key=lambda p: len(p[0][0]))
            for begin in range(0, len(chunk), micro_batch):
                micro = chunk[begin:begin + micro_batch]
                ids, labels, mask = _pad([p[0] for p in micro], pad_id)
                per_token, count = token_losses(tuned, ids, labels, mask, replay=micro[0][1])
                (per_token.sum() / total).backward()
                tokens += int(mask.sum())
                if kind == "task":
                    task_sum, task_count = task_sum + float(per_token.detach().sum()), task_count + int(count)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(task_sum / max(task_count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            tuned.eval()
            on_step(len(losses), tuned)
            tuned.train()
    tuned.eval()
    return SFTRun(model=tuned, steps=len(plan), seconds=time.perf_counter() - start, tokens=tokens, losses=losses)
