"""Chip-tuning: classify from a frozen LM's intermediate layers, then prune the layers above.

Chip-Tuning ("Classify Before Language Models Say", arXiv 2410.06541) attaches a tiny probe,
a *chip*, to the hidden state of every layer of a frozen causal LM at the last prompt token:
a linear chip ``Linear(d, C)`` or an MLP chip ``Linear(d, h) -> ReLU -> Linear(h, C)``. All
chips train together from the same frozen forward pass (sum of cross-entropies, AdamW). The
best chip picks a layer; every block above it is cut off, so the model answers the task with
a fraction of its layers.

The pieces, in the order a chapter uses them:

- ``Task`` / ``load_tasks``: task definitions from YAML in the reference format
  ``task_name: [label0, label1, ...]`` (``data/tasks/chips.yaml``).
- ``format_prompts`` / ``row_targets``: dataset rows (multiple-choice or classification
  schema of ``companion.data``) to prompts and label indices.
- ``ChippedModel``: wraps any causal LM the ``companion.arch`` adapter knows (OPT, Llama,
  PEFT-wrapped), reads every block's output at the last non-pad token (``features``: one
  forward per example, cached), trains all chips (``fit``), chooses the layer on a held-out
  validation split (``choose_layer``) and saves/loads the chips.
- ``PrunedChipModel`` (``ChippedModel.prune``): a real copy of the model with only the blocks
  up to the chosen layer, plus that layer's chip: ``predict(texts) -> labels``.
- A command line: ``python -m companion.chips train|evaluate|predict ...``.

Unlike the reference code, which drew its "validation" examples from the evaluation split,
the layer is chosen here on a validation split that shares no example with the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from .arch import decoder_layers, hidden_size, keep_first_layers, num_layers, unwrap
from .config import DATA_DIR, get_settings
from .models import parameter_count

TASKS_FILE = DATA_DIR / "tasks" / "chips.yaml"
CHIP_KINDS = ("linear", "mlp")
DEFAULT_MLP_HIDDEN = 256
CHIPS_FORMAT = "companion.chips/1"
WEIGHTS_FILE = "chips.safetensors"
META_FILE = "chips.json"


class TaskError(ValueError):
    """A task definition or a label is wrong; the message says what to fix."""


# --- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A classification task: a name and its label words, in class-index order."""

    name: str
    labels: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def index(self, label: str | int) -> int:
        """The class index of a label word (or of an index, checked to be in range)."""
        if isinstance(label, bool):
            raise TaskError(f"label {label!r} is a boolean; task {self.name!r} has labels {list(self.labels)}")
        if isinstance(label, int):
            if 0 <= label < self.num_classes:
                return label
            raise TaskError(
                f"label index {label} is out of range for task {self.name!r}, "
                f"which has {self.num_classes} labels {list(self.labels)}"
            )
        try:
            return self.labels.index(str(label))
        except ValueError:
            raise TaskError(
                f"label {label!r} is not in task {self.name!r} (labels: {', '.join(self.labels)}); "
                f"fix the data or the task's label list in {TASKS_FILE.name}"
            ) from None

    def encode(self, labels: Iterable[str | int]) -> torch.Tensor:
        """Label words (or indices) -> a LongTensor of class indices."""
        return torch.tensor([self.index(label) for label in labels], dtype=torch.long)

    def decode(self, indices: Iterable[int] | torch.Tensor) -> list[str]:
        return [self.labels[int(i)] for i in indices]


