"""The chipped model (a frozen LM with a chip on every layer) and the pruned model it yields.

``ChippedModel`` trains all chips from cached features, chooses the layer on a held-out
validation split, and saves/loads the chips with a fingerprint of the backbone they were
trained on (loading onto another backbone is refused). ``prune()`` returns a
``PrunedChipModel``: a real copy with only the blocks up to the chosen layer, plus its chip.
``keep_blocks`` keeps any list of blocks (ShortGPT-style pruning by Block Influence).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import arch
from ..arch import hidden_size, keep_first_layers, num_layers
from ..config import get_settings
from ..models import parameter_count
from .features import Features, check_max_length, extract_features
from .probes import (
    ChipSet,
    choose_layer,
    shuffled_targets,
    tolerance_value,
    train_chips,
)
from .tasks import Task, label_token_ids

CHIPS_FORMAT = "companion.chips/2"
WEIGHTS_FILE = "chips.safetensors"
META_FILE = "chips.json"
SHUFFLED_LABELS = "shuffled labels"


class ChipsMismatchError(ValueError):
    """Saved chips are loaded onto another backbone than the one they were trained on."""


def backbone_fingerprint(model: nn.Module) -> dict:
    """The backbone's identity (type, shapes, checksum of embedding rows), as delta checkpoints note it."""
    from ..delta.checkpoint import backbone_fingerprint as fingerprint

    return fingerprint(model)


