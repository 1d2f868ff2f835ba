"""The command line of chapter 4: ``python -m companion.kv run configs/kv/`` and ``... methods``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_debug_flag
from ..config import seed_everything, shown_path
from .methods import available_methods, method_knobs
from .plots import plot_fidelity
from .runs import default_results_dir, load_run_configs, run_configs


def summary(rows: list[dict]) -> str:
    """A plain-text table: one line per run and budget (top-1 with its 95% interval)."""
    lines = [f"{'run':<24} {'budget':>6} {'top1 [95% CI]':>20} {'top5':>6} {'KL':>8} {'KL p90':>8} "
             f"{'needle':>6} {'cache MB':>9} {'s':>6}"]
    for row in rows:
        budget = "-" if row["budget"] is None else (f"{row['budget']:.2f}" if isinstance(row["budget"], float)
                                                    else str(row["budget"]))
        top1 = f"{row['top1']:.3f} [{row.get('top1_low', row['top1']):.2f}, {row.get('top1_high', row['top1']):.2f}]"
        needle = "-" if row.get("needle_accuracy") is None else f"{row['needle_accuracy']:.2f}"
        lines.append(f"{row['label']:<24} {budget:>6} {top1:>20} {row['top5']:>6.3f} {row['kl']:>8.4f} "
                     f"{row.get('kl_p90', 0.0):>8.4f} {needle:>6} {row['cache_bytes'] / 2**20:>9.2f} "
                     f"{row['seconds']:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.kv",
                                     description="KV-cache compression fidelity: run configs, list methods")
    add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a folder (or file) of {model}-{method}.json configs")
    run.add_argument("configs", help="folder of run configs, or one config file")
    run.add_argument("--results", help="results folder (default outputs/kv/{fast|full})")
    run.add_argument("--model", help="run the configs' methods on this model instead")
    add_debug_flag(run)
    methods = commands.add_parser("methods", help="list the methods and their knobs")
    add_debug_flag(methods)
    args = parser.parse_args(argv)
    if args.command == "methods":
        for name in available_methods():
            print(f"{name}: {method_knobs(name)}")
        return 0
    seed_everything()
    configs = load_run_configs(args.configs, model=args.model)
    results_dir = Path(args.results) if args.results else default_results_dir()
    rows = run_configs(configs, results_dir)
    print(summary(rows))
    plot_fidelity(rows, path=results_dir / "fidelity.png")
    shown = shown_path(results_dir)
    print(f"results: {shown}/results.jsonl, {shown}/results.csv, {shown}/fidelity.png")
    return 0
