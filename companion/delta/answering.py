"""Asking a (tuned) model: batched greedy answers cut to their first line, QA scores, a question loop."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..models import padding_side
from ..progress import progress
from ..prompting import DEFAULT_TEMPLATE, extract_answer, qa_item_scores, qa_prompt

class FirstLineDone(StoppingCriteria):
    """Stops a row once its continuation holds a non-empty line followed by a newline.

    (transformers' ``stop_strings=["\\n"]`` would also stop on a leading newline, before
    any answer; models often start their answer on a new line.)
    """

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([bool(_FINISHED_LINE.search(text)) for text in texts], device=input_ids.device)


_FINISHED_LINE = re.compile(r"\S[^\n]*\n")


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 16,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut to their first line."""
    model.eval()
    answers: list[str] = []
    starts = range(0, len(prompts), batch_size)
    with padding_side(tokenizer, "left"):
        for start in progress(starts, desc=desc or "generate", disable=len(starts) < 2):
            chunk = list(prompts[start : start + batch_size])
            inputs = tokenizer(chunk, return_tensors="pt", padding=True)
            with warnings.catch_warnings():
                # soft-prompt models ignore the position ids generate() makes; harmless
                warnings.filterwarnings("ignore", message="Position ids are not supported")
                output = model.generate(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([FirstLineDone(tokenizer, inputs["input_ids"].shape[1])]),
                )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            answers.extend(extract_answer(text) for text in texts)
    return answers


def evaluate_qa(
    model, tokenizer, rows: Sequence[Mapping], *, template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 16, batch_size: int = 16, desc: str | None = None,
    prompts: Sequence[str] | None = None,
) -> dict:
    """Scores of ``model`` on QA rows: mean EM, F1 and contains-the-answer, the per-question
    scores (``items``, for intervals and paired comparisons), the predictions and the seconds.

    ``prompts`` overrides the template (e.g. chat-template or few-shot prompts, one per row).
    """
    start = time.perf_counter()
    if prompts is None:
        prompts = [qa_prompt(row["question"], template) for row in rows]
    elif len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts for {len(rows)} rows; give one prompt per row")
    predictions = generate_answers(
        model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc
    )
    items = qa_item_scores(predictions, [row["answer"] for row in rows])
    scores = {name: sum(values) / len(values) for name, values in items.items()}
    return {**scores, "items": items, "predictions": predictions, "seconds": time.perf_counter() - start}


def ask(model, tokenizer, question: str, *, template: str = DEFAULT_TEMPLATE, max_new_tokens: int = 24) -> str:
    """The model's answer to one question."""
    if not question.strip():
        raise ValueError("empty question")
    return generate_answers(model, tokenizer, [qa_prompt(question, template)], max_new_tokens=max_new_tokens)[0]


def interactive(
    model, tokenizer, *, template: str = DEFAULT_TEMPLATE, read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> int:
    """Answer questions typed one per line until an empty line, ``quit`` or end of input.

    Returns the number of questions answered (``read``/``write`` are swappable for tests).
    """
    answered = 0
    write("Ask a question (empty line or 'quit' to stop).")
    while True:
        try:
            question = read("question> ")
        except (EOFError, KeyboardInterrupt):
            break
        if not question.strip() or question.strip().lower() in {"quit", "exit"}:
            break
        write(f"answer: {ask(model, tokenizer, question, template=template)}")
        answered += 1
    return answered
