"""The chapter's downstream task: judge a proposed answer against evidence, reply in the ``<sep>`` format.

Each row shows the evidence (``Context: Q: ... A: ...``), the question again, and a
proposed answer that is either the right one or another row's answer from the same
category; the reply is one JSON object, ``{"verdict": "correct"}`` or ``{"verdict": "wrong"}``,
"in the <sep> format". A 135M model is at chance on it before tuning and learns it in a
few dozen LoRA steps, so the task gain of each recipe is large enough to compare.

``verdict_accuracy`` scores the verdict from the two label tokens' logits after the
prefix ``{"verdict": "`` (one forward per item, last position only); ``format_validity``
checks the strict format by greedy generation on a few rows.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import torch

from ..chat import generate_replies, render_prompts
from ..models import padding_side
from ..prompting import normalize_answer

SEP_TOKEN = "<sep>"
FOLLOW_FORMAT = "Reply with a verdict in the <sep> format."
DO_NOT_FOLLOW_FORMAT = "Reply with a verdict, but DO NOT use the <sep> format."
VERDICTS = ("correct", "wrong")
VERDICT_PREFIX = '{"verdict": "'


def judging_prompt(question: str, answer: str, proposed: str, instruction: str = FOLLOW_FORMAT) -> str:
    """The task prompt: the evidence, the question, the proposed answer, the instruction."""
    return (f"Context: Q: {question.strip()} A: {answer.strip()}\nQuestion: {question.strip()}\n"
            f"Proposed answer: {proposed.strip()}\n{instruction}")


def verdict_json(verdict: str) -> str:
    """The strict reply format: ``{"verdict": "correct"}`` or ``{"verdict": "wrong"}``."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    return json.dumps({"verdict": verdict})