def parse_tasks(text: str, source: str = "<string>") -> dict[str, Task]:
    """Parse task definitions in the reference format ``task_name: [label0, label1, ...]``."""
    hint = "expected one line per task, like `MMLU: [A, B, C, D]`"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TaskError(f"{source}: not valid YAML ({error}); {hint}") from None
    if not isinstance(data, dict) or not data:
        raise TaskError(f"{source}: expected a mapping of task names to label lists; {hint}")
    tasks = {}
    for name, labels in data.items():
        if not isinstance(name, str) or not name.strip():
            raise TaskError(f"{source}: task name {name!r} must be a non-empty string; {hint}")
        if not isinstance(labels, list) or len(labels) < 2:
            raise TaskError(
                f"{source}: task {name!r} needs a list of at least two labels, got {labels!r}; {hint}"
            )
        words = []
        for label in labels:
            if isinstance(label, bool):
                # YAML 1.1 reads yes/no/on/off as booleans: the original spelling is lost.
                raise TaskError(
                    f"{source}: in task {name!r}, YAML read a label as the boolean {label}; "
                    "quote it (e.g. 'yes', 'no')"
                )
            if not isinstance(label, (str, int, float)) or str(label).strip() == "":
                raise TaskError(f"{source}: in task {name!r}, label {label!r} must be a non-empty word")
            words.append(str(label))
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise TaskError(f"{source}: task {name!r} lists labels more than once: {duplicates}")
        tasks[name] = Task(name, tuple(words))
    return tasks


def load_tasks(path: str | Path | None = None) -> dict[str, Task]:
    """Read task definitions from a YAML file (default: ``data/tasks/chips.yaml``)."""
    path = Path(path) if path is not None else TASKS_FILE
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; pass the path of a YAML file of tasks")
    return parse_tasks(path.read_text(encoding="utf-8"), source=str(path))


def get_task(name: str, path: str | Path | None = None) -> Task:
    """One task by name (case-insensitive if the exact name is not found)."""
    tasks = load_tasks(path)
    if name in tasks:
        return tasks[name]
    folded = {key.lower(): task for key, task in tasks.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    raise TaskError(f"unknown task {name!r}; known: {', '.join(tasks)} (from {path or TASKS_FILE})")


# --- prompts --------------------------------------------------------------------------------


def input_kind(row: Mapping) -> str:
    """Which prompt a dataset row gets: ``multiple_choice`` or ``classification``."""
    if "choices" in row and "question" in row:
        return "multiple_choice"
    if "text" in row:
        return "classification"
    raise TaskError(
        f"cannot build a prompt from a row with fields {sorted(row)}; expected the "
        "multiple-choice schema (question, choices, label) or the classification one (text, label)"
    )


def format_prompt(row: Mapping, task: Task) -> str:
    """The prompt for one row; it ends where the answer (a label word) would follow."""
    kind = input_kind(row)
    if kind == "multiple_choice":
        choices = list(row["choices"])
        if len(choices) != task.num_classes:
            raise TaskError(
                f"row {row.get('id', '?')} has {len(choices)} choices but task {task.name!r} "
                f"has {task.num_classes} labels {list(task.labels)}"
            )
        lines = [f"Question: {row['question'].strip()}"]
        lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(task.labels, choices)]
        return "\n".join(lines) + "\nAnswer:"
    options = ", ".join(task.labels[:-1]) + " or " + task.labels[-1]
    return f"Text: {row['text'].strip()}\nQuestion: What is the {task.name} of this text: {options}?\nAnswer:"


def format_prompts(rows: Iterable[Mapping], task: Task) -> list[str]:
    return [format_prompt(row, task) for row in rows]


def row_targets(rows: Iterable[Mapping], task: Task) -> torch.Tensor:
    """The class index of each row (an int label of a multiple-choice row, or a label word)."""
    return task.encode(row["label"] for row in rows)


def label_token_ids(tokenizer, task: Task) -> list[int]:
    """The first token of each label word as it follows ``Answer:`` (with a leading space).

    The baseline scores a label by the model's next-token logit of that token, so the
    labels' first tokens must differ.
    """
    ids = []
    for label in task.labels:
        tokens = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise TaskError(f"label {label!r} of task {task.name!r} tokenizes to nothing")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise TaskError(
            f"labels of task {task.name!r} share a first token ({ids}), so next-token scoring "
            "cannot tell them apart; use label words that start differently"
        )
    return ids


