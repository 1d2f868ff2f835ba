"""What narrow tuning costs elsewhere, measured on held-out rows no recipe trained on.

- ``forgetting_kl``: (a) mean KL(base || tuned) of the next-token distributions along the
  base model's own (greedy) answers to held-out queries, one teacher-forced forward per
  sequence and model; the base is the tuned model with its adapter switched off.
- ``text_cross_entropy``: (b) cross-entropy on held-out human-written text (book passages,
  chatterbot's human answers); forgetting is its increase over the base model, as PEFT's
  method comparison measures it.
- ``qa_replies`` / ``qa_correct``: (c) short-answer QA (the reply contains the answer) and
  (d) format leakage, the share of those plain questions answered in JSON.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..chat import generate_replies
from ..prompting import normalize_answer
from .task import looks_like_json


def _prompt_ids(tokenizer, conversation) -> list[int]:
    if conversation is None:
        return []
    return tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def continuation_logits(model, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
    """``[len(target), vocab]`` logits predicting each target token after the prompt (teacher forced).

    With no prompt, the first target token is the context and is not predicted.
    """
    ids = torch.tensor([list(prompt_ids) + list(target_ids)])
    start = max(len(prompt_ids), 1) - 1
    # only the positions that predict a target token (and the last one, dropped) reach the head
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=ids.shape[1] - start).logits[0, :-1]
    return logits.float()


def _base_of(model, base):
    if base is not None:
        return contextlib.nullcontext(base)
    if hasattr(model, "disable_adapter"):
        @contextlib.contextmanager
        def switched_off():
            with model.disable_adapter():
                yield model
        return switched_off()
    return contextlib.nullcontext(model)  # an untuned model is its own base


@torch.no_grad()
def forgetting_kl(model, tokenizer, rows: Sequence[Mapping], *, base=None, max_answer_tokens: int = 64) -> list[float]:
    """Per row, mean KL(base || model) over the answer tokens of ``row["response"]`` to ``row["query"]``.

    ``rows`` are cache rows of the base model's own answers (``build_cache(..., greedy=True)``).
    ``base`` defaults to ``model`` with its PEFT adapter switched off (``disable_adapter()``),
    and to ``model`` itself when it has no adapter (KL 0).
    """
    if not rows:
        raise ValueError("no rows to measure KL on")
    was_training = model.training
    model.eval()
    values = []
    try:
        for row in rows:
            prompt = _prompt_ids(tokenizer, [{"role": "user", "content": row["query"]}])
            answer = tokenizer(row["response"], add_special_tokens=False)["input_ids"][:max_answer_tokens]
            if not answer:
                raise ValueError(f"row {row.get('id')!r} has an empty response; KL needs answer tokens")
            tuned = F.log_softmax(continuation_logits(model, prompt, answer), -1)
            with _base_of(model, base) as reference:
                reference_logits = continuation_logits(reference, prompt, answer)
            teacher = F.log_softmax(reference_logits, -1)
            kl = (teacher.exp() * (teacher - tuned)).sum(-1)
            values.append(float(kl.clamp_min(0).mean()))
    finally:
        model.train(was_training)
    return values


@torch.no_grad()
def text_cross_entropy(model, tokenizer, items: Sequence[Mapping], *, max_tokens: int = 128) -> list[float]:
    """Per item, mean cross-entropy (nats/token) of ``item["text"]`` after ``item.get("prompt")``.

    A prompt is a conversation (the text is then the assistant's reply); without one the
    text is scored as plain text from its second token on.
    """
    if not items:
        raise ValueError("no texts to score")
    was_training = model.training
    model.eval()
    values = []
    try:
        for item in items:
            prompt = _prompt_ids(tokenizer, item.get("prompt"))
            target = tokenizer(item["text"], add_special_tokens=False)["input_ids"][:max_tokens]
            if len(target) < (1 if prompt else 2):
                raise ValueError(f"text {item.get('id')!r} is too short to score")
            logits = continuation_logits(model, prompt, target)
            scored = target if prompt else target[1:]
            values.append(float(F.cross_entropy(logits, torch.tensor(scored))))
    finally:
        model.train(was_training)
    return values


def heldout_texts(num_passages: int, num_answers: int, *, seed: int = 0, passage_chars: int = 500) -> list[dict]:
    """Human-written text no recipe trains on: book passages (test split) and chatterbot's
    human answers to its test questions (scored as the reply to the question)."""
    from ..data import load_data

    rng = random.Random(seed)
    books = list(load_data("books")["test"])
    items = []
    for number in range(num_passages):
        book = books[number % len(books)]
        text = book["text"]
        begin = rng.randrange(len(text) // 10, max(len(text) - passage_chars, len(text) // 10 + 1))
        passage = " ".join(text[begin:begin + passage_chars].split()[1:-1])  # whole words only
        items.append({"id": f"{book['id']}@{begin}", "kind": "book", "text": passage})
    answers = list(load_data("chatterbot_qa")["test"])
    rng.shuffle(answers)
    for row in answers[:num_answers]:
        items.append({"id": row["id"], "kind": "chat answer", "text": row["answer"],
                      "prompt": [{"role": "user", "content": row["question"]}]})
    return items


def kl_queries(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` held-out queries (chatterbot *test* questions, round robin over categories)."""
    from ..data import load_data
    from .sampling import diverse_queries

    pool = [{"id": r["id"], "category": r["category"], "query": r["question"]}
            for r in load_data("chatterbot_qa")["test"]]
    return diverse_queries(n, seed=seed, pool=pool)


def qa_replies(model, tokenizer, qa_rows: Sequence[Mapping], *, batch_size: int = 16,
               max_new_tokens: int = 16) -> list[str]:
    """Greedy replies to the plain QA questions (no instruction about any format)."""
    return generate_replies(model, tokenizer, [[{"role": "user", "content": r["question"]}] for r in qa_rows],
                            max_new_tokens=max_new_tokens, batch_size=batch_size)


def answer_contained(reply: str, answer: str) -> float:
    """1.0 if the normalised answer appears as whole words in the normalised reply, else 0.0."""
    said, expected = f" {normalize_answer(reply)} ", f" {normalize_answer(answer)} "
    return float(bool(expected.strip()) and expected in said)


def qa_correct(replies: Sequence[str], qa_rows: Sequence[Mapping]) -> list[float]:
    return [answer_contained(reply, row["answer"]) for reply, row in zip(replies, qa_rows, strict=True)]


def json_leakage(replies: Sequence[str]) -> list[float]:
    """Per reply to a plain question, 1.0 if it is in JSON (the task's format leaking out)."""
    return [float(looks_like_json(reply)) for reply in replies]
