"""Chip-tuning tasks and their prompts: task definitions from YAML, rows to prompts and labels.

A task file uses the reference format ``task_name: [label0, label1, ...]``
(``data/tasks/chips.yaml``); labels are listed in class-index order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import DATA_DIR

TASKS_FILE = DATA_DIR / "tasks" / "chips.yaml"


class TaskError(ValueError):
    """A task definition or a label is wrong; the message says what to fix."""


@dataclass(frozen=True)
class Task:
    """A classification task: a name and its label words, in class-index order.

    ``source`` is the file the task was read from (named in errors about its labels).
    """

    name: str
    labels: tuple[str, ...]
    source: str = field(default="", compare=False, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def index(self, label: str | int) -> int:
        """The class index of a label word (or of an index, checked to be in range)."""
        if isinstance(label, bool):
            raise TaskError(f"label {label!r} is a boolean; task {self.name!r} has labels {list(self.labels)}")
        if isinstance(label, int):
            if 0 <= label < self.num_classes:
                return label
            raise TaskError(
                f"label index {label} is out of range for task {self.name!r}, "
                f"which has {self.num_classes} labels {list(self.labels)}"
            )
        try:
            return self.labels.index(str(label))
        except ValueError:
            where = f" in {self.source}" if self.source else ""
            raise TaskError(
                f"label {label!r} is not in task {self.name!r} (labels: {', '.join(self.labels)}); "
                f"fix the data or the task's label list{where}"
            ) from None

    def encode(self, labels: Iterable[str | int]) -> torch.Tensor:
        """Label words (or indices) -> a LongTensor of class indices."""
        return torch.tensor([self.index(label) for label in labels], dtype=torch.long)

    def decode(self, indices: Iterable[int] | torch.Tensor) -> list[str]:
        return [self.labels[int(i)] for i in indices]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice (plain YAML keeps the last silently)."""


def _mapping_without_duplicates(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise TaskError(
                f"task {key!r} is defined twice (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                "keep one definition"
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_tasks(text: str, source: str = "<string>") -> dict[str, Task]:
    """Parse task definitions in the reference format ``task_name: [label0, label1, ...]``."""
    hint = "expected one line per task, like `MMLU: [A, B, C, D]`"
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except TaskError as error:
        raise TaskError(f"{source}: {error}") from None
    except yaml.YAMLError as error:
        raise TaskError(f"{source}: not valid YAML ({error}); {hint}") from None
    if not isinstance(data, dict) or not data:
        raise TaskError(f"{source}: expected a mapping of task names to label lists; {hint}")
    tasks = {}
    for name, labels in data.items():
        if not isinstance(name, str) or not name.strip():
            raise TaskError(f"{source}: task name {name!r} must be a non-empty string; {hint}")
        if not isinstance(labels, list) or len(labels) < 2:
            raise TaskError(
                f"{source}: task {name!r} needs a list of at least two labels, got {labels!r}; {hint}"
            )
        words = []
        for label in labels:
            if isinstance(label, bool):
                # YAML 1.1 reads yes/no/on/off/true/false as booleans: the spelling is lost.
                raise TaskError(
                    f"{source}: in task {name!r}, YAML read a label as the boolean {label}; "
                    "quote it (e.g. 'yes', 'no', 'true')"
                )
            if not isinstance(label, (str, int, float)) or str(label).strip() == "":
                raise TaskError(f"{source}: in task {name!r}, label {label!r} must be a non-empty word")
            if str(label) != str(label).strip():
                raise TaskError(
                    f"{source}: in task {name!r}, label {str(label)!r} has spaces around it; "
                    "remove them (the prompt adds the space before a label)"
                )
            words.append(str(label))
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise TaskError(f"{source}: task {name!r} lists labels more than once: {duplicates}")
        tasks[name] = Task(name, tuple(words), source)
    return tasks


def load_tasks(path: str | Path | None = None) -> dict[str, Task]:
    """Read task definitions from a YAML file (default: ``data/tasks/chips.yaml``)."""
    path = Path(path) if path is not None else TASKS_FILE
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; pass the path of a YAML file of tasks")
    return parse_tasks(path.read_text(encoding="utf-8"), source=str(path))


def get_task(name: str, path: str | Path | None = None) -> Task:
    """One task by name (case-insensitive if the exact name is not found)."""
    tasks = load_tasks(path)
    if name in tasks:
        return tasks[name]
    folded = {key.lower(): task for key, task in tasks.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    raise TaskError(f"unknown task {name!r}; known: {', '.join(tasks)} (from {path or TASKS_FILE})")


# --- prompts --------------------------------------------------------------------------------


def input_kind(row: Mapping) -> str:
    """Which prompt a dataset row gets: ``multiple_choice`` or ``classification``."""
    if not isinstance(row, Mapping):
        raise TaskError(f"expected a row as a JSON object, got {type(row).__name__}")
    if "choices" in row and "question" in row:
        return "multiple_choice"
    if "text" in row:
        return "classification"
    raise TaskError(
        f"cannot build a prompt from a row with fields {sorted(row)}; expected the "
        "multiple-choice schema (question, choices, label) or the classification one (text, label)"
    )


def _text_field(row: Mapping, name: str) -> str:
    value = row[name]
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"row {row.get('id', '?')}: field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def format_prompt(row: Mapping, task: Task) -> str:
    """The prompt for one row; it ends where the answer (a label word) would follow."""
    kind = input_kind(row)
    if kind == "multiple_choice":
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) != task.num_classes:
            count = len(choices) if isinstance(choices, list) else "no list of"
            raise TaskError(
                f"row {row.get('id', '?')} has {count} choices but task {task.name!r} "
                f"has {task.num_classes} labels {list(task.labels)}"
            )
        lines = [f"Question: {_text_field(row, 'question')}"]
        lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(task.labels, choices)]
        return "\n".join(lines) + "\nAnswer:"
    options = ", ".join(task.labels[:-1]) + " or " + task.labels[-1]
    return f"Text: {_text_field(row, 'text')}\nQuestion: What is the {task.name} of this text: {options}?\nAnswer:"


def format_prompts(rows: Iterable[Mapping], task: Task) -> list[str]:
    return [format_prompt(row, task) for row in rows]


def row_targets(rows: Iterable[Mapping], task: Task) -> torch.Tensor:
    """The class index of each row (an int label of a multiple-choice row, or a label word)."""
    return task.encode(row["label"] for row in rows)


def label_token_ids(tokenizer, task: Task) -> list[int]:
    """The first token of each label word as it follows ``Answer:`` (with a leading space).

    The baseline scores a label by the model's next-token logit of that token, so the
    labels' first tokens must differ.
    """
    ids = []
    for label in task.labels:
        tokens = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise TaskError(f"label {label!r} of task {task.name!r} tokenizes to nothing")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise TaskError(
            f"labels of task {task.name!r} share a first token ({ids}), so next-token scoring "
            "cannot tell them apart; use label words that start differently"
        )
    return ids


def load_rows(dataset, split: str, size: int | None = None) -> list[dict]:
    """The first ``size`` rows (all if ``None``) of one split of a dataset, as dicts.

    ``dataset`` is a ``companion.data`` name or a ``DatasetDict`` it returned.
    """
    from ..data import load_data

    splits = load_data(dataset) if isinstance(dataset, str) else dataset
    if split not in splits:
        raise ValueError(f"dataset has no split {split!r}; splits: {', '.join(splits)}")
    rows = splits[split]
    if size is not None:
        if size < 1:
            raise ValueError(f"sizes must be at least 1, got {size}")
        rows = rows.select(range(min(size, len(rows))))
    return rows.to_list()