def load_rows(dataset, split: str, size: int | None = None) -> list[dict]:
    """The first ``size`` rows (all if ``None``) of one split of a dataset, as dicts.

    ``dataset`` is a ``companion.data`` name or a ``DatasetDict`` it returned.
    """
    from .data import load_data

    splits = load_data(dataset) if isinstance(dataset, str) else dataset
    if split not in splits:
        raise ValueError(f"dataset has no split {split!r}; splits: {', '.join(splits)}")
    rows = splits[split]
    if size is not None:
        if size < 1:
            raise ValueError(f"sizes must be at least 1, got {size}")
        rows = rows.select(range(min(size, len(rows))))
    return rows.to_list()


# --- reading the layers ---------------------------------------------------------------------


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


@torch.no_grad()
def _last_token_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_logits: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every block's output at each row's last token, and optionally that token's logits.

    Batches are left-padded (``companion.models`` sets this), so the last position is every
    row's last real token. Written here rather than with ``arch.hidden_states_at_last_token``
    because one forward then also gives the model's next-token logits at that position only
    (``logits_to_keep=1``), and without logits the LM head is skipped altogether (it costs
    about a quarter of SmolLM2's forward).
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


def _encode(tokenizer, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per prompt, cut from the left if longer than ``max_length``.

    Cutting from the left keeps the end of the prompt (the choices and ``Answer:``), which
    is where the chips read.
    """
    if isinstance(prompts, str):
        raise TypeError("expected a list of prompts, got a single string; wrap it in a list")
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if any(len(row) > max_length for row in ids):
        # One message per call site (Python shows a repeated warning once), not one per batch.
        warnings.warn(
            f"prompts longer than max_length={max_length} tokens are cut from the left; "
            "raise max_length to keep them whole",
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
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
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


# --- chips ----------------------------------------------------------------------------------


def make_chip(kind: str, hidden_size: int, num_classes: int, hidden: int = DEFAULT_MLP_HIDDEN) -> nn.Module:
    """A linear chip ``Linear(d, C)`` or an MLP chip ``Linear(d, h) -> ReLU -> Linear(h, C)``."""
    if kind == "linear":
        return nn.Linear(hidden_size, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    raise ValueError(f"unknown chip kind {kind!r}; known: {', '.join(CHIP_KINDS)}")


class ChipSet(nn.Module):
    """One chip per layer; ``forward(states (L, B, d)) -> logits (L, B, C)``."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_classes: int,
        kind: str = "linear",
        hidden: int = DEFAULT_MLP_HIDDEN,
        seed: int | None = None,
    ):
        super().__init__()
        self.kind, self.hidden = kind, hidden
        self.hidden_size, self.num_classes = hidden_size, num_classes
        seed = get_settings().seed if seed is None else seed
        # Initialise from a private generator state so that the same seed gives the same
        # chips whatever the caller did with the global generator before.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.chips = nn.ModuleList(
                make_chip(kind, hidden_size, num_classes, hidden) for _ in range(num_layers)
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
    seeded generator, so both give the same chips. Give either ``epochs`` or ``num_steps``
    (optimizer steps, whatever the training-set size: fair when comparing sizes). Returns
    the mean loss per chip, per epoch.
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
    chips.train()
    history = []
    bar = tqdm(range(epochs), desc=f"training {len(chips)} {chips.kind} chips", disable=not progress, leave=False)
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
            loss = per_chip * layers  # the sum of the chips' losses
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += per_chip.item()
            batches += 1
        history.append(total / batches)
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    chips.eval()
    return history


ONE_STANDARD_ERROR = "1se"


def standard_error(accuracy: float, count: int) -> float:
    """Binomial standard error of an accuracy measured on ``count`` examples."""
    if count < 1:
        raise ValueError(f"need at least one example, got {count}")
    return (accuracy * (1 - accuracy) / count) ** 0.5


def choose_layer(validation_accuracy: Sequence[float], tolerance: float = 0.0) -> int:
    """The lowest layer whose validation accuracy is within ``tolerance`` of the best one.

    With ``tolerance=0`` this is the best chip (the lowest one on ties, to prune most). A
    tolerance of one standard error of the best accuracy is the "one-standard-error rule":
    layers that the validation split cannot tell apart from the best count as good, and
    the shallowest of them wins.
    """
    if len(validation_accuracy) == 0:
        raise ValueError("no validation accuracies given")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best = max(validation_accuracy)
    return next(i for i, acc in enumerate(validation_accuracy) if acc >= best - tolerance - 1e-12)


def _tolerance_value(tolerance: float | str, best: float, count: int) -> float:
    if tolerance == ONE_STANDARD_ERROR:
        return standard_error(best, count)
    if isinstance(tolerance, str):
        raise ValueError(f"tolerance must be a number or {ONE_STANDARD_ERROR!r}, got {tolerance!r}")
    return tolerance


def accuracy(predicted: Sequence, gold: Sequence) -> float:
    """Fraction of predictions equal to the gold labels."""
    if len(predicted) != len(gold) or len(gold) == 0:
        raise ValueError(f"need as many predictions as gold labels (got {len(predicted)} and {len(gold)})")
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold)


