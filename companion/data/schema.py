"""One schema per dataset kind, the row check, and JSON-lines reading that names file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..records import json_lines as _json_lines

SPLIT_SEED = 1234
SPLITS = ("train", "validation", "test")

SCHEMAS: dict[str, dict[str, type]] = {
    "qa": {"id": str, "question": str, "answer": str, "category": str},
    "multiple_choice": {"id": str, "question": str, "choices": list, "label": int, "subject": str},
    "classification": {"id": str, "text": str, "label": str},
    "long_text": {"id": str, "title": str, "text": str},
}


class DataError(ValueError):
    """A dataset is missing or malformed; the message names the file, line and fix."""


def validate_row(row: Any, kind: str, where: str, labels: Iterable[str] = ()) -> dict:
    """Check one row against its kind's schema; ``where`` (file:line) goes into the error."""
    if kind not in SCHEMAS:
        raise DataError(f"unknown dataset kind {kind!r}; known: {', '.join(SCHEMAS)}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name, expected in SCHEMAS[kind].items():
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (a {kind} row needs {list(SCHEMAS[kind])})")
        if not isinstance(row[name], expected) or isinstance(row[name], bool):
            raise DataError(
                f"{where}: field {name!r} should be {expected.__name__}, got {row[name]!r}"
            )
        if expected is str and name != "id" and not row[name].strip():
            raise DataError(f"{where}: field {name!r} is empty")
    if kind == "multiple_choice":
        choices = row["choices"]
        if len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be 4 strings, got {choices!r}")
        if not 0 <= row["label"] < 4:
            raise DataError(f"{where}: 'label' must be 0..3, got {row['label']}")
    labels = tuple(labels)
    if kind == "classification" and labels and row["label"] not in labels:
        raise DataError(f"{where}: label {row['label']!r} is not one of {list(labels)}")
    return {name: row[name] for name in SCHEMAS[kind]}


def json_lines(path: str | Path, error: type[Exception] = DataError, hint: str = ""):
    """``records.json_lines`` raising ``DataError`` by default (errors name file and line)."""
    return _json_lines(path, error, hint)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; a malformed line raises ``DataError`` naming its line number."""
    return [row for _, row in json_lines(path)]


def load_jsonl(path: str | Path, kind: str, labels: Iterable[str] = ()) -> list[dict]:
    """Read and validate a JSON-lines file of one kind (errors name file and line)."""
    return [validate_row(row, kind, f"{path}:{number}", labels) for number, row in json_lines(path)]
