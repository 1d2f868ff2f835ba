"""Measuring chips: several seeds and their controls, latency, the headline figures, plots.

``seed_runs`` trains chips with several seeds (and, with ``shuffle_labels=True``, the
shuffled-label control) on cached features; ``headline`` turns the runs and measured
latencies into the chapter's headline figures, each with a 95% interval.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import stats
from .features import Features, extract_features
from .model import ChippedModel
from .probes import choose_layer, tolerance_value
from .tasks import label_token_ids


@dataclass
class SeedRuns:
    """Chips trained with several seeds on the same cached features.

    ``correct[split]``: ``(seeds, layers, examples)`` booleans, each chip's answers. The
    layer is chosen on the validation accuracy averaged over seeds (``layer``).
    """

    runs: list[ChippedModel]
    correct: dict[str, torch.Tensor]
    layer: int

    @property
    def num_layers(self) -> int:
        return self.runs[0].num_layers

    def curve(self, split: str) -> torch.Tensor:
        """Accuracy per layer for each seed: ``(seeds, layers)``."""
        return self.correct[split].float().mean(dim=2)

    def per_example(self, split: str, layer: int) -> np.ndarray:
        """Each example's score at one layer: the fraction of seeds whose chip gets it right."""
        return self.correct[split][:, layer].float().mean(dim=0).numpy()

    def estimate(self, split: str, layer: int) -> stats.Estimate:
        """Accuracy at one layer with a bootstrap 95% interval over the examples (seeds averaged)."""
        return stats.estimate(self.per_example(split, layer))

    def best_layer(self, split: str) -> int:
        """The layer with the best seed-averaged accuracy on ``split`` (the lowest on ties)."""
        return choose_layer(self.curve(split).mean(dim=0).tolist())


def seed_runs(model, tokenizer, task, features: Mapping[str, Features], targets: Mapping[str, torch.Tensor], *,
              seeds: Sequence[int] = (0, 1, 2), kind: str = "linear", shuffle_labels: bool = False,
              tolerance: float | str = "1se", max_length: int = 256, **fit_kwargs) -> SeedRuns:
    """Train one chip set per seed on ``features["train"]``; score every split; choose the layer.

    The layer is the shallowest whose seed-averaged validation accuracy is within
    ``tolerance`` of the best (``"1se"``: one standard error). Nothing reads the test split.
    ``max_length`` is kept by the chips (their pruned model cuts longer prompts).
    """
    if len(seeds) == 0:
        raise ValueError("give at least one seed")
    fit_kwargs.setdefault("progress", False)
    runs, correct = [], {split: [] for split in features}
    for seed in seeds:
        chipped = ChippedModel(model, tokenizer, task, kind=kind, seed=seed, max_length=max_length)
        chipped.fit(features["train"], targets["train"], shuffle_labels=shuffle_labels, **fit_kwargs)
        for split, data in features.items():
            correct[split].append(chipped.layer_correct(data, targets[split]))
        runs.append(chipped)
    correct = {split: torch.stack(values) for split, values in correct.items()}
    validation = correct["validation"].float().mean(dim=(0, 2)).tolist()
    layer = choose_layer(validation, tolerance_value(tolerance, max(validation), correct["validation"].shape[2]))
    for chipped in runs:
        chipped.validation_accuracy, chipped.validation_count = validation, correct["validation"].shape[2]
        chipped.layer = layer
    return SeedRuns(runs, correct, layer)


def majority_share(targets: torch.Tensor) -> float:
    """Share of the most frequent class: the accuracy of always answering it."""
    targets = torch.as_tensor(targets)
    return targets.bincount().max().item() / len(targets)


def ratio_estimate(numerator: Sequence[float], denominator: Sequence[float], *, seed: int = 0,
                   samples: int = stats.BOOTSTRAP_SAMPLES) -> stats.Estimate:
    """``mean(numerator) / mean(denominator)`` over the same items, with a paired bootstrap 95% interval."""
    a, b = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two equal, non-empty lists of per-item values, got {a.shape} and {b.shape}")
    if b.mean() == 0:
        raise ValueError("the denominator's mean is 0: the ratio is undefined")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.size, size=(samples, a.size))
    sums = b[picks].sum(axis=1)
    ratios = a[picks].sum(axis=1)[sums > 0] / sums[sums > 0]
    low, high = np.quantile(ratios, [(1 - stats.CONFIDENCE) / 2, (1 + stats.CONFIDENCE) / 2])
    return stats.Estimate(float(a.mean() / b.mean()), float(low), float(high), int(a.size), float(ratios.std()))


@dataclass
class Headline:
    """One task's Chip-Tuning headline (every figure with a 95% interval)."""

    task: str
    num_layers: int
    best_layer: int
    best: stats.Estimate  # best seed-averaged chip on test (chosen on test: the ceiling)
    layer: int  # chosen on validation
    chosen: stats.Estimate  # test accuracy at that layer
    retained: stats.Estimate  # chosen / best
    speedup: stats.Estimate | None  # full / pruned seconds per example
    control: stats.Estimate | None  # shuffled-label chips at the chosen layer
    majority: float

    @property
    def pruned_share(self) -> float:
        """Fraction of the blocks removed when the model keeps blocks 0..layer."""
        return 1 - (self.layer + 1) / self.num_layers

    def row(self) -> dict:
        return {
            "task": self.task,
            "best chip (layer)": f"{self.best.format(3)} ({self.best_layer})",
            "chosen on validation (layer)": f"{self.chosen.format(3)} ({self.layer})",
            "layers pruned": f"{self.pruned_share:.0%}",
            "best accuracy retained": self.retained.format(1, percent=True),
            "speed-up (full / pruned)": self.speedup.format(2) if self.speedup else "-",
            "shuffled-label control": self.control.format(3) if self.control else "-",
            "majority class": f"{self.majority:.3f}",
        }


