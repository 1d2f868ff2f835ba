"""Chips (probes on a layer's hidden state), their registry and their training.

A chip kind is a factory in ``CHIP_FACTORIES``: ``factory(hidden_size, num_classes, **knobs)``
returns an ``nn.Module`` mapping ``(batch, hidden_size)`` to ``(batch, num_classes)``
logits. Its knobs (keyword arguments with defaults) are saved with the chip. Adding a kind
is one function and one registry line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import get_settings
from ..progress import progress as progress_bar
from .tasks import TaskError

DEFAULT_MLP_HIDDEN = 256
ONE_STANDARD_ERROR = "1se"


def linear_chip(hidden_size: int, num_classes: int) -> nn.Module:
    """``Linear(d, C)``: the paper's linear chip."""
    return nn.Linear(hidden_size, num_classes)


def mlp_chip(hidden_size: int, num_classes: int, hidden: int = DEFAULT_MLP_HIDDEN) -> nn.Module:
    """``Linear(d, h) -> ReLU -> Linear(h, C)``: the paper's two-layer chip."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"an MLP chip's hidden size must be a whole number >= 1, got {hidden!r}")
    return nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


CHIP_FACTORIES: dict[str, Callable[..., nn.Module]] = {"linear": linear_chip, "mlp": mlp_chip}
CHIP_KINDS = tuple(CHIP_FACTORIES)


def chip_knobs(kind: str, **knobs) -> dict:
    """A kind's knobs with their defaults filled in (unknown kinds or knobs are refused)."""
    if kind not in CHIP_FACTORIES:
        raise ValueError(f"unknown chip kind {kind!r}; known: {', '.join(CHIP_FACTORIES)}")
    parameters = list(inspect.signature(CHIP_FACTORIES[kind]).parameters.values())[2:]
    known = {p.name: p.default for p in parameters}
    unknown = sorted(set(knobs) - set(known))
    if unknown:
        raise ValueError(f"{kind} chips have no knob {', '.join(map(repr, unknown))}; "
                         f"their knobs: {', '.join(known) or 'none'}")
    return {**known, **knobs}


def make_chip(kind: str, hidden_size: int, num_classes: int, **knobs) -> nn.Module:
    """One chip of a registered kind."""
    knobs = chip_knobs(kind, **knobs)  # checks the kind first
    return CHIP_FACTORIES[kind](hidden_size, num_classes, **knobs)


class ChipSet(nn.Module):
    """One chip per layer; ``forward(states (L, B, d)) -> logits (L, B, C)``."""

    def __init__(self, num_layers: int, hidden_size: int, num_classes: int, kind: str = "linear",
                 seed: int | None = None, **knobs):
        super().__init__()
        self.kind, self.knobs = kind, chip_knobs(kind, **knobs)
        self.hidden_size, self.num_classes = hidden_size, num_classes
        seed = get_settings().seed if seed is None else seed
        # Initialise from a private generator state so that the same seed gives the same
        # chips whatever the caller did with the global generator before.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.chips = nn.ModuleList(
                make_chip(kind, hidden_size, num_classes, **self.knobs) for _ in range(num_layers)
            )

    def __len__(self) -> int:
        return len(self.chips)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.dim() != 3 or states.shape[0] != len(self) or states.shape[2] != self.hidden_size:
            raise ValueError(
                f"expected hidden states of shape (layers={len(self)}, batch, hidden={self.hidden_size}), "
                f"got {tuple(states.shape)}"
            )
        return torch.stack([chip(state) for chip, state in zip(self.chips, states)])


