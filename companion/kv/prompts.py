"""Prompts for the KV bench, offline, each exactly ``length`` tokens, with what they are about.

Kinds (``PROMPT_SOURCES``):

- ``needle``: a short fact ("The secret code of Portia is 4821.") placed at a chosen depth of
  a long play passage; the question goes through the chat template and the reply is begun for
  the model ("The secret code of Portia is"), the format in which the full model answers, so
  that a lost answer is the compression method's fault. The task metric of the chapter.
- ``book_qa``: a question about a long play passage, through the chat template.
- ``mmlu``: many-shot multiple choice, answered questions of one subject then a last one.
- ``books``: a bare play passage (the first edition's prompts; continuations often repeat).
- ``suite`` (the default): a third each of needle, book_qa and mmlu; ``mixed``: books + mmlu.

Passages come from ``load_data("books")`` (public-domain plays, test split) and questions from
``load_data("mmlu")`` (validation split). A tokenizer without a chat template (the tiny test
models') gets a plain ``User: ... Assistant:`` frame instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..prompting import multiple_choice_text
from .methods import KVConfigError

PROMPT_SOURCES = ("suite", "needle", "book_qa", "mmlu", "books", "mixed")
NEEDLE_DEPTHS = (0.1, 0.5, 0.9)
NEEDLE_NAMES = ("Portia", "Benvolio", "Miranda", "Horatio", "Viola", "Lysander", "Imogen", "Antonio",
                "Rosalind", "Sebastian", "Perdita", "Orsino")
BOOK_QUESTIONS = ("Who speaks in this passage, and what are they talking about?",
                  "Summarise what happens in this passage in two sentences.",
                  "What does the last speaker in this passage want?")
_SLOT = "\x00PASSAGE\x00"


@dataclass
class Prompt:
    """Token ids of one prompt and what the bench needs to know about it."""

    ids: torch.Tensor  # (length,)
    kind: str
    depth: float | None = None  # needle: where the fact starts, as a fraction of the filler
    answer: str | None = None  # needle: the code the answer must contain
    needle_span: tuple[int, int] | None = None  # needle: token positions [start, end) of the fact

    def __len__(self) -> int:
        return len(self.ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _play_rows(rows):
    if rows is None:
        from ..data import load_data

        rows = load_data("books")["test"]
    return list(rows)


def passages(tokenizer, count: int, length: int, rows=None, offsets=(1 / 3, 1 / 2, 2 / 3)) -> list[list[int]]:
    """``count`` passages of ``length`` tokens, each starting at a line: every play at its first
    offset (past the cast list), then every play at the next offset, and so on."""
    if count == 0:
        return []
    rows = _play_rows(rows)
    found = []
    for offset in offsets:
        for row in rows:
            text = row["text"]
            start = text.find("\n", int(len(text) * offset)) + 1
            ids = _encode(tokenizer, text[start : start + 8 * length + 200])
            if start > 0 and len(ids) >= length:
                found.append(ids[:length])
            if len(found) == count:
                return found
    raise ValueError(f"only {len(found)} passages of {length} tokens in the plays; "
                     f"ask for fewer prompts (num_prompts={count}) or shorter ones")


def book_prompts(tokenizer, num_prompts: int, length: int, rows=None) -> list[Prompt]:
    """Bare passages of exactly ``length`` tokens, one per play (a third of the way in)."""
    try:
        found = passages(tokenizer, num_prompts, length, rows, offsets=(1 / 3,))
    except ValueError as error:
        have = str(error).split()[1]
        raise ValueError(f"only {have} of the texts have {length} tokens after their first third; "
                         f"ask for fewer prompts (num_prompts={num_prompts}) or shorter ones") from None
    return [Prompt(torch.tensor(ids), "books") for ids in found]


def chat_frame(tokenizer, message: str, reply_start: str = "") -> tuple[str, str]:
    """The text before and after a passage slot in ``message``, rendered as one user turn
    through the tokenizer's chat template, with the assistant's reply begun by ``reply_start``."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = f"User: {message}\nAssistant: "
    before, after = text.split(_SLOT)
    return before, after + reply_start


def _framed(tokenizer, length: int, before: str, after: str, kind: str, what: str) -> tuple[list[int], list[int], int]:
    head, tail = _encode(tokenizer, before), _encode(tokenizer, after)
    room = length - len(head) - len(tail)
    if room < 16:
        raise ValueError(f"{length} tokens leave no room for the {what} of a {kind} prompt; use max_length >= "
                         f"{len(head) + len(tail) + 64}")
    return head, tail, room


def book_qa_prompts(tokenizer, num_prompts: int, length: int, rows=None) -> list[Prompt]:
    """A question about a play passage, through the chat template; ``length`` tokens in all."""
    prompts = []
    heads = [chat_frame(tokenizer, f"Read this passage from a play.\n\n{_SLOT}\n\n{q}") for q in BOOK_QUESTIONS]
    framed = [_framed(tokenizer, length, before, after, "book_qa", "passage") for before, after in heads]
    found = passages(tokenizer, num_prompts, max(room for _, _, room in framed), rows)
    for i, ids in enumerate(found):
        head, tail, room = framed[i % len(framed)]
        prompts.append(Prompt(torch.tensor(head + ids[:room] + tail), "book_qa"))
    return prompts


