"""Chapter 4: a KV-cache compression fidelity bench (prompts, run configs, runner, plots, CLI).

The methods live in ``companion.kv_methods`` and the harness in ``companion.kv_fidelity``;
this module re-exports both, so notebooks only import ``companion.kv``. It adds:

- long prompts available offline: passages of public-domain plays (``load_data("books")``) and
  many-shot multiple-choice prompts (``load_data("mmlu")``);
- run configs, one JSON file per run named ``{model}-{method}[-{variant}].json``
  (model, dtype, method, method_config, budgets, max_length, new_tokens, num_prompts, prompts);
- a resumable batch runner: a folder of configs -> ``results.jsonl`` and ``results.csv``
  (finished runs are skipped), with a progress bar;
- plots of fidelity against budget, and the command line::

    python -m companion.kv run configs/kv/        # every config in the folder
    python -m companion.kv methods                # the registered methods and their knobs
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import REPO_ROOT, get_settings, seed_everything
from .kv_fidelity import (  # noqa: F401  (re-exported)
    FidelityResult, PromptState, compare, companion_attention, evaluate, kv_bytes_per_token,
    prefill, prepare_prompt, prepare_prompts,
)
from .kv_methods import (  # noqa: F401  (re-exported)
    KVConfigError, KVMethod, LayerKV, available_methods, fake_quantize, make_method, method_knobs,
)

DEFAULT_BUDGETS = (0.1, 0.25, 0.5, 0.75, 0.9)
PROMPT_SOURCES = ("books", "mmlu", "mixed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Fast mode (tests, CI) caps every run at these sizes.
FAST_MAX_LENGTH, FAST_NEW_TOKENS, FAST_NUM_PROMPTS = 128, 32, 2


# --- long prompts, offline ----------------------------------------------------------------


def book_prompts(tokenizer, num_prompts: int, length: int, rows=None) -> list[torch.Tensor]:
    """``num_prompts`` passages of exactly ``length`` tokens, one per play (test split).

    Each passage starts at a line a third of the way into the play (past the cast list).
    """
    if rows is None:
        from .data import load_data

        rows = load_data("books")["test"]
    prompts = []
    for row in rows:
        text = row["text"]
        start = text.find("\n", len(text) // 3) + 1
        ids = tokenizer(text[start : start + 8 * length + 200], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            prompts.append(torch.tensor(ids[:length]))
        if len(prompts) == num_prompts:
            return prompts
    raise ValueError(
        f"only {len(prompts)} of the texts have {length} tokens after their first third; "
        f"ask for fewer prompts (num_prompts={num_prompts}) or shorter ones"
    )


def _mmlu_question(row, with_answer: bool) -> str:
    lines = [row["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"])]
    answer = f" {'ABCD'[row['label']]}\n\n" if with_answer else ""
    return "\n".join(lines) + "\nAnswer:" + answer


def mmlu_prompts(tokenizer, num_prompts: int, length: int, rows=None) -> list[torch.Tensor]:
    """Many-shot multiple-choice prompts of exactly ``length`` tokens (validation split).

    Subjects are taken largest first; a prompt is a header, as many answered questions of the
    subject as fit, and the subject's shortest question ending in "Answer:". When the shots
    overflow, the earliest are cut (the header and the last question stay whole). Subjects
    without enough text for ``length`` tokens are skipped.
    """
    if rows is None:
        from .data import load_data

        rows = load_data("mmlu")["validation"]
    by_subject: dict[str, list] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = []
    for subject in sorted(by_subject, key=lambda s: (-len(by_subject[s]), s)):
        questions = by_subject[subject]
        last = min(questions, key=lambda row: len(_mmlu_question(row, with_answer=False)))
        header = encode(f"The following are multiple choice questions (with answers) about {subject}.\n\n")
        question = encode(_mmlu_question(last, with_answer=False))
        room = length - len(header) - len(question)
        body: list[int] = []
        for shot in questions:
            if len(body) >= room:
                break
            if shot is not last:
                body += encode(_mmlu_question(shot, with_answer=True))
        if room > 0 and len(body) >= room:
            prompts.append(torch.tensor(header + body[len(body) - room :] + question))
        if len(prompts) == num_prompts:
            return prompts
    raise ValueError(
        f"only {len(prompts)} subjects have enough questions for a {length}-token prompt; "
        f"ask for fewer prompts (num_prompts={num_prompts}) or shorter ones"
    )


def long_prompts(tokenizer, num_prompts: int, length: int, source: str = "mixed") -> list[torch.Tensor]:
    """Prompts of ``length`` tokens: ``books``, ``mmlu``, or ``mixed`` (half each, books first)."""
    if source == "books":
        return book_prompts(tokenizer, num_prompts, length)
    if source == "mmlu":
        return mmlu_prompts(tokenizer, num_prompts, length)
    if source == "mixed":
        books = (num_prompts + 1) // 2
        return book_prompts(tokenizer, books, length) + mmlu_prompts(tokenizer, num_prompts - books, length)
    raise KVConfigError(f"unknown prompt source {source!r}; known: {', '.join(PROMPT_SOURCES)}")


# --- run configs --------------------------------------------------------------------------


def model_slug(model: str) -> str:
    """A model name as it appears in file names (``facebook/opt-125m`` -> ``facebook--opt-125m``)."""
    return model.replace("/", "--")


@dataclass(frozen=True)
class RunConfig:
    """One run: a method (and its knobs) on a model, over budgets and prompts."""

    name: str  # the file name without .json
    model: str
    method: str
    method_config: dict = field(default_factory=dict)
    dtype: str = "float32"
    budgets: tuple = DEFAULT_BUDGETS
    max_length: int = 512  # prompt tokens (full mode)
    new_tokens: int = 64  # continuation tokens (full mode)
    num_prompts: int = 6
    prompts: str = "mixed"

    @property
    def label(self) -> str:
        """The name without the model: ``snapkv``, ``quantize-4bit``..."""
        prefix = model_slug(self.model) + "-"
        return self.name[len(prefix):] if self.name.startswith(prefix) else self.name

    def methods(self) -> list[KVMethod]:
        """One method object per budget (a single one for methods without a budget)."""
        if not make_method(self.method, self.method_config).uses_budget:
            return [make_method(self.method, self.method_config)]
        return [make_method(self.method, self.method_config, budget=b) for b in self.budgets]

    def sizes(self) -> tuple[int, int, int]:
        """(prompt tokens, new tokens, prompts) for the current mode (fast mode caps them)."""
        size = get_settings().size
        return (
            size(full=self.max_length, fast=min(self.max_length, FAST_MAX_LENGTH)),
            size(full=self.new_tokens, fast=min(self.new_tokens, FAST_NEW_TOKENS)),
            size(full=self.num_prompts, fast=min(self.num_prompts, FAST_NUM_PROMPTS)),
        )


_CONFIG_TYPES = {"model": str, "method": str, "method_config": dict, "dtype": str, "budgets": list,
                 "max_length": int, "new_tokens": int, "num_prompts": int, "prompts": str}
_TYPE_NAMES = {str: "a string", dict: "a JSON object", list: "a list", int: "an integer"}


def run_config_from_dict(data, name: str) -> RunConfig:
    """Validate a config dict (a file's content) and build the run; errors name the fix."""
    where = f"run config {name!r}"
    if not isinstance(data, dict):
        raise KVConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_CONFIG_TYPES))
    if unknown:
        raise KVConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(_CONFIG_TYPES)}")
    for key in ("model", "method"):
        if key not in data:
            raise KVConfigError(f"{where}: missing required key {key!r}")
    for key, kind in _CONFIG_TYPES.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise KVConfigError(f"{where}: {key!r} must be {_TYPE_NAMES[kind]}, got {data[key]!r}")
    for key in ("max_length", "new_tokens", "num_prompts"):
        if key in data and data[key] < 1 + (key == "max_length"):
            raise KVConfigError(f"{where}: {key!r} is too small ({data[key]})")
    if data.get("dtype", "float32") not in DTYPES:
        raise KVConfigError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {data['dtype']!r}")
    if data.get("prompts", "mixed") not in PROMPT_SOURCES:
        raise KVConfigError(f"{where}: prompts must be one of {', '.join(PROMPT_SOURCES)}, got {data['prompts']!r}")
    method = make_method(data["method"], data.get("method_config"))  # checks the name and knobs
    if "budget" in data.get("method_config", {}):
        raise KVConfigError(f"{where}: put budgets in the 'budgets' list, not in method_config")
    if "budgets" in data:
        if not method.uses_budget:
            raise KVConfigError(f"{where}: method {data['method']!r} takes no budget; remove 'budgets'")
        if not data["budgets"]:
            raise KVConfigError(f"{where}: 'budgets' is empty; give fractions in (0, 1]")
        for budget in data["budgets"]:
            make_method(data["method"], data.get("method_config"), budget=budget)  # range check
    expected = f"{model_slug(data['model'])}-{data['method']}"
    if name != expected and not name.startswith(expected + "-"):
        raise KVConfigError(
            f"{where}: the file name must be {expected}.json (or {expected}-VARIANT.json) "
            "to match its model and method"
        )
    fields = {**data, "budgets": tuple(data["budgets"])} if "budgets" in data else dict(data)
    return RunConfig(name=name, **fields)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise KVConfigError(f"{path}: not valid JSON ({error})") from None
    return run_config_from_dict(data, path.stem)