def shuffled_targets(targets: torch.Tensor, seed: int) -> torch.Tensor:
    """The same labels in a seeded random order: the classes keep their counts, lose their meaning.

    Chips trained on these learn noise; their accuracy on held-out data shows how much a
    probe gets from its own capacity and the class balance alone (the control).
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    return targets[order]


def train_chips(
    chips: ChipSet,
    states_for: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    *,
    epochs: int | None,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
    num_steps: int | None = None,
    progress: bool = True,
) -> list[float]:
    """Train every layer's chip at once: sum of the chips' cross-entropies, AdamW.

    ``states_for(indices)`` gives the ``(layers, batch, d)`` hidden states of those
    examples: a slice of cached features, or a fresh forward pass. The batches come from a
    seeded generator, so both give the same chips. Give either ``epochs`` or ``num_steps``.
    Returns the mean loss per chip, per epoch. The chips are back in eval mode afterwards,
    even when training fails.
    """
    if (epochs is None) == (num_steps is None):
        raise ValueError("give either epochs or num_steps")
    if batch_size < 1 or (epochs is not None and epochs < 1) or (num_steps is not None and num_steps < 1):
        raise ValueError(
            f"epochs, num_steps and batch_size must be at least 1, got {epochs}, {num_steps}, {batch_size}"
        )
    targets = torch.as_tensor(targets, dtype=torch.long)
    batches_per_epoch = -(-len(targets) // batch_size)
    if num_steps is not None:
        epochs = -(-num_steps // batches_per_epoch)
    steps_left = num_steps if num_steps is not None else epochs * batches_per_epoch
    if targets.numel() and (targets.min() < 0 or targets.max() >= chips.num_classes):
        raise TaskError(f"targets must be class indices in [0, {chips.num_classes}), got {targets.unique().tolist()}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(chips.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    chips.train()
    try:
        bar = progress_bar(range(epochs), desc=f"training {len(chips)} {chips.kind} chips", disable=not progress)
        for _ in bar:
            order = torch.randperm(len(targets), generator=generator)
            total, batches = 0.0, 0
            for start in range(0, len(order), batch_size):
                if steps_left == 0:
                    break
                steps_left -= 1
                indices = order[start : start + batch_size]
                logits = chips(states_for(indices))  # (L, B, C)
                layers = logits.shape[0]
                per_chip = F.cross_entropy(logits.flatten(0, 1), targets[indices].repeat(layers))
                optimizer.zero_grad()
                (per_chip * layers).backward()  # the sum of the chips' losses
                optimizer.step()
                total += per_chip.item()
                batches += 1
            history.append(total / batches)
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    finally:
        chips.eval()
    return history


# --- choosing a layer -----------------------------------------------------------------------


def standard_error(accuracy: float, count: int) -> float:
    """Binomial standard error of an accuracy measured on ``count`` examples."""
    if count < 1:
        raise ValueError(f"need at least one example, got {count}")
    return (accuracy * (1 - accuracy) / count) ** 0.5


def choose_layer(validation_accuracy: Sequence[float], tolerance: float = 0.0) -> int:
    """The lowest layer whose validation accuracy is within ``tolerance`` of the best one.

    With ``tolerance=0`` this is the best chip (the lowest one on ties, to prune most). A
    tolerance of one standard error of the best accuracy is the "one-standard-error rule".
    """
    if len(validation_accuracy) == 0:
        raise ValueError("no validation accuracies given")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best = max(validation_accuracy)
    return next(i for i, acc in enumerate(validation_accuracy) if acc >= best - tolerance - 1e-12)


def tolerance_value(tolerance: float | str, best: float, count: int) -> float:
    """A tolerance as a number: ``"1se"`` is one standard error of ``best`` on ``count`` examples."""
    if tolerance == ONE_STANDARD_ERROR:
        return standard_error(best, count)
    if isinstance(tolerance, str):
        raise ValueError(f"tolerance must be a number or {ONE_STANDARD_ERROR!r}, got {tolerance!r}")  # noqa: TRY004 - a wrong spelling, not a wrong type
    return tolerance


def accuracy(predicted: Sequence, gold: Sequence) -> float:
    """Fraction of predictions equal to the gold labels."""
    if len(predicted) != len(gold) or len(gold) == 0:
        raise ValueError(f"need as many predictions as gold labels (got {len(predicted)} and {len(gold)})")
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)