def keep_blocks(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with only the blocks ``layers`` (in the model's order), the rest removed."""
    total = num_layers(model)
    kept = sorted({int(i) for i in layers})
    if not kept or kept[0] < 0 or kept[-1] >= total:
        raise ValueError(f"layers to keep must be a non-empty list of indices in [0, {total}), got {list(layers)}")
    pruned = copy.deepcopy(arch.unwrap(model))
    decoder = arch._decoder(pruned)
    decoder.layers = nn.ModuleList(decoder.layers[i] for i in kept)
    for position, block in enumerate(decoder.layers):  # caches index blocks by their position
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    pruned.config.num_hidden_layers = len(kept)
    layer_types = getattr(pruned.config, "layer_types", None)
    if layer_types is not None:
        pruned.config.layer_types = [layer_types[i] for i in kept]
    return pruned


class PrunedChipModel:
    """The blocks up to the chosen layer (a real, smaller copy of the model) and its chip."""

    def __init__(self, model: nn.Module, tokenizer, task: Task, chip: nn.Module, layer: int,
                 *, batch_size: int = 8, max_length: int = 256):
        self.model, self.tokenizer, self.task, self.chip, self.layer = model, tokenizer, task, chip, layer
        self.batch_size, self.max_length = batch_size, check_max_length(max_length)
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


class ChippedModel:
    """A frozen causal LM with a chip on every layer, for one classification task.

    ``data`` arguments take either a list of prompts (run through the model) or
    ``Features`` already extracted with ``features(prompts)`` (reused at no cost).
    ``targets`` take label words or class indices. ``knobs`` go to the chip kind's
    factory (e.g. ``hidden=64`` for MLP chips) and are saved with the chips.
    """

    def __init__(self, model: nn.Module, tokenizer, task: Task, *, kind: str = "linear", seed: int | None = None,
                 batch_size: int = 8, max_length: int = 256, **knobs):
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.batch_size, self.max_length = batch_size, check_max_length(max_length)
        self.seed = get_settings().seed if seed is None else seed
        self.chips = ChipSet(num_layers(model), hidden_size(model), task.num_classes, kind, self.seed, **knobs)
        self.layer: int | None = None
        self.validation_accuracy: list[float] | None = None
        self.validation_count: int | None = None
        self.control: str | None = None  # SHUFFLED_LABELS for a control chip set

    @property
    def num_layers(self) -> int:
        return len(self.chips)

    def features(self, prompts: Sequence[str], *, progress: bool = True, desc: str = "forward passes",
                 label_scores: bool = True) -> Features:
        """Run the frozen model once per prompt; keep every layer's state and the label scores.

        ``label_scores=False`` skips the LM head (about a quarter of a small model's forward):
        for splits that only train or choose chips, not the zero-shot baseline.
        """
        label_ids = label_token_ids(self.tokenizer, self.task) if label_scores else None
        return extract_features(
            self.model, self.tokenizer, prompts, label_ids=label_ids,
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

    def fit(self, data: Features | Sequence[str], targets, *, epochs: int | None = 30, lr: float = 1e-3,
            batch_size: int = 32, weight_decay: float = 0.01, seed: int | None = None, num_steps: int | None = None,
            cache: bool = True, shuffle_labels: bool = False, progress: bool = True) -> list[float]:
        """Train all chips; returns the mean loss per chip per epoch.

        ``num_steps`` (optimizer steps) replaces ``epochs`` when given. With ``cache=True``
        the model runs once per example and every epoch reuses the cached states;
        ``cache=False`` runs it on every batch (same chips, slower: a reference for tests).
        ``shuffle_labels=True`` trains the *control*: the same labels in a seeded random
        order, so the chips can only learn noise (saved and reloaded as such).
        """
        seed = self.seed if seed is None else seed
        if cache:
            features = self._features(data)
            targets = self._targets(targets, len(features))
            states_for = lambda indices: features.states[:, indices]
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

        if shuffle_labels:
            targets = shuffled_targets(targets, seed)
        self.control = SHUFFLED_LABELS if shuffle_labels else None
        return train_chips(
            self.chips, states_for, targets, epochs=None if num_steps is not None else epochs, lr=lr,
            batch_size=batch_size, weight_decay=weight_decay, seed=seed, num_steps=num_steps, progress=progress,
        )

    @torch.no_grad()
    def layer_scores(self, data: Features | Sequence[str]) -> torch.Tensor:
        """Every chip's logits: ``(layers, examples, classes)``."""
        return self.chips(self._features(data).states)

    def layer_correct(self, data: Features | Sequence[str], targets) -> torch.Tensor:
        """Whether each layer's chip gets each example right: ``(layers, examples)`` booleans."""
        scores = self.layer_scores(data)
        return scores.argmax(-1) == self._targets(targets, scores.shape[1])

    def layer_accuracies(self, data: Features | Sequence[str], targets) -> list[float]:
        """Accuracy of each layer's chip."""
        return self.layer_correct(data, targets).float().mean(dim=1).tolist()

    def choose_layer(self, validation_data, validation_targets, tolerance: float | str = 0.0) -> int:
        """Pick the chip on a held-out validation split (never on the test split).

        ``tolerance``: how much validation accuracy may be given up for a shallower layer;
        ``"1se"`` means one standard error of the best validation accuracy.
        """
        self.validation_accuracy = self.layer_accuracies(validation_data, validation_targets)
        self.validation_count = len(validation_targets)
        tolerance = tolerance_value(tolerance, max(self.validation_accuracy), self.validation_count)
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

        The JSON notes the backbone's fingerprint, so loading onto another model is refused.
        ``extra`` keys (e.g. ``model="smollm2-135m"``, ``dataset="sentiment"``) are kept too.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.chips.state_dict().items()}, folder / WEIGHTS_FILE)
        meta = {
            "format": CHIPS_FORMAT, "task": self.task.name, "labels": list(self.task.labels),
            "kind": self.chips.kind, "knobs": self.chips.knobs, "control": self.control,
            "num_layers": self.num_layers, "hidden_size": self.chips.hidden_size,
            "backbone": backbone_fingerprint(self.model), "layer": self.layer,
            "validation_accuracy": self.validation_accuracy, "validation_count": self.validation_count,
            "max_length": self.max_length, "seed": self.seed, **extra,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return folder

    @staticmethod
    def read_meta(folder: str | Path) -> dict:
        """The JSON saved next to the chips, checked (errors name the file)."""
        folder = Path(folder)
        meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"{folder} does not hold saved chips ({META_FILE} and {WEIGHTS_FILE}); "
                "train some with `python -m companion.chips train --out FOLDER`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{meta_path} is damaged (not valid JSON: {error}); "
                             "train the chips again with `python -m companion.chips train`") from None
        if not isinstance(meta, dict) or meta.get("format") != CHIPS_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{meta_path} has format {found!r}, expected {CHIPS_FORMAT!r}; "
                             "train the chips again with this version of the course")
        missing = [key for key in ("task", "labels", "kind", "knobs", "num_layers", "hidden_size", "backbone")
                   if key not in meta]
        if missing:
            raise ValueError(f"{meta_path} lacks {', '.join(missing)}; train the chips again")
        return meta

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module, tokenizer) -> ChippedModel:
        """Chips saved with ``save``, attached to ``model`` (it must be the model they were trained on)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = cls.read_meta(folder)
        if (meta["num_layers"], meta["hidden_size"]) != (num_layers(model), hidden_size(model)):
            raise ChipsMismatchError(
                f"the chips in {folder} were trained on a model with {meta['num_layers']} layers of size "
                f"{meta['hidden_size']}, but this model has {num_layers(model)} of size {hidden_size(model)}; "
                f"load the model they were trained on ({meta['backbone'].get('name')})"
            )
        found = backbone_fingerprint(model)
        differ = [key for key, value in meta["backbone"].items() if found.get(key) != value]
        if differ:
            raise ChipsMismatchError(
                f"the chips in {folder} were trained on {meta['backbone'].get('name')!r} but this model is "
                f"{found.get('name')!r} ({', '.join(differ)} differ); chips read one model's hidden states, "
                f"so load {meta['backbone'].get('name')!r} (or train chips for this model)"
            )
        task = Task(meta["task"], tuple(meta["labels"]))
        chipped = cls(model, tokenizer, task, kind=meta["kind"], max_length=meta.get("max_length", 256),
                      seed=meta.get("seed"), **meta["knobs"])
        chipped.chips.load_state_dict(load_file(folder / WEIGHTS_FILE))
        chipped.layer = meta["layer"]
        chipped.validation_accuracy = meta["validation_accuracy"]
        chipped.validation_count = meta.get("validation_count")
        chipped.control = meta.get("control")
        return chipped


def choose_chip(candidates: Sequence[ChippedModel], tolerance: float | str = 0.0) -> ChippedModel:
    """The shallowest chip, over several chip sets, within ``tolerance`` of the best of all.

    ``candidates`` are chip sets for the same task and model (e.g. linear and MLP chips)
    whose ``choose_layer`` already ran on the same validation split. Among chips at the
    winning depth, the more accurate one wins. Sets the winner's ``layer`` and returns it.
    """
    if not candidates:
        raise ValueError("no chip sets to choose from")
    if any(c.validation_accuracy is None for c in candidates):
        raise ValueError("call choose_layer(validation_data, targets) on every candidate first")
    best = max(max(c.validation_accuracy) for c in candidates)
    tolerance = tolerance_value(tolerance, best, candidates[0].validation_count)
    for layer in range(max(c.num_layers for c in candidates)):
        good = [c for c in candidates
                if layer < c.num_layers and c.validation_accuracy[layer] >= best - tolerance - 1e-12]
        if good:
            winner = max(good, key=lambda c: c.validation_accuracy[layer])
            winner.layer = layer
            return winner
    raise AssertionError("unreachable: the best chip is always within the tolerance")
