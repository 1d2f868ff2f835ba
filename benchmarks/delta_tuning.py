"""Delta-tuning figures on the course model: training speed, checkpoint size, gain over zero-shot.

Prints, for every PEFT method in ``companion.delta.METHODS`` trained on ``short_qa``
(same steps, batch and sequence length for all):

- training throughput in real (non-padding) tokens per second;
- trainable parameters, checkpoint size, and how many times larger the fp32 backbone is;
- exact match and token F1 on the test questions, and the gain over the better of the two
  hand-written zero-shot templates.

Goals (issue 3): a clear, measured gain over zero-shot, and a LoRA checkpoint of at most
about 3 MB.

Run: ``.venv/bin/python benchmarks/delta_tuning.py [--steps 30] [--test-size 100]``
(settings such as COURSE_MODEL and COURSE_THREADS apply).
"""

from __future__ import annotations

import argparse

from companion import delta, prompting
from companion.config import cache_path, seed_everything, settings
from companion.data import load_data
from companion.models import load_lm

LORA_CHECKPOINT_GOAL_MB = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=settings.size(full=30, fast=4))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--test-size", type=int, default=settings.size(full=100, fast=16))
    parser.add_argument("--methods", nargs="+", default=list(delta.METHODS), choices=delta.METHODS)
    args = parser.parse_args()

    seed_everything()
    qa = load_data("short_qa")
    test_rows = list(qa["test"].select(range(min(args.test_size, len(qa["test"])))))
    pairs = prompting.qa_pairs(qa["train"])
    print(f"model {settings.model}, {settings.threads} threads; {args.steps} steps x batch {args.batch_size}, "
          f"max {args.max_length} tokens; {len(test_rows)} test questions")

    model, tokenizer = load_lm()
    zero_shot = {
        name: delta.evaluate_qa(model, tokenizer, test_rows, template=name) for name in prompting.QA_TEMPLATES
    }
    best_name = max(zero_shot, key=lambda name: (zero_shot[name]["f1"], zero_shot[name]["em"]))
    best = zero_shot[best_name]
    for name, result in zero_shot.items():
        print(f"zero-shot {name:9} EM {result['em']:.3f}  F1 {result['f1']:.3f}")
    del model

    header = (f"{'method':14} {'trainable':>10} {'tokens/s':>9} {'train s':>8} {'ckpt MB':>8} "
              f"{'ratio':>7} {'EM':>6} {'F1':>6} {'dEM':>7} {'dF1':>7}")
    rows = []
    for method in args.methods:
        run = delta.tune_and_evaluate(
            method, pairs, test_rows, num_steps=args.steps, batch_size=args.batch_size,
            max_length=args.max_length, save_dir=cache_path("bench_delta_tuning"),
        )
        run.pop("model")
        rows.append(run)
    print(f"\ngain over the best zero-shot template ({best_name})")
    print(header)
    for run in rows:
        megabytes = run["checkpoint_bytes"] / 1e6
        print(f"{run['method']:14} {run['trainable']:>10,} {run['tokens_per_second']:>9.0f} "
              f"{run['train_seconds']:>8.1f} {megabytes:>8.2f} {run['backbone_bytes'] / run['checkpoint_bytes']:>6.0f}x "
              f"{run['em']:>6.3f} {run['f1']:>6.3f} {run['em'] - best['em']:>+7.3f} {run['f1'] - best['f1']:>+7.3f}")

    lora = next((run for run in rows if run["method"] == "lora"), None)
    if lora is not None:
        megabytes = lora["checkpoint_bytes"] / 1e6
        verdict = "met" if megabytes <= LORA_CHECKPOINT_GOAL_MB else "NOT met"
        print(f"\nLoRA checkpoint {megabytes:.2f} MB (goal <= ~{LORA_CHECKPOINT_GOAL_MB:.0f} MB): {verdict}")
        gain = lora["em"] - best["em"]
        print(f"LoRA EM gain over zero-shot {gain:+.3f}, F1 gain {lora['f1'] - best['f1']:+.3f}: "
              f"{'a clear gain' if gain > 0.1 else 'no clear gain'}")


if __name__ == "__main__":
    main()