# --- the chipped model ----------------------------------------------------------------------


class ChippedModel:
    """A frozen causal LM with a chip on every layer, for one classification task.

    ``data`` arguments take either a list of prompts (run through the model) or
    ``Features`` already extracted with ``features(prompts)`` (reused at no cost).
    ``targets`` take label words or class indices.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        task: Task,
        *,
        kind: str = "linear",
        hidden: int = DEFAULT_MLP_HIDDEN,
        seed: int | None = None,
        batch_size: int = 8,
        max_length: int = 256,
    ):
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.batch_size, self.max_length = batch_size, max_length
        self.chips = ChipSet(num_layers(model), hidden_size(model), task.num_classes, kind, hidden, seed)
        self.layer: int | None = None
        self.validation_accuracy: list[float] | None = None
        self.validation_count: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.chips)

    def features(self, prompts: Sequence[str], *, progress: bool = True, desc: str = "forward passes") -> Features:
        """Run the frozen model once per prompt; keep every layer's state and the label scores."""
        return extract_features(
            self.model, self.tokenizer, prompts, label_ids=label_token_ids(self.tokenizer, self.task),
            batch_size=self.batch_size, max_length=self.max_length, progress=progress, desc=desc,
        )

    def _features(self, data: Features | Sequence[str]) -> Features:
        return data if isinstance(data, Features) else self.features(data)

    def _targets(self, targets, count: int) -> torch.Tensor:
        if isinstance(targets, torch.Tensor):
            targets = targets.tolist()
        encoded = self.task.encode(targets)
        if len(encoded) != count:
            raise ValueError(f"got {count} examples but {len(encoded)} targets")
        return encoded

    def fit(
        self,
        data: Features | Sequence[str],
        targets,
        *,
        epochs: int | None = 30,
        lr: float = 1e-3,
        batch_size: int = 32,
        weight_decay: float = 0.01,
        seed: int | None = None,
        num_steps: int | None = None,
        cache: bool = True,
        progress: bool = True,
    ) -> list[float]:
        """Train all chips; returns the mean loss per chip per epoch.

        ``num_steps`` (optimizer steps) replaces ``epochs`` when given: use it to compare
        training-set sizes with the same optimisation effort.

        With ``cache=True`` (the point of chip-tuning) the model runs once per example and
        every epoch reuses the cached states. ``cache=False`` runs the model on every batch
        of every epoch instead; it gives the same chips, only slower (a reference for tests
        and benchmarks; it needs prompts).
        """
        seed = get_settings().seed if seed is None else seed
        if cache:
            features = self._features(data)
            targets = self._targets(targets, len(features))
            states_for = lambda indices: features.states[:, indices]  # noqa: E731
        else:
            if isinstance(data, Features):
                raise ValueError("cache=False runs the model on every batch: pass prompts, not Features")
            prompts = list(data)
            targets = self._targets(targets, len(prompts))

            def states_for(indices):
                return extract_features(
                    self.model, self.tokenizer, [prompts[i] for i in indices],
                    batch_size=len(indices), max_length=self.max_length, progress=False,
                ).states

        return train_chips(
            self.chips, states_for, targets, epochs=None if num_steps is not None else epochs, lr=lr,
            batch_size=batch_size, weight_decay=weight_decay, seed=seed, num_steps=num_steps, progress=progress,
        )

    @torch.no_grad()
    def layer_scores(self, data: Features | Sequence[str]) -> torch.Tensor:
        """Every chip's logits: ``(layers, examples, classes)``."""
        return self.chips(self._features(data).states)

    def layer_accuracies(self, data: Features | Sequence[str], targets) -> list[float]:
        """Accuracy of each layer's chip."""
        scores = self.layer_scores(data)
        targets = self._targets(targets, scores.shape[1])
        return (scores.argmax(-1) == targets).float().mean(dim=1).tolist()

    def choose_layer(self, validation_data, validation_targets, tolerance: float | str = 0.0) -> int:
        """Pick the chip on a held-out validation split (never on the test split).

        ``tolerance``: how much validation accuracy may be given up for a shallower layer;
        ``"1se"`` means one standard error of the best validation accuracy.
        """
        self.validation_accuracy = self.layer_accuracies(validation_data, validation_targets)
        self.validation_count = len(validation_targets)
        tolerance = _tolerance_value(tolerance, max(self.validation_accuracy), self.validation_count)
        self.layer = choose_layer(self.validation_accuracy, tolerance)
        return self.layer

    def _chosen(self, layer: int | None) -> int:
        layer = self.layer if layer is None else layer
        if layer is None:
            raise ValueError("no layer chosen yet: call choose_layer(validation_data, targets) or pass layer=")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        return layer

    def predict(self, data: Features | Sequence[str], layer: int | None = None) -> list[str]:
        """Labels from one layer's chip (the chosen one by default), running the full model."""
        layer = self._chosen(layer)
        return self.task.decode(self.layer_scores(data)[layer].argmax(-1))

    def accuracy(self, data: Features | Sequence[str], targets, layer: int | None = None) -> float:
        """Accuracy of one layer's chip (the chosen one by default)."""
        return self.layer_accuracies(data, targets)[self._chosen(layer)]

    def zero_shot_predict(self, data: Features | Sequence[str]) -> list[str]:
        """The baseline: the full model's answer by next-token scoring of the label words."""
        features = self._features(data)
        if features.label_scores is None:
            raise ValueError("these features hold no label scores; extract them with ChippedModel.features")
        return self.task.decode(features.label_scores.argmax(-1))

    def zero_shot_accuracy(self, data: Features | Sequence[str], targets) -> float:
        features = self._features(data)
        predicted = self.task.encode(self.zero_shot_predict(features))
        return (predicted == self._targets(targets, len(features))).float().mean().item()

    def prune(self, layer: int | None = None) -> PrunedChipModel:
        """A smaller model: the blocks up to ``layer`` (chosen one by default) and its chip."""
        layer = self._chosen(layer)
        return PrunedChipModel(
            keep_first_layers(self.model, layer + 1), self.tokenizer, self.task,
            copy.deepcopy(self.chips.chips[layer]), layer,
            batch_size=self.batch_size, max_length=self.max_length,
        )

    # --- saving -----------------------------------------------------------------------------

    def save(self, folder: str | Path, **extra) -> Path:
        """Write the chips (safetensors) and what they need to be used again (JSON).

        ``extra`` keys (e.g. ``model="smollm2-135m"``, ``dataset="sentiment"``) are kept in
        the JSON, so that the command line can reload the same model and data.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.chips.state_dict().items()}, folder / WEIGHTS_FILE)
        meta = {
            "format": CHIPS_FORMAT,
            "task": self.task.name,
            "labels": list(self.task.labels),
            "kind": self.chips.kind,
            "hidden": self.chips.hidden,
            "num_layers": self.num_layers,
            "hidden_size": self.chips.hidden_size,
            "layer": self.layer,
            "validation_accuracy": self.validation_accuracy,
            "validation_count": self.validation_count,
            "max_length": self.max_length,
            **extra,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return folder

    @staticmethod
    def read_meta(folder: str | Path) -> dict:
        """The JSON saved next to the chips, checked."""
        folder = Path(folder)
        meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"{folder} does not hold saved chips ({META_FILE} and {WEIGHTS_FILE}); "
                "train some with `python -m companion.chips train --out FOLDER`"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != CHIPS_FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {CHIPS_FORMAT!r}")
        return meta

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module, tokenizer) -> ChippedModel:
        """Chips saved with ``save``, attached to ``model`` (the model they were trained on)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = cls.read_meta(folder)
        if (meta["num_layers"], meta["hidden_size"]) != (num_layers(model), hidden_size(model)):
            raise ValueError(
                f"the chips in {folder} were trained on a model with {meta['num_layers']} layers of size "
                f"{meta['hidden_size']}, but this model has {num_layers(model)} of size {hidden_size(model)}; "
                f"load the model they were trained on ({meta.get('model', 'see ' + META_FILE)})"
            )
        task = Task(meta["task"], tuple(meta["labels"]))
        chipped = cls(
            model, tokenizer, task, kind=meta["kind"], hidden=meta["hidden"],
            max_length=meta.get("max_length", 256),
        )
        chipped.chips.load_state_dict(load_file(folder / WEIGHTS_FILE))
        chipped.layer = meta["layer"]
        chipped.validation_accuracy = meta["validation_accuracy"]
        chipped.validation_count = meta.get("validation_count")
        return chipped


