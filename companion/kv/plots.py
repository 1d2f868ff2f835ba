"""Plots of the KV bench: fidelity against budget or bytes kept, with 95% bands; needle accuracy."""

from __future__ import annotations

METRIC_TITLES = {"top1": "top-1 agreement", "top5": "top-5 agreement", "kl": "mean KL(full || compressed)",
                 "kl_p90": "90th percentile of KL", "first_disagreement": "first disagreement (token)",
                 "needle_accuracy": "needle accuracy"}


def _colours(labels):
    import matplotlib.pyplot as plt

    # One fixed colour per method in every panel: black for full, tab10/tab20 for the others.
    palette = iter(plt.get_cmap("tab10" if len(labels) <= 11 else "tab20").colors)
    return {label: "black" if label == "full" else next(palette) for label in labels}


def _x(row, x):
    return row["budget"] if x == "budget" and isinstance(row["budget"], float) else row["cache_fraction"]


def plot_fidelity(rows: list[dict], metrics=("top1", "top5", "kl"), x: str = "budget", path=None):
    """One panel per metric; a line per budgeted method (with its 95% band over prompts when the
    rows have ``{metric}_low``/``_high``), a square per method without budget.

    ``x="budget"`` plots against the kept fraction of the prompt's positions (methods without
    a fractional budget, such as ``full`` and ``quantize``, sit at the fraction of bytes they
    keep); ``x="cache_fraction"`` against the cache bytes kept, where all methods compare. KL
    is on a log scale, so zero values (``full``) are left out of those panels.
    """
    import matplotlib.pyplot as plt

    if x not in ("budget", "cache_fraction"):
        raise ValueError("x must be 'budget' or 'cache_fraction'")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.6, 3.6), squeeze=False)
    labels = list(dict.fromkeys(row["label"] for row in rows))
    colours = _colours(labels)
    for ax, metric in zip(axes[0], metrics):
        for label in labels:
            mine = sorted((r for r in rows if r["label"] == label and r.get(metric) is not None),
                          key=lambda r: _x(r, x))
            if metric.startswith("kl"):
                mine = [r for r in mine if r[metric] > 0]
            if not mine:
                continue
            xs = [_x(r, x) for r in mine]
            ys = [r[metric] for r in mine]
            line = len(set(xs)) > 1  # a method that saves no bytes is a column of dots, not a line
            ax.plot(xs, ys, "-o" if line else ("o" if len(xs) > 1 else "s"), color=colours[label],
                    label=label, markersize=4 if line or len(xs) > 1 else 6)
            if all(f"{metric}_low" in r for r in mine):
                low = [max(r[f"{metric}_low"], 1e-12) if metric.startswith("kl") else r[f"{metric}_low"] for r in mine]
                high = [r[f"{metric}_high"] for r in mine]
                if line:
                    ax.fill_between(xs, low, high, color=colours[label], alpha=0.15, linewidth=0)
                else:
                    ax.errorbar(xs, ys, yerr=[[y - lo for y, lo in zip(ys, low)], [hi - y for y, hi in zip(ys, high)]],
                                fmt="none", ecolor=colours[label], capsize=3)
        ax.set_title(METRIC_TITLES.get(metric, metric))
        ax.set_xlabel("budget (fraction of prompt cache kept)" if x == "budget" else "cache bytes kept (fraction)")
        if metric.startswith("kl"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend([handles[label] for label in labels if label in handles], [l for l in labels if l in handles],
               loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def needle_by_depth(rows: list[dict]) -> list[dict]:
    """Needle accuracy per run, budget and depth: ``{label, budget, depth, correct, n, accuracy}``
    rows (prompts the full model missed are left out, as in ``needle_accuracy``)."""
    table = []
    for row in rows:
        depths: dict[float, list[bool]] = {}
        for prompt in row.get("per_prompt", []):
            if prompt.get("needle_correct") is not None:
                depths.setdefault(prompt["depth"], []).append(prompt["needle_correct"])
        for depth, flags in sorted(depths.items()):
            table.append({"label": row["label"], "budget": row["budget"], "depth": depth, "correct": sum(flags),
                          "n": len(flags), "accuracy": sum(flags) / len(flags)})
    return table
