"""Run configs (one JSON file per run) and the resumable batch runner.

A run config is a file ``{model}-{method}[-{variant}].json`` holding the model, dtype, method,
method_config (its knobs), budgets (fractions of the prompt cache, or whole numbers of
positions), max_length, new_tokens, num_prompts and prompts (``companion.kv.prompts``). The
runner turns a folder of them into ``results.jsonl`` (one row per run and budget, appended as
it goes, so an interrupted run resumes) and ``results.csv``; two runners sharing a results
folder take turns (``companion.records.locked``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import REPO_ROOT, get_settings, shown_path
from ..models import model_name, model_slug
from ..progress import progress as progress_bar
from ..records import append_record, locked, read_records
from .harness import PromptState, evaluate, head_dim, prepare_prompts
from .methods import KVConfigError, KVMethod, check_budget, make_method
from .prompts import PROMPT_SOURCES, long_prompts

DEFAULT_BUDGETS = (0.1, 0.25, 0.5)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Fast mode (tests, CI) caps every run at these sizes.
FAST_MAX_LENGTH, FAST_NEW_TOKENS, FAST_NUM_PROMPTS = 128, 8, 3
RESULTS_FILE = "results.jsonl"


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
    new_tokens: int = 32  # continuation tokens (full mode)
    num_prompts: int = 24
    prompts: str = "suite"
    path: str | None = field(default=None, compare=False)  # the file it was read from

    @property
    def label(self) -> str:
        """The name without the model: ``snapkv``, ``quantize-4bit``..."""
        prefix = model_slug(self.model) + "-"
        return self.name[len(prefix):] if self.name.startswith(prefix) else self.name

    @property
    def where(self) -> str:
        """How error messages name this run: its file, or its name."""
        return self.path or f"run config {self.name!r}"

    def methods(self) -> list[KVMethod]:
        """One method object per budget (a single one for methods without a budget): the
        method is built once from its config and copied with each budget."""
        method = make_method(self.method, self.method_config)
        if not method.uses_budget:
            return [method]
        return [dataclasses.replace(method, budget=budget) for budget in self.budgets]

    def check_model(self, model) -> None:
        """Raise ``KVConfigError`` (naming the file) if a knob cannot work on ``model``."""
        for method in self.methods()[:1]:
            method.check_model(head_dim(model), where=f"{self.where}: ")

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


def run_config_from_dict(data, name: str, path: str | None = None) -> RunConfig:
    """Validate a config dict (a file's content) and build the run; errors name the file and the fix."""
    where = path or f"run config {name!r}"
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
    if data.get("prompts", "suite") not in PROMPT_SOURCES:
        raise KVConfigError(f"{where}: prompts must be one of {', '.join(PROMPT_SOURCES)}, got {data['prompts']!r}")
    try:
        method = make_method(data["method"], data.get("method_config"))  # checks the name and knobs
        if "budget" in data.get("method_config", {}):
            raise KVConfigError("put budgets in the 'budgets' list, not in method_config")
        if "budgets" in data:
            if not method.uses_budget:
                raise KVConfigError(f"method {data['method']!r} takes no budget; remove 'budgets'")
            if not data["budgets"]:
                raise KVConfigError("'budgets' is empty; give fractions in (0, 1] or numbers of positions")
            for budget in data["budgets"]:
                check_budget(data["method"], budget)
    except KVConfigError as error:
        raise KVConfigError(f"{where}: {error}") from None
    expected = f"{model_slug(data['model'])}-{data['method']}"
    if name != expected and not name.startswith(expected + "-"):
        raise KVConfigError(
            f"{where}: the file name must be {expected}.json (or {expected}-VARIANT.json) "
            "to match its model and method"
        )
    fields = {**data, "budgets": tuple(data["budgets"])} if "budgets" in data else dict(data)
    return RunConfig(name=name, path=path, **fields)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run config {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise KVConfigError(f"{shown_path(path)}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise KVConfigError(f"{shown_path(path)}: not valid JSON ({error})") from None
    return run_config_from_dict(data, path.stem, path=shown_path(path))


def load_run_configs(source: str | Path, model: str | None = None) -> list[RunConfig]:
    """Every ``*.json`` run config of a folder (or one file), sorted by name.

    With ``model``, the runs are retargeted to that model (same methods and knobs), which is
    how a notebook runs the course's configs on whatever ``COURSE_MODEL`` names. Two files
    that would become the same run (``a-h2o.json`` and ``b-h2o.json`` retargeted) are an error.
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
    retargeted: dict[str, RunConfig] = {}
    for config in configs:
        name = f"{model_slug(model)}-{config.label}"
        if name in retargeted:
            raise KVConfigError(
                f"{retargeted[name].where} and {config.where} both become run {name!r} on model {model!r}; "
                "give one a -VARIANT suffix or run one folder per model"
            )
        retargeted[name] = dataclasses.replace(config, name=name, model=model)
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
    """Rows of ``results.jsonl`` (empty if there is none yet; a torn last line is set aside)."""
    return read_records(Path(results_dir) / RESULTS_FILE, what="KV results file")


def write_csv(rows: list[dict], path: str | Path) -> None:
    """``rows`` as CSV, without the per-prompt lists (dicts become JSON)."""
    if not rows:
        return
    columns = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "per_prompt"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()})


def _row(config: RunConfig, method: KVMethod, key: str, result) -> dict:
    prompt_tokens, new_tokens, num_prompts = config.sizes()
    return {
        "key": key, "run": config.name, "label": config.label, "model": config.model,
        "dtype": config.dtype, "method": method.name, "budget": getattr(method, "budget", None),
        "knobs": method.config(), "prompts": config.prompts, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "num_prompts": num_prompts, "mode": get_settings().mode,
        **{k: v for k, v in result.as_row().items() if k not in ("method", "config")},
    }


def _check_states(states: list[PromptState], prompts, new_tokens: int) -> None:
    """Prepared states must hold exactly the prompts (and continuation length) a config asks for."""
    same = len(states) == len(prompts) and all(
        torch.equal(state.prompt_ids, prompt.ids) and len(state.continuation) == new_tokens
        for state, prompt in zip(states, prompts)
    )
    if not same:
        raise KVConfigError(
            f"the prepared states are not this config's {len(prompts)} prompts of {len(prompts[0])} tokens "
            f"+ {new_tokens}; prepare them from long_prompts(...) with the sizes of config.sizes()"
        )


def _check_arguments(configs, model, tokenizer, states) -> None:
    if not configs:
        raise KVConfigError("no run configs to run")
    if (model is None) != (tokenizer is None):
        raise KVConfigError("pass both model and tokenizer (or neither, to load each config's model)")
    if states is not None and model is None:
        raise KVConfigError("prepared states need the model they were prepared with: pass model and tokenizer")
    if model is None:
        return
    named = sorted({c.model for c in configs})
    if len(named) > 1:
        raise KVConfigError("a loaded model was passed but the configs name several models "
                            f"({', '.join(named)}); use load_run_configs(folder, model=NAME)")
    loaded = model_name(model)
    if named[0] != loaded:
        raise KVConfigError(f"the configs are for {named[0]!r} but the model passed is {loaded!r}; "
                            f"use load_run_configs(folder, model={loaded!r}) or pass {named[0]!r}")


def run_configs(configs: list[RunConfig], results_dir: str | Path | None = None,
                model=None, tokenizer=None, states: list[PromptState] | None = None,
                progress: bool = True) -> list[dict]:
    """Run every (config, budget) not yet in ``results_dir/results.jsonl``; return the rows of
    these configs (old and new) in config order, and rewrite ``results.csv``.

    Runs sharing a model, dtype and prompts share one set of prepared prompts. Pass ``model``
    and ``tokenizer`` to use an already loaded model (every config must name it), and
    ``states`` to reuse prompts already prepared with it for these configs' sizes. Every
    config is checked against its model before any row is computed.
    """
    from ..models import load_lm

    _check_arguments(configs, model, tokenizer, states)
    results_dir = Path(results_dir) if results_dir is not None else default_results_dir()
    with locked(results_dir):
        done = {row["key"]: row for row in read_results(results_dir)}
        plan = [(config, method, run_key(config, method)) for config in configs for method in config.methods()]
        todo = [item for item in plan if item[2] not in done]
        groups: dict[tuple, list] = {}
        for item in todo:
            config = item[0]
            groups.setdefault((config.model, config.dtype, config.prompts, config.sizes()), []).append(item)
        loaded: dict[tuple, tuple] = {}
        for name, dtype, _, _ in groups:  # load and check every model before computing anything
            if (name, dtype) in loaded:
                continue
            if model is not None:
                if next(model.parameters()).dtype != DTYPES[dtype]:
                    raise KVConfigError(f"the configs ask for {dtype} but the model passed is "
                                        f"{next(model.parameters()).dtype}; convert it or change 'dtype'")
                loaded[name, dtype] = (model, tokenizer)
            else:
                lm, tok = load_lm(name)
                loaded[name, dtype] = (lm.to(DTYPES[dtype]), tok)
        for config in {id(item[0]): item[0] for item in todo}.values():
            config.check_model(loaded[config.model, config.dtype][0])
        bar = progress_bar(total=len(todo), desc="kv runs", disable=not progress)
        for (name, dtype, source, (length, new_tokens, count)), items in groups.items():
            lm, tok = loaded[name, dtype]
            prompts = long_prompts(tok, count, length, source)
            if states is not None:
                _check_states(states, prompts, new_tokens)
                prepared = states
            else:
                prepared = prepare_prompts(lm, prompts, new_tokens, progress=progress, tokenizer=tok)
            for config, method, key in items:
                bar.set_postfix_str(f"{config.label} {getattr(method, 'budget', '')}")
                row = _row(config, method, key, evaluate(lm, prepared, method))
                append_record(results_dir / RESULTS_FILE, row)
                done[key] = row
                bar.update()
        bar.close()
        write_csv(list(done.values()), results_dir / "results.csv")
    return [done[key] for _, _, key in plan]
