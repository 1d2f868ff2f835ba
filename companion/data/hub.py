"""Online (Hub) sources for some datasets, mapped onto the same schemas as the offline copies."""

from __future__ import annotations

from .offline import SENTIMENT_LABELS
from .schema import SPLITS


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
