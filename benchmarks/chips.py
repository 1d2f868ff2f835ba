"""Chip-tuning figures on the course model: pruning speed-up, layers cut, accuracy cost, caching.

Prints, for one task (sentiment by default):

- per-example latency of the full model answering (next-token scoring) versus the pruned
  model with its chip (batch of one, median over test prompts), and their ratio;
- the layer chosen on the validation split (best chip, and the one-standard-error rule) and
  the fraction of layers pruned there;
- test accuracy at that layer, the best chip's test accuracy, and the gap between them;
- the cost of training the chips with cached features versus with a forward pass on every
  batch of every epoch (same chips, same seed), and the ratio.

Run: ``.venv/bin/python benchmarks/chips.py [--task sentiment] [--train-size 160] ...``
(settings such as COURSE_MODEL and COURSE_THREADS apply).
"""

from __future__ import annotations

import argparse
import time

from companion import chips
from companion.config import seed_everything, settings
from companion.data import load_data
from companion.models import load_lm, parameter_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--kind", choices=chips.CHIP_KINDS, default="linear")
    parser.add_argument("--train-size", type=int, default=160)
    parser.add_argument("--validation-size", type=int, default=150)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--fresh-epochs", type=int, default=2,
                        help="epochs run with a forward pass per batch (slow: keep it small)")
    parser.add_argument("--latency-examples", type=int, default=30)
    args = parser.parse_args()

    seed_everything()
    model, tokenizer = load_lm()
    task = chips.get_task(args.task)
    data = load_data(task.name.lower())  # the course names datasets after their tasks
    rows = {split: chips.load_rows(data, split, size) for split, size in
            (("train", args.train_size), ("validation", args.validation_size), ("test", args.test_size))}
    prompts = {split: chips.format_prompts(r, task) for split, r in rows.items()}
    targets = {split: chips.row_targets(r, task) for split, r in rows.items()}
    chipped = chips.ChippedModel(model, tokenizer, task, kind=args.kind)
    print(f"model {settings.model} ({chipped.num_layers} layers), task {task.name}, {args.kind} chips, "
          f"train/validation/test {args.train_size}/{args.validation_size}/{args.test_size}, "
          f"{settings.threads} threads")

    # Training cost: cached features (one forward per example, then epochs on the cache)...
    start = time.perf_counter()
    train_features = chipped.features(prompts["train"], progress=False)
    extract_seconds = time.perf_counter() - start
    start = time.perf_counter()
    chipped.fit(train_features, targets["train"], epochs=args.fresh_epochs, progress=False)
    cached_epochs_seconds = time.perf_counter() - start
    # ... versus a forward pass on every batch of every epoch (same seed, same chips).
    fresh = chips.ChippedModel(model, tokenizer, task, kind=args.kind)
    start = time.perf_counter()
    fresh.fit(prompts["train"], targets["train"], epochs=args.fresh_epochs, cache=False, progress=False)
    fresh_seconds = time.perf_counter() - start
    cached_seconds = extract_seconds + cached_epochs_seconds
    fresh_weights = fresh.chips.state_dict()
    difference = max((value - fresh_weights[name]).abs().max().item()
                     for name, value in chipped.chips.state_dict().items())
    print(f"\ntraining {args.fresh_epochs} epochs: cached features {cached_seconds:.1f} s "
          f"(forward passes {extract_seconds:.1f} s + chips {cached_epochs_seconds:.2f} s), "
          f"forward per epoch {fresh_seconds:.1f} s -> ratio {fresh_seconds / cached_seconds:.1f}x; "
          f"largest difference between the two sets of chip weights {difference:.1e}")

    # The chips used below: the full number of epochs on the cached features.
    chipped = chips.ChippedModel(model, tokenizer, task, kind=args.kind)
    start = time.perf_counter()
    chipped.fit(train_features, targets["train"], epochs=args.epochs, progress=False)
    chips_seconds = time.perf_counter() - start
    per_epoch_fresh = fresh_seconds / args.fresh_epochs
    estimate = per_epoch_fresh * args.epochs
    print(f"training {args.epochs} epochs: cached {extract_seconds + chips_seconds:.1f} s measured, "
          f"forward per epoch ~{estimate:.0f} s estimated ({per_epoch_fresh:.1f} s/epoch measured) "
          f"-> ratio ~{estimate / (extract_seconds + chips_seconds):.0f}x")

    # Layer chosen on validation (two rules); test accuracy there versus the best chip on test.
    validation_features = chipped.features(prompts["validation"], progress=False)
    test_features = chipped.features(prompts["test"], progress=False)
    test_accuracy = chipped.layer_accuracies(test_features, targets["test"])
    best = max(range(len(test_accuracy)), key=test_accuracy.__getitem__)
    gold = task.decode(targets["test"])
    zero_shot = chips.accuracy(chipped.zero_shot_predict(test_features), gold)
    print(f"\nzero-shot full model: test {zero_shot:.3f}; best chip on test: layer {best}, {test_accuracy[best]:.3f}")
    sample = prompts["test"][: args.latency_examples]
    full_answers, full_seconds = chips.timed_predictions(chips.full_model_predict(chipped), sample)
    print(f"full model: {parameter_count(model) / 1e6:.1f} M parameters, {full_seconds * 1000:.0f} ms per example "
          f"(median of {len(sample)}, batch of one)")
    for rule, tolerance in (("best on validation", 0.0), ("one standard error", chips.ONE_STANDARD_ERROR)):
        layer = chipped.choose_layer(validation_features, targets["validation"], tolerance=tolerance)
        pruned = chipped.prune()
        _, pruned_seconds = chips.timed_predictions(pruned.predict, sample)
        print(f"{rule:18s}: layer {layer:2d}, keeps {pruned.num_layers} of {chipped.num_layers} layers "
              f"(prunes {1 - pruned.num_layers / chipped.num_layers:.0%}), "
              f"{pruned.parameter_count() / parameter_count(model):.0%} of the parameters | "
              f"test {test_accuracy[layer]:.3f}, gap to best chip {test_accuracy[best] - test_accuracy[layer]:.3f} | "
              f"{pruned_seconds * 1000:.0f} ms per example, {full_seconds / pruned_seconds:.2f}x faster")


if __name__ == "__main__":
    main()
