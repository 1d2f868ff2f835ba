"""Self-sampling speed (batched vs one query at a time) and SFT training speed on this CPU.

    COURSE_THREADS=1 python benchmarks/sft.py      # the default model (COURSE_MODEL)
    python benchmarks/sft.py --queries 32 --batch-size 16 --steps 8

Prints generated tokens/s for self-sampling one query at a time and in batches of
``--batch-size``, their ratio, and the real (non-padding) tokens/s of LoRA SFT on the
chapter's task rows. The cache files are written to a temporary folder and thrown away.
On a 2-core machine shared with other jobs, generation with 2 torch threads can be many
times slower than with 1 (threads wait on each other); compare COURSE_THREADS=1 and 2.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from companion import sft
from companion.config import get_settings, seed_everything
from companion.data import load_data
from companion.models import load_lm


def sampling_speed(model, tokenizer, queries, batch_size: int, max_new_tokens: int) -> float:
    """Generated tokens per second when building a fresh cache of ``queries``."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        rows = sft.build_cache(model, tokenizer, queries, Path(folder) / "cache.jsonl",
                               batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows)
    return tokens / seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=16, help="diverse queries to sample")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the batched run")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4, help="SFT steps to time")
    parser.add_argument("--train-batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    settings = get_settings()
    seed_everything()
    model, tokenizer = load_lm()
    print(f"model {settings.model}, {settings.threads} thread(s)")
    queries = sft.diverse_queries(args.queries, seed=0)

    single = sampling_speed(model, tokenizer, queries, 1, args.max_new_tokens)
    batched = sampling_speed(model, tokenizer, queries, args.batch_size, args.max_new_tokens)
    print(f"self-sampling, one query at a time: {single:7.1f} tokens/s")
    print(f"self-sampling, batches of {args.batch_size:<3d}      : {batched:7.1f} tokens/s "
          f"({batched / single:.1f}x)")

    sep = sft.add_special_token(model, tokenizer, init_text="JSON format")
    rows = sft.judging_task(load_data("short_qa")["train"], seed=0)[: args.steps * args.train_batch_size]
    run = sft.train_sft(model, tokenizer, rows, num_steps=args.steps, batch_size=args.train_batch_size,
                        trainable_tokens=[sep], progress=False)
    print(f"LoRA SFT, batch {args.train_batch_size}: {run.tokens_per_second:7.1f} tokens/s "
          f"({run.seconds / run.steps:.2f} s/step, {run.tokens} tokens in {run.steps} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