def load_run_configs(source: str | Path, model: str | None = None) -> list[RunConfig]:
    """Every ``*.json`` run config of a folder (or one file), sorted by name.

    With ``model``, the runs are retargeted to that model (same methods and knobs), which is
    how a notebook runs the course's configs on whatever ``COURSE_MODEL`` names.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(source.glob("*.json"))
        if not paths:
            raise FileNotFoundError(f"no *.json run configs in {source}")
    else:
        paths = [source]
    configs = [load_run_config(path) for path in paths]
    if model is None:
        return configs
    retargeted = {}
    for config in configs:
        name = f"{model_slug(model)}-{config.label}"
        retargeted.setdefault(name, replace(config, name=name, model=model))
    return list(retargeted.values())


# --- the resumable runner -----------------------------------------------------------------


def default_results_dir() -> Path:
    """``outputs/kv/{fast|full}``: fast and full runs never mix."""
    return REPO_ROOT / "outputs" / "kv" / get_settings().mode


def run_key(config: RunConfig, method: KVMethod) -> str:
    """What makes a run unique: model, dtype, method knobs (with the budget) and sizes."""
    identity = {"model": config.model, "dtype": config.dtype, "method": method.name,
                "knobs": method.config(), "sizes": config.sizes(), "prompts": config.prompts}
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_results(results_dir: str | Path) -> list[dict]:
    """Rows of ``results.jsonl`` (empty if there is none yet)."""
    path = Path(results_dir) / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_csv(rows: list[dict], path: str | Path) -> None:
    if not rows:
        return
    columns = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})


def _row(config: RunConfig, method: KVMethod, key: str, result: FidelityResult) -> dict:
    prompt_tokens, new_tokens, num_prompts = config.sizes()
    return {
        "key": key, "run": config.name, "label": config.label, "model": config.model,
        "dtype": config.dtype, "method": method.name, "budget": getattr(method, "budget", None),
        "knobs": method.config(), "prompts": config.prompts, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "num_prompts": num_prompts, "mode": get_settings().mode,
        **{k: v for k, v in result.as_row().items() if k not in ("method", "config")},
    }


def _check_states(states: list[PromptState], prompts: list[torch.Tensor], new_tokens: int) -> None:
    """Prepared states must hold exactly the prompts (and continuation length) a config asks for."""
    same = len(states) == len(prompts) and all(
        torch.equal(state.prompt_ids, prompt) and len(state.continuation) == new_tokens
        for state, prompt in zip(states, prompts)
    )
    if not same:
        raise KVConfigError(
            f"the prepared states are not this config's {len(prompts)} prompts of {len(prompts[0])} tokens "
            f"+ {new_tokens}; prepare them from long_prompts(...) with the sizes of config.sizes()"
        )


def run_configs(configs: list[RunConfig], results_dir: str | Path | None = None,
                model=None, tokenizer=None, states: list[PromptState] | None = None,
                progress: bool = True) -> list[dict]:
    """Run every (config, budget) not yet in ``results_dir/results.jsonl``; return the rows of
    these configs (old and new) in config order, and rewrite ``results.csv``.

    Runs sharing a model, dtype and prompts share one set of prepared prompts. Pass ``model``
    and ``tokenizer`` to use an already loaded model (every config must then name the same model),
    and ``states`` to reuse prompts already prepared with it for these configs' sizes.
    """
    from .models import load_lm

    results_dir = Path(results_dir) if results_dir is not None else default_results_dir()
    results_dir.mkdir(parents=True, exist_ok=True)
    if (model is None) != (tokenizer is None):
        raise KVConfigError("pass both model and tokenizer (or neither, to load each config's model)")
    if states is not None and model is None:
        raise KVConfigError("prepared states need the model they were prepared with: pass model and tokenizer")
    if model is not None and len({c.model for c in configs}) > 1:
        raise KVConfigError("a loaded model was passed but the configs name several models; "
                            "use load_run_configs(folder, model=NAME)")
    done = {row["key"]: row for row in read_results(results_dir)}
    plan = [(config, method, run_key(config, method)) for config in configs for method in config.methods()]
    todo = [item for item in plan if item[2] not in done]
    groups: dict[tuple, list] = {}
    for item in todo:
        config = item[0]
        groups.setdefault((config.model, config.dtype, config.prompts, config.sizes()), []).append(item)
    bar = tqdm(total=len(todo), desc="kv runs", disable=not progress)
    with open(results_dir / "results.jsonl", "a", encoding="utf-8") as out:
        for (name, dtype, source, (length, new_tokens, count)), items in groups.items():
            if model is not None:
                lm, tok = model, tokenizer
                if next(lm.parameters()).dtype != DTYPES[dtype]:
                    raise KVConfigError(f"the configs ask for {dtype} but the model passed is "
                                        f"{next(lm.parameters()).dtype}; convert it or change 'dtype'")
            else:
                lm, tok = load_lm(name)
                lm = lm.to(DTYPES[dtype])
            prompts = long_prompts(tok, count, length, source)
            if states is not None:
                _check_states(states, prompts, new_tokens)
                prepared = states
            else:
                prepared = prepare_prompts(lm, prompts, new_tokens, progress=progress)
            for config, method, key in items:
                bar.set_postfix_str(f"{config.label} {getattr(method, 'budget', '')}")
                row = _row(config, method, key, evaluate(lm, prepared, method))
                out.write(json.dumps(row) + "\n")
                out.flush()
                done[key] = row
                bar.update()
    bar.close()
    rows = [done[key] for _, _, key in plan]
    write_csv(list(done.values()), results_dir / "results.csv")
    return rows


# --- plots --------------------------------------------------------------------------------

METRIC_TITLES = {"top1": "top-1 agreement", "top5": "top-5 agreement",
                 "kl": "mean KL(full || compressed)", "first_disagreement": "first disagreement (token)"}


def plot_fidelity(rows: list[dict], metrics=("top1", "top5", "kl"), x: str = "budget", path=None):
    """One panel per metric; a line per budgeted method, a square per method without budget.

    ``x="budget"`` plots against the kept fraction of the prompt's positions (methods without
    a budget, ``full`` and ``quantize``, sit at the fraction of bytes they keep);
    ``x="cache_fraction"`` against the cache bytes kept, where all methods compare. KL is on
    a log scale, so zero values (``full``) are left out of that panel.
    """
    import matplotlib.pyplot as plt

    if x not in ("budget", "cache_fraction"):
        raise ValueError("x must be 'budget' or 'cache_fraction'")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.6, 3.6), squeeze=False)
    labels = list(dict.fromkeys(row["label"] for row in rows))
    # One fixed colour per method in every panel: black for full, tab10/tab20 for the others.
    palette = plt.get_cmap("tab10" if len(labels) <= 11 else "tab20").colors
    others = iter(palette)
    colours = {label: "black" if label == "full" else next(others) for label in labels}
    for ax, metric in zip(axes[0], metrics):
        for label in labels:
            points = sorted(
                (row["budget"] if x == "budget" and row["budget"] is not None else row["cache_fraction"],
                 row[metric])
                for row in rows if row["label"] == label
            )
            if metric == "kl":
                points = [(a, b) for a, b in points if b > 0]
            if not points:
                continue
            xs, ys = zip(*points)
            line = len(set(xs)) > 1  # a method that saves no bytes is a column of dots, not a line
            ax.plot(xs, ys, "-o" if line else ("o" if len(xs) > 1 else "s"), color=colours[label],
                    label=label, markersize=4 if line or len(xs) > 1 else 6)
        ax.set_title(METRIC_TITLES.get(metric, metric))
        ax.set_xlabel("budget (fraction of prompt cache kept)" if x == "budget" else "cache bytes kept (fraction)")
        if metric == "kl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend([handles[label] for label in labels if label in handles], [l for l in labels if l in handles],
               loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# --- command line -------------------------------------------------------------------------


def summary(rows: list[dict]) -> str:
    """A plain-text table: one line per run and budget."""
    lines = [f"{'run':<24} {'budget':>6} {'top1':>6} {'top5':>6} {'KL':>8} {'cache MB':>9} {'s':>6}"]
    for row in rows:
        budget = "-" if row["budget"] is None else f"{row['budget']:.2f}"
        lines.append(f"{row['label']:<24} {budget:>6} {row['top1']:>6.3f} {row['top5']:>6.3f} "
                     f"{row['kl']:>8.4f} {row['cache_bytes'] / 2**20:>9.2f} {row['seconds']:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.kv", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a folder (or file) of {model}-{method}.json configs")
    run.add_argument("configs", help="folder of run configs, or one config file")
    run.add_argument("--results", help="results folder (default outputs/kv/{fast|full})")
    run.add_argument("--model", help="run the configs' methods on this model instead")
    commands.add_parser("methods", help="list the methods and their knobs")
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
    print(f"results: {results_dir / 'results.jsonl'}, {results_dir / 'results.csv'}, {results_dir / 'fidelity.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