def choose_chip(candidates: Sequence[ChippedModel], tolerance: float | str = 0.0) -> ChippedModel:
    """The shallowest chip, over several chip sets, within ``tolerance`` of the best of all.

    ``candidates`` are chip sets for the same task and model (e.g. linear and MLP chips)
    whose ``choose_layer`` already ran on the same validation split. The chip kind is then
    chosen like the layer: on validation accuracy only. Among chips at the winning depth,
    the more accurate one wins. Sets the winner's ``layer`` and returns it.
    """
    if not candidates:
        raise ValueError("no chip sets to choose from")
    if any(c.validation_accuracy is None for c in candidates):
        raise ValueError("call choose_layer(validation_data, targets) on every candidate first")
    best = max(max(c.validation_accuracy) for c in candidates)
    tolerance = _tolerance_value(tolerance, best, candidates[0].validation_count)
    for layer in range(max(c.num_layers for c in candidates)):
        good = [c for c in candidates
                if layer < c.num_layers and c.validation_accuracy[layer] >= best - tolerance - 1e-12]
        if good:
            winner = max(good, key=lambda c: c.validation_accuracy[layer])
            winner.layer = layer
            return winner
    raise AssertionError("unreachable: the best chip is always within the tolerance")


class PrunedChipModel:
    """The blocks up to the chosen layer (a real, smaller copy of the model) and its chip."""

    def __init__(self, model: nn.Module, tokenizer, task: Task, chip: nn.Module, layer: int,
                 *, batch_size: int = 8, max_length: int = 256):
        self.model, self.tokenizer, self.task, self.chip, self.layer = model, tokenizer, task, chip, layer
        self.batch_size, self.max_length = batch_size, max_length
        self.chip.eval()

    @property
    def num_layers(self) -> int:
        return num_layers(self.model)

    def parameter_count(self) -> int:
        """Parameters of the pruned model (embeddings, kept blocks, LM head) plus the chip."""
        return parameter_count(self.model) + parameter_count(self.chip)

    @torch.no_grad()
    def scores(self, prompts: Sequence[str], *, progress: bool = False) -> torch.Tensor:
        """The chip's logits for each prompt: ``(examples, classes)``."""
        states = extract_features(
            self.model, self.tokenizer, prompts, batch_size=self.batch_size,
            max_length=self.max_length, progress=progress,
        ).states
        return self.chip(states[-1])

    def predict(self, prompts: Sequence[str], *, progress: bool = False) -> list[str]:
        """Label words for prompts (built with ``format_prompts``)."""
        return self.task.decode(self.scores(prompts, progress=progress).argmax(-1))


