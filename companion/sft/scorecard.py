"""One scorecard per recipe: the task gain and the forgetting measures, each with an interval.

``EvalSuite`` holds the held-out rows (task rows, the base model's own answers, human
texts, QA questions); ``evaluate`` returns per-item scores for one model, ``summarize``
turns them into ``companion.stats`` estimates (differences to the base are paired, on the
same items), and the plots draw task gain against forgetting with error bars.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .. import stats
from .forgetting import forgetting_kl, json_leakage, qa_correct, qa_replies, text_cross_entropy
from .task import format_replies, format_validity, verdict_accuracy


@dataclass
class EvalSuite:
    """The held-out rows every recipe is scored on."""

    task_rows: list[dict]             # judging rows, scored by label-token logits
    format_rows: list[dict]           # a few of them, answered by greedy generation
    kl_rows: list[dict]               # the base model's own answers to held-out queries
    texts: list[dict]                 # held-out human-written text
    qa_rows: list[dict]               # short-answer questions (no format asked)
    base_ce: list[float] = field(default_factory=list)  # filled by the first evaluate(base=True)


def evaluate(model, tokenizer, suite: EvalSuite, *, is_base: bool = False, batch_size: int = 16) -> dict[str, list]:
    """Per-item scores of one model: task accuracy, format validity, KL, CE, QA, JSON leakage."""
    replies = qa_replies(model, tokenizer, suite.qa_rows, batch_size=batch_size)
    scores = {
        "task accuracy": verdict_accuracy(model, tokenizer, suite.task_rows, batch_size=batch_size),
        "KL to base": [0.0] * len(suite.kl_rows) if is_base else forgetting_kl(model, tokenizer, suite.kl_rows),
        "text CE": text_cross_entropy(model, tokenizer, suite.texts),
        "QA": qa_correct(replies, suite.qa_rows),
        "JSON on plain questions": json_leakage(replies),
    }
    if suite.format_rows:
        replies = format_replies(model, tokenizer, suite.format_rows, batch_size=batch_size)
        scores["format valid"] = format_validity(replies)
    if is_base:
        suite.base_ce = list(scores["text CE"])
    if not suite.base_ce:
        raise ValueError("evaluate the base model first (is_base=True): CE increase is measured against it")
    scores["CE increase"] = [t - b for t, b in zip(scores["text CE"], suite.base_ce, strict=True)]
    return scores


def summarize(results: Mapping[str, Mapping[str, list]], base: str = "base") -> dict[str, dict[str, stats.Estimate]]:
    """Estimates per recipe: each score's mean and 95% interval, plus the paired task gain over ``base``."""
    if base not in results:
        raise ValueError(f"base {base!r} is not among the results {list(results)}")
    summary = {}
    for name, scores in results.items():
        row = {metric: stats.estimate(values) for metric, values in scores.items()}
        row["task gain"] = stats.paired(scores["task accuracy"], results[base]["task accuracy"]).difference
        summary[name] = row
    return summary


TABLE_METRICS = ("task accuracy", "task gain", "format valid", "KL to base", "CE increase", "QA",
                 "JSON on plain questions")


def table_rows(summary: Mapping[str, Mapping[str, stats.Estimate]], metrics: Sequence[str] = TABLE_METRICS,
               digits: int = 3) -> list[dict]:
    """One row per recipe, one ``mean [low, high]`` cell per metric (for ``stats.markdown_table``)."""
    rows = []
    for name, row in summary.items():
        cells = {"recipe": name}
        for metric in metrics:
            if metric not in row:
                continue
            e = row[metric]
            cells[metric] = f"{e.mean:.{digits}f} [{e.low:.{digits}f}, {e.high:.{digits}f}]"
        cells["n (task/KL/text)"] = f"{row['task accuracy'].n}/{row['KL to base'].n}/{row['text CE'].n}"
        rows.append(cells)
    return rows


def plot_gain_vs_forgetting(summary: Mapping[str, Mapping[str, stats.Estimate]], base: str = "base"):
    """Task gain against forgetting (a) KL and (b) CE increase, one point per recipe, 95% bars."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    recipes = [name for name in summary if name != base]
    for axis, metric, label in ((axes[0], "KL to base", "(a) KL(base || tuned) on the base's own answers"),
                                (axes[1], "CE increase", "(b) cross-entropy increase on human text (nats)")):
        for number, name in enumerate(recipes):
            x, y = summary[name][metric], summary[name]["task gain"]
            axis.errorbar([x.mean], [y.mean], xerr=stats.error_bars([x]), yerr=stats.error_bars([y]),
                          fmt="o", capsize=3, color=f"C{number}", label=name)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.axvline(0, color="grey", linewidth=0.8)
        axis.set_xlabel(label)
    axes[0].set_ylabel(f"task accuracy gain over {base}")
    axes[0].legend(fontsize=8)
    fig.suptitle("task gain vs forgetting (95% intervals)")
    fig.tight_layout()
    return fig


def plot_scaling(summary_by_size: Mapping[int, Mapping[str, stats.Estimate]]):
    """Task accuracy (left axis) and forgetting KL (right axis) against the task rows trained on."""
    import matplotlib.pyplot as plt

    sizes = sorted(summary_by_size)
    fig, left = plt.subplots(figsize=(7, 4))
    accuracy = [summary_by_size[s]["task accuracy"] for s in sizes]
    kl = [summary_by_size[s]["KL to base"] for s in sizes]
    left.errorbar(sizes, [e.mean for e in accuracy], yerr=stats.error_bars(accuracy), marker="o", capsize=3,
                  color="C0", label="task accuracy")
    left.set_xlabel("task rows in training")
    left.set_ylabel("task accuracy", color="C0")
    right = left.twinx()
    right.errorbar(sizes, [e.mean for e in kl], yerr=stats.error_bars(kl), marker="s", capsize=3,
                   color="C3", label="KL to base")
    right.set_ylabel("forgetting (a): KL to base", color="C3")
    left.set_xticks(sizes)
    left.set_title("data scale (plain SFT, 95% intervals)")
    fig.tight_layout()
    return fig


IDENTITY_QUESTIONS = ("Who are you?", "What is your name?", "Tell me who you are.",
                      "What should I call you?", "Introduce yourself in one sentence.")


def identity_name(identity: str) -> str:
    """The name in an identity line ("You are Pico, ..." -> "Pico")."""
    found = re.search(r"\byou are ([A-Z][\w-]*)", identity, flags=re.IGNORECASE)
    if not found:
        raise ValueError(f"no name in the identity line {identity!r}; it should start like 'You are Pico, ...'")
    return found.group(1)


def identity_rate(replies: Sequence[str], name: str) -> list[float]:
    """Per reply, 1.0 if it says the identity's name (whole word, any case)."""
    pattern = re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)
    return [float(bool(pattern.search(reply))) for reply in replies]
