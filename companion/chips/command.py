"""``python -m companion.chips train|evaluate|predict``: chip-tuning from the command line.

Errors in the input print one line ``error: ...`` and exit with status 2 (``companion.cli``);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .. import cli
from ..config import get_settings
from ..records import json_lines
from .model import ChippedModel
from .probes import CHIP_KINDS, DEFAULT_MLP_HIDDEN, ONE_STANDARD_ERROR, accuracy
from .tasks import (
    TASKS_FILE,
    TaskError,
    format_prompt,
    format_prompts,
    get_task,
    input_kind,
    load_rows,
    row_targets,
)


def _cmd_train(args) -> None:
    from ..models import load_lm

    task = get_task(args.task, args.tasks_file)
    dataset = args.dataset or task.name.lower()
    train_rows = load_rows(dataset, "train", args.train_size)
    validation_rows = load_rows(dataset, "validation", args.validation_size)
    model_name = args.model or get_settings().model
    model, tokenizer = load_lm(model_name)
    knobs = {"hidden": args.hidden} if args.kind == "mlp" else {}
    chipped = ChippedModel(model, tokenizer, task, kind=args.kind, max_length=args.max_length, seed=args.seed,
                           **knobs)
    train = chipped.features(format_prompts(train_rows, task), desc="train forward passes")
    losses = chipped.fit(train, row_targets(train_rows, task), epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, shuffle_labels=args.shuffle_labels)
    validation = chipped.features(format_prompts(validation_rows, task), desc="validation forward passes")
    layer = chipped.choose_layer(validation, row_targets(validation_rows, task), args.tolerance)
    chipped.save(args.out, model=model_name, dataset=dataset, input_kind=input_kind(train_rows[0]))
    control = " (shuffled-label control)" if args.shuffle_labels else ""
    print(f"trained {chipped.num_layers} {args.kind} chips{control} on {len(train_rows)} {dataset} examples "
          f"(final loss {losses[-1]:.3f})")
    print(f"chosen layer {layer} of {chipped.num_layers} "
          f"(validation accuracy {chipped.validation_accuracy[layer]:.3f}); saved to {args.out}")


def _load_saved(args):
    from ..models import load_lm

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


def read_input_rows(path: str | Path, task) -> list[dict]:
    """Rows of a JSON-lines file for ``predict``; a bad row is named by file and line."""
    hint = "; one JSON object per line, e.g. {\"text\": \"...\"} or {\"question\": ..., \"choices\": [...]}"
    rows = []
    for number, row in json_lines(path, TaskError, hint):
        try:
            format_prompt(row, task)
        except TaskError as error:
            raise TaskError(f"{path}:{number}: {error}") from None
        rows.append(row)
    if not rows:
        raise TaskError(f"{path} holds no rows{hint}")
    return rows


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
        rows = read_input_rows(args.input, chipped.task)
    for label in chipped.prune().predict(format_prompts(rows, chipped.task)):
        print(label)


def _tolerance(text: str) -> float | str:
    if text == ONE_STANDARD_ERROR:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or {ONE_STANDARD_ERROR}, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"the tolerance must be >= 0, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that raises (so ``cli.run`` prints one ``error:`` line) instead of exiting."""

    def error(self, message):
        raise ValueError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m companion.chips", description="Chip-tuning: train, evaluate, predict.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train chips on every layer and choose the layer on validation")
    train.add_argument("--task", required=True, help="a task name from the tasks file (e.g. topic, sentiment)")
    train.add_argument("--tasks-file", default=None, help=f"YAML of tasks (default data/tasks/{TASKS_FILE.name})")
    train.add_argument("--dataset", default=None, help="dataset name for load_data (default: task name, lower case)")
    train.add_argument("--model", default=None, help="model name for load_lm (default: COURSE_MODEL)")
    train.add_argument("--kind", choices=CHIP_KINDS, default="linear")
    train.add_argument("--hidden", type=cli.positive_int, default=DEFAULT_MLP_HIDDEN, help="MLP chips' hidden size")
    train.add_argument("--train-size", type=cli.positive_int, default=400)
    train.add_argument("--validation-size", type=cli.positive_int, default=150)
    train.add_argument("--epochs", type=cli.positive_int, default=30)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=cli.positive_int, default=32)
    train.add_argument("--max-length", type=cli.positive_int, default=256,
                       help="prompt tokens kept (longer prompts are cut from the left, with a warning)")
    train.add_argument("--tolerance", type=_tolerance, default=0.0,
                       help="choose the lowest layer within this much of the best validation accuracy "
                            f"(a number, or {ONE_STANDARD_ERROR} for one standard error)")
    train.add_argument("--shuffle-labels", action="store_true", help="train the shuffled-label control instead")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--out", required=True, help="folder to save the chips in")
    cli.add_debug_flag(train)

    for name, help_text in (("evaluate", "test accuracy of saved chips, pruned"),
                            ("predict", "labels for new inputs with the pruned model")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--chips", required=True, help="folder written by `train`")
        sub.add_argument("--model", default=None, help="model name (default: the one the chips were trained on)")
        if name == "evaluate":
            sub.add_argument("--dataset", default=None, help="default: the dataset the chips were trained on")
            sub.add_argument("--split", default="test")
            sub.add_argument("--size", type=cli.positive_int, default=None, help="examples to use (default: all)")
        else:
            sub.add_argument("--text", action="append", help="a text to classify (repeatable)")
            sub.add_argument("--input", default=None, help="a JSONL file of rows in the dataset's schema")
        cli.add_debug_flag(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input raises (``cli.run`` prints it as one line)."""
    args = build_parser().parse_args(argv)
    commands = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict}
    commands[args.command](args)
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """``main`` as the command line runs it: one ``error:`` line and exit status 2 for bad input."""
    return cli.run(main, argv)
