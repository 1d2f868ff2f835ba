"""Chip-tuning's headline on the course model: layers pruned, accuracy kept, speed-up, per task.

Prints the headline table of chapter 2 (``chips.measure_task`` on each task): the best
chip's test accuracy and its layer, the accuracy at the layer chosen on validation (one-
standard-error rule, seed-averaged), the fraction of blocks pruned there, the share of the
best accuracy kept, the measured per-example speed-up of the pruned model over the full
one, and the shuffled-label control and majority class; each with a 95% interval. Then
whether the paper's target (>= 40% of the layers pruned with >= 95% of the best accuracy
kept) is met on any task.

Run: ``COURSE_THREADS=1 .venv/bin/python benchmarks/chips.py [--tasks topic truth] [--seeds 3]``
(settings such as COURSE_MODEL apply; about 2 minutes for topic and truth on one thread).
"""

from __future__ import annotations

import argparse
import time

from companion import chips, stats
from companion.config import seed_everything, settings
from companion.data import load_data
from companion.models import load_lm

SIZES = {"topic": (120, 60, 60), "truth": (120, 80, 160), "sentiment": (100, 80, 120), "mmlu": (40, 40, 60)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["topic", "truth"], help="tasks of data/tasks/chips.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--timed", type=int, default=16, help="test prompts timed one at a time")
    args = parser.parse_args()

    seed_everything()
    model, tokenizer = load_lm()
    print(f"model {settings.model}, {settings.threads} threads, {args.seeds} seeds, linear chips, "
          f"{args.epochs} epochs at lr {args.lr}")
    rows = []
    for name in args.tasks:
        task = chips.get_task(name)
        data = load_data(task.name.lower())
        train, validation, test = SIZES.get(task.name.lower(), (120, 80, 120))
        split_rows = {split: chips.load_rows(data, split, size)
                      for split, size in (("train", train), ("validation", validation), ("test", test))}
        prompts = {split: chips.format_prompts(r, task) for split, r in split_rows.items()}
        targets = {split: chips.row_targets(r, task) for split, r in split_rows.items()}
        longest = max(len(ids) for ids in tokenizer([p for s in prompts.values() for p in s])["input_ids"])
        start = time.perf_counter()
        result, _, _ = chips.measure_task(model, tokenizer, task, prompts, targets, seeds=tuple(range(args.seeds)),
                                          num_timed=args.timed, max_length=max(256, longest),
                                          epochs=args.epochs, lr=args.lr)
        print(f"{task.name}: train/validation/test {train}/{validation}/{test}, "
              f"{time.perf_counter() - start:.0f} s")
        rows.append(result)
    print()
    print(stats.markdown_table([r.row() for r in rows]))
    met = [r.task for r in rows
           if r.pruned_share >= 0.40 and r.retained.mean >= 0.95 and r.chosen.low > r.control.high]
    print(f"\n>= 40% of the layers pruned with >= 95% of the best accuracy kept, above the shuffled-label "
          f"control: {', '.join(met) or 'no task'}")


if __name__ == "__main__":
    main()