def needle_prompts(tokenizer, num_prompts: int, length: int, depths=NEEDLE_DEPTHS, rows=None,
                   seed: int = 0) -> list[Prompt]:
    """A secret code placed at ``depths`` (cycled) of a play passage, then asked for.

    The fact starts at token ``round(depth * filler length)`` of the passage (recorded in
    ``needle_span``, in prompt positions); the code is 4 random digits, the name a character's.
    """
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"needle depths must be fractions in [0, 1], got {depths!r}")
    generator = random.Random(seed)
    fillers = passages(tokenizer, num_prompts, length, rows)
    prompts = []
    for i in range(num_prompts):
        name, code, depth = NEEDLE_NAMES[i % len(NEEDLE_NAMES)], f"{generator.randrange(1000, 10000)}", depths[i % len(depths)]
        question = f"What is the secret code of {name}?"
        before, after = chat_frame(tokenizer, f"Read this text and remember the secret code in it.\n\n{_SLOT}\n\n"
                                   f"{question}", reply_start=f"The secret code of {name} is")
        fact = _encode(tokenizer, f"\nThe secret code of {name} is {code}.\n")
        head, tail, room = _framed(tokenizer, length - len(fact), before, after, "needle", "filler text")
        filler = fillers[i][:room]
        at = round(depth * room)
        ids = head + filler[:at] + fact + filler[at:] + tail
        start = len(head) + at
        prompts.append(Prompt(torch.tensor(ids), "needle", depth=depth, answer=code,
                              needle_span=(start, start + len(fact))))
    return prompts


def _mmlu_question(row, with_answer: bool) -> str:
    text = multiple_choice_text(row["question"], row["choices"], answer_prompt="Answer:")
    return text + (f" {'ABCD'[row['label']]}\n\n" if with_answer else "")


def mmlu_prompts(tokenizer, num_prompts: int, length: int, rows=None) -> list[Prompt]:
    """Many-shot multiple-choice prompts of exactly ``length`` tokens (validation split).

    Subjects are taken largest first; a prompt is a header, as many answered questions of the
    subject as fit, and the subject's shortest question ending in "Answer:". When the shots
    overflow, the earliest are cut (the header and the last question stay whole). Subjects
    without enough text for ``length`` tokens are skipped.
    """
    if rows is None:
        from ..data import load_data

        rows = load_data("mmlu")["validation"]
    by_subject: dict[str, list] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    prompts = []
    for subject in sorted(by_subject, key=lambda s: (-len(by_subject[s]), s)):
        questions = by_subject[subject]
        last = min(questions, key=lambda row: len(_mmlu_question(row, with_answer=False)))
        header = _encode(tokenizer, f"The following are multiple choice questions (with answers) about {subject}.\n\n")
        question = _encode(tokenizer, _mmlu_question(last, with_answer=False))
        room = length - len(header) - len(question)
        body: list[int] = []
        for shot in questions:
            if len(body) >= room:
                break
            if shot is not last:
                body += _encode(tokenizer, _mmlu_question(shot, with_answer=True))
        if room > 0 and len(body) >= room:
            prompts.append(Prompt(torch.tensor(header + body[len(body) - room :] + question), "mmlu"))
        if len(prompts) == num_prompts:
            return prompts
    raise ValueError(
        f"only {len(prompts)} subjects have enough questions for a {length}-token prompt; "
        f"ask for fewer prompts (num_prompts={num_prompts}) or shorter ones"
    )


def long_prompts(tokenizer, num_prompts: int, length: int, source: str = "suite") -> list[Prompt]:
    """``num_prompts`` prompts of ``length`` tokens from ``source`` (see ``PROMPT_SOURCES``).

    ``suite`` splits them needle / book_qa / mmlu (the remainder goes to the needle prompts);
    ``mixed`` books then mmlu (half each, books first).
    """
    builders = {"needle": needle_prompts, "book_qa": book_qa_prompts, "mmlu": mmlu_prompts, "books": book_prompts}
    if source in builders:
        return builders[source](tokenizer, num_prompts, length)
    if source == "mixed":
        books = (num_prompts + 1) // 2
        return book_prompts(tokenizer, books, length) + mmlu_prompts(tokenizer, num_prompts - books, length)
    if source == "suite":
        third = num_prompts // 3
        needles = num_prompts - 2 * third
        if not third:
            return needle_prompts(tokenizer, needles, length)
        return (needle_prompts(tokenizer, needles, length) + book_qa_prompts(tokenizer, third, length)
                + mmlu_prompts(tokenizer, third, length))
    raise KVConfigError(f"unknown prompt source {source!r}; known: {', '.join(PROMPT_SOURCES)}")
