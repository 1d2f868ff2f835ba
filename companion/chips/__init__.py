"""Chip-tuning: classify from a frozen LM's intermediate layers, then prune the layers above.

Chip-Tuning ("Classify Before Language Models Say", arXiv 2410.06541) attaches a tiny probe,
a *chip*, to the hidden state of every layer of a frozen causal LM at the last prompt token
(a linear chip ``Linear(d, C)`` or an MLP chip). All chips train together from the same
cached forward pass. The chip chosen on a validation split picks a layer; every block above
it is cut off, so the model answers the task with a fraction of its layers.

The package, in the order a chapter uses it:

- ``tasks``: ``Task`` / ``load_tasks`` (YAML, reference format ``task_name: [label0, ...]``),
  ``format_prompts`` / ``row_targets`` (dataset rows to prompts and label indices).
- ``features``: ``extract_features`` (every block's output at the last token, plus the
  zero-shot label scores, one forward per example), ``count_truncated``, ``block_influence``.
- ``probes``: the chip registry ``CHIP_FACTORIES``, ``ChipSet``, ``train_chips``,
  ``shuffled_targets`` (the control), ``choose_layer`` and the one-standard-error rule.
- ``model``: ``ChippedModel`` (fit, choose the layer on validation, save/load with the
  backbone's fingerprint), ``PrunedChipModel`` (``prune()``), ``keep_blocks``, ``choose_chip``.
- ``analysis``: ``seed_runs`` (several seeds, controls), ``headline`` (the figures with
  intervals), ``timed_predictions``, ``plot_layer_accuracies``.
- ``command``: ``python -m companion.chips train|evaluate|predict``.

The layer is chosen on a validation split that shares no example with the test split
(the reference code drew its "validation" examples from the evaluation split).
"""

from .analysis import (
    Headline,
    SeedRuns,
    full_model_predict,
    headline,
    majority_share,
    measure_task,
    plot_layer_accuracies,
    ratio_estimate,
    seed_runs,
    timed_predictions,
)
from .command import build_parser, main, read_input_rows, run
from .features import (
    Features,
    block_influence,
    check_max_length,
    count_truncated,
    extract_features,
)
from .model import (
    CHIPS_FORMAT,
    META_FILE,
    SHUFFLED_LABELS,
    WEIGHTS_FILE,
    ChippedModel,
    ChipsMismatchError,
    PrunedChipModel,
    backbone_fingerprint,
    choose_chip,
    keep_blocks,
)
from .probes import (
    CHIP_FACTORIES,
    CHIP_KINDS,
    DEFAULT_MLP_HIDDEN,
    ONE_STANDARD_ERROR,
    ChipSet,
    accuracy,
    chip_knobs,
    choose_layer,
    make_chip,
    shuffled_targets,
    standard_error,
    train_chips,
)
from .tasks import (
    TASKS_FILE,
    Task,
    TaskError,
    format_prompt,
    format_prompts,
    get_task,
    input_kind,
    label_token_ids,
    load_rows,
    load_tasks,
    parse_tasks,
    row_targets,
)

__all__ = [
    "CHIPS_FORMAT", "CHIP_FACTORIES", "CHIP_KINDS", "DEFAULT_MLP_HIDDEN", "META_FILE", "ONE_STANDARD_ERROR",
    "SHUFFLED_LABELS", "TASKS_FILE", "WEIGHTS_FILE", "ChipSet", "ChippedModel", "ChipsMismatchError", "Features",
    "Headline", "PrunedChipModel", "SeedRuns", "Task", "TaskError", "accuracy", "backbone_fingerprint",
    "block_influence", "build_parser", "check_max_length", "chip_knobs", "choose_chip", "choose_layer",
    "count_truncated", "extract_features", "format_prompt", "format_prompts", "full_model_predict", "get_task",
    "headline", "input_kind", "keep_blocks", "label_token_ids", "load_rows", "load_tasks", "main",
    "majority_share", "make_chip", "measure_task", "parse_tasks", "plot_layer_accuracies", "ratio_estimate", "read_input_rows",
    "row_targets", "run", "seed_runs", "shuffled_targets", "standard_error", "timed_predictions", "train_chips",
]