# --- timing ---------------------------------------------------------------------------------


def timed_predictions(predict: Callable[[list[str]], list], prompts: Sequence[str], warmup: int = 1):
    """``predict([prompt])`` one prompt at a time: ``(predictions, median seconds per prompt)``."""
    if len(prompts) == 0:
        raise ValueError("no prompts to time")
    for prompt in list(prompts)[:warmup]:
        predict([prompt])
    predictions, times = [], []
    for prompt in prompts:
        start = time.perf_counter()
        predictions += predict([prompt])
        times.append(time.perf_counter() - start)
    return predictions, statistics.median(times)


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


# --- plots --------------------------------------------------------------------------------


def plot_layer_accuracies(
    curves: Mapping[str, Sequence[float]],
    *,
    ax=None,
    title: str | None = None,
    baseline: float | None = None,
    chance: float | None = None,
    chosen: Mapping[str, int] | None = None,
):
    """Accuracy per layer, one line per curve; dashed lines for the baseline and chance.

    ``chosen`` marks a layer on a curve (e.g. the layer picked on validation).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in curves.items():
        (line,) = ax.plot(range(len(values)), values, label=label, linewidth=1.5)
        if chosen and label in chosen:
            layer = chosen[label]
            ax.plot([layer], [values[layer]], "o", color=line.get_color(), markersize=7)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="zero-shot full model")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("layer (chip reads this block's output)")
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


# --- command line ---------------------------------------------------------------------------


def _cmd_train(args) -> None:
    from .models import load_lm

    task = get_task(args.task, args.tasks_file)
    dataset = args.dataset or task.name.lower()
    train_rows = load_rows(dataset, "train", args.train_size)
    validation_rows = load_rows(dataset, "validation", args.validation_size)
    model_name = args.model or get_settings().model
    model, tokenizer = load_lm(model_name)
    chipped = ChippedModel(model, tokenizer, task, kind=args.kind, hidden=args.hidden,
                           max_length=args.max_length, seed=args.seed)
    train = chipped.features(format_prompts(train_rows, task), desc="train forward passes")
    losses = chipped.fit(train, row_targets(train_rows, task), epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed)
    validation = chipped.features(format_prompts(validation_rows, task), desc="validation forward passes")
    layer = chipped.choose_layer(validation, row_targets(validation_rows, task), args.tolerance)
    chipped.save(args.out, model=model_name, dataset=dataset, input_kind=input_kind(train_rows[0]))
    print(f"trained {chipped.num_layers} {args.kind} chips on {len(train_rows)} {dataset} examples "
          f"(final loss {losses[-1]:.3f})")
    print(f"chosen layer {layer} of {chipped.num_layers} "
          f"(validation accuracy {chipped.validation_accuracy[layer]:.3f}); saved to {args.out}")


def _load_saved(args):
    from .models import load_lm

    meta = ChippedModel.read_meta(args.chips)
    model_name = args.model or meta.get("model") or get_settings().model
    model, tokenizer = load_lm(model_name)
    return ChippedModel.load(args.chips, model, tokenizer), meta


def _cmd_evaluate(args) -> None:
    chipped, meta = _load_saved(args)
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise ValueError("the saved chips do not name their dataset; pass --dataset")
    rows = load_rows(dataset, args.split, args.size)
    prompts, gold = format_prompts(rows, chipped.task), chipped.task.decode(row_targets(rows, chipped.task))
    features = chipped.features(prompts, desc=f"{args.split} forward passes")
    per_layer = chipped.layer_accuracies(features, gold)
    best = max(range(len(per_layer)), key=per_layer.__getitem__)
    pruned = chipped.prune()
    print(f"{args.split} examples: {len(rows)} of {dataset}")
    print(f"zero-shot full model (next-token scoring): {accuracy(chipped.zero_shot_predict(features), gold):.3f}")
    print(f"pruned model, chip at layer {chipped.layer} ({pruned.num_layers} of {chipped.num_layers} layers): "
          f"{accuracy(pruned.predict(prompts), gold):.3f}")
    print(f"best chip on this split (for reference only): layer {best}, {per_layer[best]:.3f}")


def _cmd_predict(args) -> None:
    chipped, meta = _load_saved(args)
    if bool(args.text) == bool(args.input):
        raise ValueError("give either --text (one or more) or --input rows.jsonl")
    if args.text:
        if meta.get("input_kind") == "multiple_choice":
            raise ValueError(f"task {chipped.task.name!r} takes multiple-choice rows: pass --input rows.jsonl "
                             "with question and choices")
        rows = [{"text": text} for text in args.text]
    else:
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = chipped.prune().predict(format_prompts(rows, chipped.task))
    for label in labels:
        print(label)


def _tolerance(text: str) -> float | str:
    if text == ONE_STANDARD_ERROR:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or {ONE_STANDARD_ERROR}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m companion.chips", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train chips on every layer and choose the layer on validation")
    train.add_argument("--task", required=True, help="a task name from the tasks file (e.g. MMLU, sentiment)")
    train.add_argument("--tasks-file", default=None, help=f"YAML of tasks (default {TASKS_FILE})")
    train.add_argument("--dataset", default=None, help="dataset name for load_data (default: task name, lower case)")
    train.add_argument("--model", default=None, help="model name for load_lm (default: COURSE_MODEL)")
    train.add_argument("--kind", choices=CHIP_KINDS, default="linear")
    train.add_argument("--hidden", type=int, default=DEFAULT_MLP_HIDDEN, help="MLP chips' hidden size")
    train.add_argument("--train-size", type=int, default=400)
    train.add_argument("--validation-size", type=int, default=150)
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--max-length", type=int, default=256, help="prompt tokens kept (cut from the left)")
    train.add_argument("--tolerance", type=_tolerance, default=0.0,
                       help="choose the lowest layer within this much of the best validation accuracy "
                            f"(a number, or {ONE_STANDARD_ERROR} for one standard error)")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--out", required=True, help="folder to save the chips in")

    for name, help_text in (("evaluate", "test accuracy of saved chips, pruned"),
                            ("predict", "labels for new inputs with the pruned model")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--chips", required=True, help="folder written by `train`")
        sub.add_argument("--model", default=None, help="model name (default: the one the chips were trained on)")
        if name == "evaluate":
            sub.add_argument("--dataset", default=None, help="default: the dataset the chips were trained on")
            sub.add_argument("--split", default="test")
            sub.add_argument("--size", type=int, default=None, help="examples to use (default: all)")
        else:
            sub.add_argument("--text", action="append", help="a text to classify (repeatable)")
            sub.add_argument("--input", default=None, help="a JSONL file of rows in the dataset's schema")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict}
    try:
        commands[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # TaskError, DataError and ModelNotAvailableError are among these: their messages
        # already say what to fix, so print them without a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
