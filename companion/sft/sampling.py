"""Diverse queries, the self-sampled cache, and mixing it with the task rows.

DELIA's diverse data are the model's *own* answers to unrelated queries, sampled as the
paper samples them (temperature 0.7, top-p 0.95). ``diverse_queries`` picks queries
round-robin over chatterbot's categories and MMLU's subject groups (train splits);
``build_cache`` samples answers in batches into a JSON-lines file that an interrupted run
resumes (``companion.records``: a torn last line is set aside, rows never glue together).
The same cache, with ``greedy=True``, holds the base model's own answers along which
forgetting is measured.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..chat import generate_replies
from ..config import cache_path, get_settings
from ..models import model_name, model_slug
from ..progress import progress as progress_bar
from ..prompting import multiple_choice_text
from ..records import append_record, read_records


class CacheError(ValueError):
    """The self-sampled cache file is malformed or belongs to another model; the message says which line."""


# MMLU's 57 subjects in the four groups of the MMLU paper (Hendrycks et al., 2021).
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract algebra", "astronomy", "college biology", "college chemistry",
        "college computer science", "college mathematics", "college physics", "computer security",
        "conceptual physics", "electrical engineering", "elementary mathematics", "high school biology",
        "high school chemistry", "high school computer science", "high school mathematics",
        "high school physics", "high school statistics", "machine learning",
    ),
    "humanities": (
        "formal logic", "high school european history", "high school us history",
        "high school world history", "international law", "jurisprudence", "logical fallacies",
        "moral disputes", "moral scenarios", "philosophy", "prehistory", "professional law",
        "world religions",
    ),
    "social sciences": (
        "econometrics", "high school geography", "high school government and politics",
        "high school macroeconomics", "high school microeconomics", "high school psychology",
        "human sexuality", "professional psychology", "public relations", "security studies",
        "sociology", "us foreign policy",
    ),
    "other": (
        "anatomy", "business ethics", "clinical knowledge", "college medicine", "global facts",
        "human aging", "management", "marketing", "medical genetics", "miscellaneous", "nutrition",
        "professional accounting", "professional medicine", "virology",
    ),
}
_SUBJECT_GROUP = {subject: group for group, subjects in MMLU_GROUPS.items() for subject in subjects}


def mmlu_group(subject: str) -> str:
    key = subject.strip().lower().replace("_", " ")
    if key not in _SUBJECT_GROUP:
        raise ValueError(f"MMLU subject {subject!r} is in no group; add it to companion.sft.MMLU_GROUPS")
    return _SUBJECT_GROUP[key]


def query_pool(max_chars: int = 300) -> list[dict]:
    """Every candidate diverse query: chatterbot questions (21 categories) and MMLU questions.

    Drawn from the *train* splits, so they never overlap the held-out rows forgetting is
    measured on; ``short_qa`` reuses some chatterbot trivia, so its validation and test
    questions are left out as well. Queries longer than ``max_chars`` are left out.
    """
    from ..data import load_data

    short_qa = load_data("short_qa")
    held_out = set(short_qa["validation"]["id"]) | set(short_qa["test"]["id"])
    pool = []
    for row in load_data("chatterbot_qa")["train"]:
        if row["id"] in held_out:
            continue
        pool.append({"id": row["id"], "category": f"chat/{row['category']}", "query": row["question"]})
    for row in load_data("mmlu")["train"]:
        pool.append({"id": row["id"], "category": f"mmlu/{mmlu_group(row['subject'])}",
                     "query": multiple_choice_text(row["question"], row["choices"])})
    return [q for q in pool if 0 < len(q["query"]) <= max_chars]


def diverse_queries(n: int, *, seed: int = 0, pool: Sequence[Mapping] | None = None,
                    exclude_categories: Iterable[str] = ()) -> list[dict]:
    """``n`` queries spread evenly over the pool's categories (round robin, seeded).

    Without the round robin most queries would be chatterbot's tech-support questions,
    which are half of its rows: the point of the cache is diversity.
    """
    pool = list(query_pool() if pool is None else pool)
    excluded = set(exclude_categories)
    by_category: dict[str, list[dict]] = defaultdict(list)
    for query in pool:
        if query["category"] not in excluded:
            by_category[query["category"]].append(dict(query))
    available = sum(len(v) for v in by_category.values())
    if n > available:
        raise ValueError(f"asked for {n} diverse queries but the pool has only {available}")
    rng = random.Random(seed)
    queues = []
    for category in sorted(by_category):
        rows = by_category[category]
        rng.shuffle(rows)
        queues.append(rows)
    picked: list[dict] = []
    while len(picked) < n:
        rng.shuffle(queues)
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return picked


def default_cache_file(model, *, max_new_tokens: int = 48, temperature: float = 0.7, top_p: float = 0.95,
                       greedy: bool = False) -> Path:
    """``<course cache>/sft/<sampling>-<model>-....jsonl``: one cache per model and setting."""
    setting = "greedy" if greedy else f"t{temperature:g}-p{top_p:g}"
    kind = "base-answers" if greedy else "selfsample"
    return cache_path("sft") / f"{kind}-{model_slug(model)}-n{max_new_tokens}-{setting}.jsonl"


CACHE_FIELDS = ("id", "category", "query", "response", "model")


def read_cache(path: str | Path) -> list[dict]:
    """The rows of a self-sampled cache (a torn last line is set aside with a warning).

    A row without the cache's string fields raises ``CacheError`` naming its line.
    """
    path = Path(path)
    rows = read_records(path, what="self-sampled cache")
    for number, row in enumerate(rows, start=1):
        if any(not isinstance(row.get(k), str) for k in CACHE_FIELDS):
            raise CacheError(
                f"{path}: row {number} ({str(row)[:60]}): a cache row needs string fields {list(CACHE_FIELDS)}; "
                "delete that line (or the file) and run build_cache again"
            )
    return rows


def batch_seed(seed: int, query_id: str) -> int:
    """A sampling seed for the batch that starts with ``query_id``: a real hash, so ids that
    are anagrams of each other ("ab", "ba") get different seeds."""
    digest = hashlib.sha256(f"{seed}:{query_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


def build_cache(model, tokenizer, queries: Sequence[Mapping], path: str | Path | None = None, *,
                batch_size: int = 8, max_new_tokens: int = 48, temperature: float = 0.7, top_p: float = 0.95,
                greedy: bool = False, seed: int | None = None, progress: bool = True) -> list[dict]:
    """The model's answers to ``queries`` (sampled, or ``greedy``), cached in a JSONL file; resumable.

    Queries whose id is already in the cache are skipped, so an interrupted build picks up
    where it stopped and a bigger request only samples the new queries. Each finished
    row is appended whole (``records.append_record``). Returns the rows of ``queries``, in order.
    """
    if path is None:
        path = default_cache_file(model, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, greedy=greedy)
    path = Path(path)
    for number, query in enumerate(queries):
        if not isinstance(query, Mapping) or not {"id", "query"} <= set(query):
            raise ValueError(f"query {number} needs 'id' and 'query' fields (as diverse_queries makes), got {query!r}")
    ids = [str(q["id"]) for q in queries]
    if len(set(ids)) != len(ids):
        raise ValueError("queries have duplicate ids; each query needs its own id")
    name = model_name(model)
    cached = {row["id"]: row for row in read_cache(path)}
    others = {row["model"] for row in cached.values()} - {name}
    if others:
        raise CacheError(f"{path} holds samples of {sorted(others)}, not of {name!r}; pass another path "
                         "(default_cache_file(model) is per model)")
    todo = [dict(q) for q in queries if str(q["id"]) not in cached]
    seed = get_settings().seed if seed is None else seed
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    what = "base answers" if greedy else "self-sampling"
    for batch in progress_bar(batches, desc=what, disable=not progress or not batches):
        # A seed per batch (a hash of its first query's id) makes each batch's samples
        # repeatable, whether or not the build was interrupted before it.
        with torch.random.fork_rng():
            torch.manual_seed(batch_seed(seed, str(batch[0]["id"])))
            replies = generate_replies(
                model, tokenizer, [[{"role": "user", "content": q["query"]}] for q in batch],
                max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature,
                top_p=top_p, batch_size=len(batch),
            )
        for query, reply in zip(batch, replies):
            row = {"id": str(query["id"]), "category": str(query.get("category", "")),
                   "query": query["query"], "response": reply, "model": name}
            append_record(path, row)
            cached[row["id"]] = row
    return [cached[i] for i in ids]


def cache_rows_to_sft(cache_rows: Iterable[Mapping]) -> list[dict]:
    """Cached samples as prompt/completion rows (dropping empty responses)."""
    return [
        {"id": row["id"], "category": row["category"], "source": "diverse",
         "prompt": [{"role": "user", "content": row["query"]}],
         "completion": [{"role": "assistant", "content": row["response"]}]}
        for row in cache_rows if row["response"].strip()
    ]


def mix(task_rows: Sequence[Mapping], diverse_rows: Sequence[Mapping], ratio: float, *,
        seed: int | None = None) -> list[dict]:
    """All task rows plus ``round(ratio * len(task_rows))`` diverse rows, shuffled (seeded).

    ``diverse_rows`` may be cache rows (query/response) or prompt/completion rows.
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    diverse = [dict(r) if "prompt" in r else cache_rows_to_sft([r])[0] for r in diverse_rows
               if "prompt" in r or r["response"].strip()]
    wanted = round(ratio * len(task_rows))
    if wanted > len(diverse):
        raise ValueError(
            f"ratio {ratio} x {len(task_rows)} task rows needs {wanted} diverse rows but only "
            f"{len(diverse)} are given; build the cache with more queries"
        )
    rng = random.Random(get_settings().seed if seed is None else seed)
    rows = [{**dict(r), "source": "task"} for r in task_rows] + rng.sample(diverse, wanted)
    rng.shuffle(rows)
    return rows