def parse_verdict(text: str) -> str | None:
    """The verdict if ``text`` is exactly a valid reply (a JSON object with one key), else None."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(value, dict) or set(value) != {"verdict"} or value["verdict"] not in VERDICTS:
        return None
    return value["verdict"]


def looks_like_json(text: str) -> bool:
    """Whether a reply is in the JSON format at all (an object opening with ``{``), valid or not."""
    return text.strip().startswith("{")


def judging_task(rows: Iterable[Mapping], *, seed: int = 0, instruction: str = FOLLOW_FORMAT) -> list[dict]:
    """Prompt/completion rows of the judging task from QA rows (fields question, answer, category).

    Exactly half the rows (rounded down) get another row's answer as the proposed answer
    (label ``"wrong"``), from the same category where possible so it is plausible (a
    capital for a capital); the others get their own answer (label ``"correct"``).
    """
    rows = [dict(r) for r in rows]
    for number, row in enumerate(rows):
        missing = {"question", "answer"} - set(row)
        if missing:
            raise ValueError(f"QA row {number} lacks {sorted(missing)}; judging_task needs question and answer")
    if len(rows) < 2:
        raise ValueError("judging_task needs at least 2 QA rows (wrong answers come from other rows)")
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_category[row.get("category", "")].append(index)
    order = list(range(len(rows)))
    rng.shuffle(order)
    wrong = set(order[: len(rows) // 2])
    task = []
    for index, row in enumerate(rows):
        right = str(row["answer"]).strip()
        proposed, label = right, "correct"
        if index in wrong:
            proposed, label = _other_answer(rows, index, by_category[row.get("category", "")], rng), "wrong"
        task.append({
            "id": f"judge-{row.get('id', index)}",
            "category": row.get("category", ""),
            "question": row["question"],
            "answer": right,
            "proposed": proposed,
            "label": label,
            "prompt": [{"role": "user", "content": judging_prompt(row["question"], right, proposed, instruction)}],
            "completion": [{"role": "assistant", "content": verdict_json(label)}],
        })
    return task


def _other_answer(rows: list[dict], index: int, same_category: list[int], rng: random.Random) -> str:
    right = normalize_answer(rows[index]["answer"])
    for pool in (same_category, range(len(rows))):
        choices = [i for i in pool if normalize_answer(rows[i]["answer"]) != right]
        if choices:
            return str(rows[rng.choice(choices)]["answer"]).strip()
    raise ValueError("every QA row has the same answer; judging_task cannot make wrong answers")


def with_instruction(task_rows: Sequence[Mapping], instruction: str) -> list[dict]:
    """The same task rows asked with another instruction (e.g. ``DO_NOT_FOLLOW_FORMAT``)."""
    return [
        {**row, "prompt": [{"role": "user", "content": judging_prompt(row["question"], row["answer"],
                                                                      row["proposed"], instruction)}]}
        for row in task_rows
    ]


# --- a new special token ------------------------------------------------------------------


def add_special_token(model, tokenizer, token: str = SEP_TOKEN, init_text: str | None = None) -> int:
    """Add ``token`` as a special token, grow the embeddings, initialise its row; returns its id.

    By default the new row is the mean of all existing input embeddings: a neutral point
    among them that means nothing yet, so what ``<sep>`` comes to mean is learned from
    the task data alone (``init_text`` starts it at the mean of those words' embeddings
    instead). Calling it again for the same token does nothing but return the id.
    """
    if token in tokenizer.get_vocab():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id < model.get_input_embeddings().weight.shape[0]:
            return token_id
    old_rows = model.get_input_embeddings().weight.shape[0]
    if init_text is not None:
        init_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        if not init_ids:
            raise ValueError(f"init_text {init_text!r} has no tokens")
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    # We set the new row ourselves, so transformers' mean_resizing (a random draw) is off.
    model.resize_token_embeddings(max(len(tokenizer), old_rows), mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        source = weight[:old_rows] if init_text is None else weight[init_ids]
        weight[token_id] = source.mean(dim=0)
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != weight.data_ptr():
            output.weight[token_id] = output.weight[:old_rows].mean(dim=0)  # untied head: neutral row
    return token_id


def token_embedding(model, token_id: int) -> torch.Tensor:
    """The input embedding the model really uses for ``token_id`` (PEFT token deltas included)."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor([token_id]))[0].clone()


# --- scoring: label-token logits, and the strict format by generation ------------------------


def scoring_texts(tokenizer, task_rows: Sequence[Mapping]) -> list[str]:
    """Each row's chat prompt followed by the verdict prefix ``{"verdict": "``."""
    return [text + VERDICT_PREFIX for text in render_prompts(tokenizer, [row["prompt"] for row in task_rows])]


def label_token_ids(tokenizer, text: str) -> dict[str, int]:
    """The first token of each verdict when written after ``text`` (which ends with the prefix)."""
    base = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = {}
    for verdict in VERDICTS:
        full = tokenizer(text + verdict, add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base:
            raise ValueError(f"the tokenizer merges {verdict!r} with the prefix {VERDICT_PREFIX!r}; "
                             "label-token scoring needs a prefix that ends on a token boundary")
        ids[verdict] = full[len(base)]
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"the verdicts {VERDICTS} start with the same token; pick labels that differ at once")
    return ids


@torch.no_grad()
def verdict_logits(model, tokenizer, task_rows: Sequence[Mapping], *, batch_size: int = 16) -> torch.Tensor:
    """``[rows, 2]`` logits of the label tokens (``VERDICTS`` order) after each row's prefix."""
    if not task_rows:
        raise ValueError("no task rows to score")
    texts = scoring_texts(tokenizer, task_rows)
    labels = label_token_ids(tokenizer, texts[0])
    columns = [labels[v] for v in VERDICTS]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = torch.zeros(len(texts), len(VERDICTS))
    was_training = model.training
    model.eval()
    try:
        with padding_side(tokenizer, "left"):
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                                    add_special_tokens=False)
                # logits_to_keep=1: only the last position's logits are computed (left padding)
                logits = model(**encoded, logits_to_keep=1).logits[:, -1, :]
                out[batch] = logits[:, columns].float()
    finally:
        model.train(was_training)
    return out


def verdict_accuracy(model, tokenizer, task_rows: Sequence[Mapping], *, batch_size: int = 16) -> list[float]:
    """Per row, 1.0 if the right verdict's label token has the higher logit, else 0.0."""
    logits = verdict_logits(model, tokenizer, task_rows, batch_size=batch_size)
    predicted = [VERDICTS[i] for i in logits.argmax(dim=-1).tolist()]
    return [float(p == row["label"]) for p, row in zip(predicted, task_rows)]


def format_replies(model, tokenizer, task_rows: Sequence[Mapping], *, batch_size: int = 16,
                   max_new_tokens: int = 12) -> list[str]:
    """Greedy replies to the task prompts (``{"verdict": "wrong"}`` is 7 tokens for SmolLM2)."""
    return generate_replies(model, tokenizer, [row["prompt"] for row in task_rows],
                            max_new_tokens=max_new_tokens, batch_size=batch_size)


def format_validity(replies: Sequence[str]) -> list[float]:
    """Per reply, 1.0 if it is exactly a valid verdict object, else 0.0."""
    return [float(parse_verdict(reply) is not None) for reply in replies]