def headline(name: str, runs: SeedRuns, *, control: SeedRuns | None = None, targets: torch.Tensor | None = None,
             latency: tuple[Sequence[float], Sequence[float]] | None = None) -> Headline:
    """The headline figures of one task from its seed runs on the test split.

    ``latency``: per-example seconds of the full model and of the pruned one, same prompts.
    """
    best_layer = runs.best_layer("test")
    chosen, best = runs.per_example("test", runs.layer), runs.per_example("test", best_layer)
    speedup = None
    if latency is not None:
        full, pruned = (np.asarray(values, dtype=float) for values in latency)
        speedup = stats.estimate(full / pruned)
    return Headline(
        task=name, num_layers=runs.num_layers, best_layer=best_layer, best=stats.estimate(best),
        layer=runs.layer, chosen=stats.estimate(chosen), retained=ratio_estimate(chosen, best), speedup=speedup,
        control=control.estimate("test", runs.layer) if control is not None else None,
        majority=majority_share(targets) if targets is not None else float("nan"),
    )


# --- timing ---------------------------------------------------------------------------------


def timed_predictions(predict: Callable[[list[str]], list], prompts: Sequence[str], warmup: int = 1,
                      *, per_example: bool = False):
    """``predict([prompt])`` one prompt at a time: ``(predictions, median seconds per prompt)``.

    With ``per_example=True`` the second value is the list of every prompt's seconds.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to time")
    for prompt in list(prompts)[:warmup]:
        predict([prompt])
    predictions, times = [], []
    for prompt in prompts:
        start = time.perf_counter()
        predictions += predict([prompt])
        times.append(time.perf_counter() - start)
    return predictions, (times if per_example else statistics.median(times))


def full_model_predict(chipped: ChippedModel) -> Callable[[list[str]], list[str]]:
    """The full model answering by next-token scoring (what pruning is compared against)."""
    ids = label_token_ids(chipped.tokenizer, chipped.task)

    def predict(prompts):
        scores = extract_features(
            chipped.model, chipped.tokenizer, prompts, label_ids=ids, max_length=chipped.max_length,
            progress=False,
        ).label_scores
        return chipped.task.decode(scores.argmax(-1))

    return predict


# --- plots ----------------------------------------------------------------------------------


def plot_layer_accuracies(curves: Mapping[str, Sequence[float] | torch.Tensor], *, ax=None, title: str | None = None,
                          baseline: float | None = None, chance: float | None = None,
                          majority: float | None = None, chosen: Mapping[str, int] | None = None):
    """Accuracy per layer, one line per curve; dashed lines for the baseline, chance, majority class.

    A curve given as a ``(seeds, layers)`` tensor is drawn as its mean with a band from
    the lowest to the highest seed. ``chosen`` marks a layer on a curve.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in curves.items():
        values = torch.as_tensor(values, dtype=torch.float32)
        mean = values.mean(dim=0) if values.dim() == 2 else values
        (line,) = ax.plot(range(len(mean)), mean.tolist(), label=label, linewidth=1.5)
        if values.dim() == 2 and values.shape[0] > 1:
            ax.fill_between(range(len(mean)), values.min(dim=0).values.tolist(), values.max(dim=0).values.tolist(),
                            color=line.get_color(), alpha=0.2, linewidth=0)
        if chosen and label in chosen:
            ax.plot([chosen[label]], [mean[chosen[label]].item()], "o", color=line.get_color(), markersize=7)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="zero-shot full model")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    if majority is not None:
        ax.axhline(majority, color="brown", linestyle="-.", linewidth=1, label="majority class")
    ax.set_xlabel("layer (chip reads this block's output)")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def measure_task(model, tokenizer, task, prompts: Mapping[str, Sequence[str]], targets: Mapping[str, torch.Tensor],
                 *, seeds: Sequence[int] = (0, 1, 2), num_timed: int = 16, max_length: int = 256,
                 **fit_kwargs) -> tuple[Headline, SeedRuns, SeedRuns]:
    """The whole chapter-2 measurement of one task, as ``benchmarks/chips.py`` runs it.

    Features of every split (one forward each), chips and shuffled-label controls over
    ``seeds``, the layer chosen on validation, the pruned model timed against the full model
    on ``num_timed`` test prompts (one at a time). Returns ``(headline, runs, controls)``.
    """
    reader = ChippedModel(model, tokenizer, task, max_length=max_length)
    features = {split: reader.features(p, progress=False, label_scores=False) for split, p in prompts.items()}
    runs = seed_runs(model, tokenizer, task, features, targets, seeds=seeds, max_length=max_length, **fit_kwargs)
    controls = seed_runs(model, tokenizer, task, features, targets, seeds=seeds, shuffle_labels=True,
                         max_length=max_length, **fit_kwargs)
    chosen = runs.runs[0]
    timed = list(prompts["test"])[:num_timed]
    _, full_seconds = timed_predictions(full_model_predict(chosen), timed, per_example=True)
    _, pruned_seconds = timed_predictions(chosen.prune().predict, timed, per_example=True)
    result = headline(task.name, runs, control=controls, targets=targets["test"],
                      latency=(full_seconds, pruned_seconds))
    return result, runs, controls
