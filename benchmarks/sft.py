"""Chapter 3's recipes on this CPU: task accuracy, forgetting and training cost per recipe.

    COURSE_THREADS=1 python benchmarks/sft.py                     # the default model, small sizes
    python benchmarks/sft.py --rows 104 --steps 13 --eval-rows 200 --recipes plain,delia1,delia4,kl1

Trains each recipe (``companion.sft.train_recipe``: the same task batches for all, DELIA's
self-sampled rows or KL replay on top) and prints, per recipe, held-out task accuracy
(label-token logits), forgetting (a) KL(base || tuned) along the base model's own answers and
(b) the cross-entropy increase on held-out human text, each with a 95% interval, plus seconds
per training step. Self-samples and base answers come from the course cache (built if missing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from companion import cli, sft
from companion.config import get_settings, seed_everything
from companion.data import load_data
from companion.models import load_lm

RECIPES = {  # name: (self-sampled rows per task row, replay loss)
    "plain": (0, "ce"), "delia1": (1, "ce"), "delia2": (2, "ce"), "delia4": (4, "ce"),
    "kl1": (1, "kl"), "kl2": (2, "kl"),
}


def recipe_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise ValueError(f"unknown recipe(s) {unknown or text!r}; known: {', '.join(RECIPES)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="task rows to train on")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (of --batch-size task rows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-rows", type=int, default=40, help="held-out task rows (label logits)")
    parser.add_argument("--kl-queries", type=int, default=8, help="held-out queries for forgetting (a)")
    parser.add_argument("--texts", type=int, default=4, help="book passages and chat answers for (b), each")
    parser.add_argument("--diverse", type=int, default=32, help="self-sampled answers in the cache")
    parser.add_argument("--recipes", type=recipe_list, default=recipe_list("plain,delia1,kl1"),
                        help=f"comma-separated, from {', '.join(RECIPES)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the per-item scores and settings to this JSON file (notebook 03 reads it)")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.rows < 2 or args.eval_rows < 2:
        raise ValueError("--rows and --eval-rows must be at least 2 (wrong answers come from other rows)")

    settings = get_settings()
    seed_everything()
    model, tokenizer = load_lm()
    print(f"model {settings.model}, {settings.threads} thread(s)")
    cache = sft.build_cache(model, tokenizer, sft.diverse_queries(args.diverse, seed=settings.seed),
                            max_new_tokens=32, progress=False)
    base_answers = sft.build_cache(model, tokenizer, sft.kl_queries(args.kl_queries, seed=settings.seed),
                                   greedy=True, max_new_tokens=48, progress=False)
    sep = sft.add_special_token(model, tokenizer)
    short_qa = load_data("short_qa")
    train = short_qa["train"]
    if args.rows + args.eval_rows > len(train) + len(short_qa["validation"]):
        raise ValueError(f"--rows + --eval-rows must be at most {len(train) + len(short_qa['validation'])}")
    task = sft.judging_task(train.select(range(args.rows)), seed=settings.seed)
    held_out = list(train.select(range(args.rows, len(train)))) + list(short_qa["validation"])
    suite = sft.EvalSuite(task_rows=sft.judging_task(held_out, seed=settings.seed + 1)[:args.eval_rows],
                          format_rows=[], kl_rows=base_answers,
                          texts=sft.heldout_texts(args.texts, args.texts, seed=settings.seed),
                          qa_rows=list(short_qa["test"].select(range(4))))
    results = {"base": sft.evaluate(model, tokenizer, suite, is_base=True)}
    seconds = {}
    for name in args.recipes:
        ratio, replay = RECIPES[name]
        run = sft.train_recipe(model, tokenizer, task, cache, ratio=ratio, replay=replay, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, trainable_tokens=[sep], progress=False)
        seconds[name] = run.seconds / run.steps
        results[name] = sft.evaluate(run.model, tokenizer, suite)
    summary = sft.summarize(results)
    print(f"{'recipe':8s} {'task accuracy':>22s} {'KL to base (a)':>24s} {'CE increase (b)':>26s} {'s/step':>7s}")
    for name, row in summary.items():
        cells = [f"{row[m].mean:.3f} [{row[m].low:.3f}, {row[m].high:.3f}]"
                 for m in ("task accuracy", "KL to base", "CE increase")]
        print(f"{name:8s} {cells[0]:>22s} {cells[1]:>24s} {cells[2]:>26s} {seconds.get(name, 0.0):7.1f}")
    print(f"n: {summary['base']['task accuracy'].n} task rows, {len(base_answers)} KL queries, "
          f"{len(suite.texts)} texts")
    if args.out is not None:
        knobs = {k: v for k, v in vars(args).items() if k not in ("out", "debug")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": settings.model, "threads": settings.threads, "seed": settings.seed,
                                        "settings": knobs, "recipes": {n: list(RECIPES[n]) for n in args.recipes},
                                        "seconds_per_step": seconds, "scores": results}, indent=1) + "\n")
        print(f"per-item scores written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
