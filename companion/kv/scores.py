"""Scoring a compressed model against the full one: agreement, KL and its distribution, intervals.

``compare`` scores one prompt: top-1 and top-5 agreement with the full model's continuation,
KL(full || compressed) per token, and the first disagreement. ``FidelityResult`` gathers a
method's prompts into the figures llama.cpp's ``perplexity --kl-divergence`` reports (mean KL
with its 90th/99th percentiles over tokens, top-1/top-5 agreement), each mean with a 95%
bootstrap interval over prompts (``companion.stats``), plus the task metric: needle accuracy.

``sequence_kl`` is the same teacher-forced KL between two *models* along given token
sequences (chapter 3 uses it for forgetting: KL(base || tuned) along the base model's answers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..stats import estimate

DEGENERATE = 0.5  # a continuation whose repetition rate exceeds this is called degenerate


def kl_per_token(teacher_logits: torch.Tensor, logits: torch.Tensor, logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || model) at each position, ``(n,)`` in float64 (``logprobs``: the model's
    log-softmax, if already computed).

    Float64: in float32 the rounding (~1e-7 per token) would swamp the tiny divergence of,
    say, an 8-bit cache.
    """
    teacher = teacher_logits.double().log_softmax(-1)
    logprobs = logits.double().log_softmax(-1) if logprobs is None else logprobs
    return (teacher.exp() * (teacher - logprobs)).sum(-1).clamp(min=0.0)


def compare(logits: torch.Tensor, teacher_logits: torch.Tensor, continuation: torch.Tensor) -> dict:
    """Agreement of ``logits`` (n, V) with the continuation and the teacher's distributions."""
    logprobs = logits.double().log_softmax(-1)
    top1 = logprobs.argmax(-1) == continuation
    top5 = (logprobs.topk(5, dim=-1).indices == continuation[:, None]).any(-1)
    kl = kl_per_token(teacher_logits, logits, logprobs)
    misses = (~top1).nonzero()
    return {
        "tokens": len(continuation),
        "top1_hits": int(top1.sum()),
        "top5_hits": int(top5.sum()),
        "kl_sum": float(kl.sum()),
        "kl_tokens": kl.tolist(),
        "first_disagreement": int(misses[0]) if len(misses) else None,
    }


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` of ``values`` (linear interpolation, as NumPy)."""
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.size == 0:
        raise ValueError("no values to take percentiles of")
    return {f"p{q:g}": float(np.percentile(array, q)) for q in qs}


def repetition_rate(tokens, n: int = 4) -> float:
    """Share of a sequence's ``n``-grams that already occurred earlier in it (0 = no repeat).

    "I am a man, I am a man, ..." scores close to 1; ordinary prose close to 0.
    """
    tokens = [int(t) for t in tokens]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class FidelityResult:
    """A method's fidelity over a batch of prompts (every prompt has the same number of tokens)."""

    method: str
    config: dict
    top1: float
    top5: float
    kl: float
    first_disagreement: float  # mean over prompts; a prompt without any counts len(g)
    tokens: int
    cache_bytes: float  # mean compressed prompt cache
    full_cache_bytes: float  # mean uncompressed prompt cache
    seconds: float
    path: str  # "one pass", "token by token" or "reference"
    per_prompt: list[dict] = field(default_factory=list, repr=False)

    @property
    def cache_fraction(self) -> float:
        return self.cache_bytes / self.full_cache_bytes

    def estimate(self, metric: str, prompts: list[dict] | None = None):
        """Mean of ``top1``, ``top5`` or ``kl`` over prompts with its 95% bootstrap interval."""
        prompts = self.per_prompt if prompts is None else prompts
        key = {"top1": "top1_hits", "top5": "top5_hits", "kl": "kl_sum"}[metric]
        return estimate([p[key] / p["tokens"] for p in prompts])

    def needle_accuracy(self):
        """Share of needle prompts (those the full model answers) whose answer survives, or None."""
        scored = [p["needle_correct"] for p in self.per_prompt if p.get("needle_correct") is not None]
        return estimate([float(c) for c in scored]) if scored else None

    def as_row(self) -> dict:
        """A results row: the means, their intervals, KL percentiles and a compact per-prompt list."""
        row = asdict(self)
        row.pop("per_prompt")
        row["cache_fraction"] = self.cache_fraction
        row["n_prompts"] = len(self.per_prompt)
        for metric in ("top1", "top5", "kl"):
            interval = self.estimate(metric)
            row[f"{metric}_low"], row[f"{metric}_high"] = interval.low, interval.high
        tokens_kl = [kl for p in self.per_prompt for kl in p["kl_tokens"]]
        row.update({f"kl_{name}": value for name, value in percentiles(tokens_kl, (90, 99)).items()})
        fluent = [p for p in self.per_prompt if not p.get("degenerate")]
        row["degenerate"] = len(self.per_prompt) - len(fluent)
        row["top1_fluent"] = self.estimate("top1", fluent).mean if fluent else None
        needle = self.needle_accuracy()
        row["needle_accuracy"] = needle.mean if needle else None
        row["needle_n"] = needle.n if needle else 0
        row["needle_accuracy_low"] = needle.low if needle else None
        row["needle_accuracy_high"] = needle.high if needle else None
        row["per_prompt"] = [
            {"kind": p.get("kind"), "depth": p.get("depth"), "top1": p["top1_hits"] / p["tokens"],
             "kl": p["kl_sum"] / p["tokens"], "first_disagreement": p["first_disagreement"],
             "degenerate": p.get("degenerate"), "needle_correct": p.get("needle_correct")}
            for p in self.per_prompt
        ]
        return row


@torch.no_grad()
def sequence_kl(reference_model, model, sequences, starts=None) -> list[float]:
    """Mean KL(reference || model) of the next-token distributions along each token sequence.

    ``sequences``: 1-D token-id tensors (or lists); ``starts``: per sequence, the first
    position whose *prediction* counts (e.g. the prompt length, to score only the answer;
    default 1, every token after the first). Both models see the same tokens (teacher
    forcing), one forward pass each. Returns one token-averaged KL per sequence, so the caller
    can put an interval on it (``companion.stats.estimate``).
    """
    sequences = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    starts = [1] * len(sequences) if starts is None else list(starts)
    if len(starts) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
    values = []
    for ids, start in zip(sequences, starts):
        if not 1 <= start < len(ids):
            raise ValueError(f"start {start} leaves no token to score in a sequence of {len(ids)} tokens")
        teacher = reference_model(input_ids=ids[None]).logits[0, start - 1 : -1]
        student = model(input_ids=ids[None]).logits[0, start - 1 : -1]
        values.append(float(kl_per_token(teacher, student).mean()))
    return values
