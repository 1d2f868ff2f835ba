"""Prompts and how answers are scored: QA templates, verbalizer label words, EM / token F1.

Two families of prompts live here:

- plain-text templates for the PEFT recipe (``QA_TEMPLATES``, ``qa_prompt``, ``qa_pairs``),
  the strings a causal LM is asked to continue;
- helpers for OpenPrompt's classic recipe (template texts, ``input_examples``,
  ``openprompt_sentiment_verbalizer`` with its single-token check, a small training loop
  ``train_prompt_model``), which import OpenPrompt through ``companion.legacy`` so that it
  runs on current transformers.

Answers are scored as in SQuAD: lower-cased, punctuation and articles removed, then exact
match (EM) and token-overlap F1, averaged over questions.
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch

from .progress import progress

# --- multiple choice ---------------------------------------------------------------------------

CHOICE_LETTERS = "ABCD"


def multiple_choice_text(question: str, choices: Sequence[str], *, letters: Sequence[str] = CHOICE_LETTERS,
                         question_prefix: str = "", answer_prompt: str = "") -> str:
    """A multiple-choice question as text: the question, then one ``A. choice`` line per choice.

    The one formatter for every chapter (chips, SFT queries, KV prompts). ``question_prefix``
    (e.g. ``"Question: "``) goes before the question, ``answer_prompt`` (e.g. ``"Answer:"``)
    on a last line of its own.
    """
    choices = list(choices)
    if len(choices) > len(letters):
        raise ValueError(f"{len(choices)} choices but only {len(letters)} letters {list(letters)}")
    lines = [f"{question_prefix}{str(question).strip()}"]
    lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    if answer_prompt:
        lines.append(answer_prompt)
    return "\n".join(lines)


# --- plain-text QA templates (PEFT recipe) ---------------------------------------------------

QA_TEMPLATES = {
    # The tutorial's layout: the model continues after "Answer:".
    "plain": "Question: {question}\nAnswer:",
    # The same with a hand-written instruction, the fairest zero-shot baseline for a small
    # instruction-tuned model.
    "instruct": "Answer the question with a few words only.\nQuestion: {question}\nAnswer:",
}
DEFAULT_TEMPLATE = "plain"


def qa_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The text the model continues for ``question``; ``template`` is a name or a format string."""
    text = QA_TEMPLATES.get(template, template)
    if "{question}" not in text:
        raise ValueError(
            f"template {template!r} is neither a known name ({', '.join(QA_TEMPLATES)}) "
            "nor a format string containing {question}"
        )
    return text.format(question=question.strip())


FEW_SHOT_SEPARATOR = "\n\n"
CHAT_INSTRUCTION = "Answer the question with a few words only."


def few_shot_prompt(question: str, examples: Sequence[Mapping], template: str = DEFAULT_TEMPLATE) -> str:
    """``k``-shot prompt: ``examples`` (QA rows) answered in ``template``, then ``question``.

    Scored like the tuned models: the model continues after the last ``Answer:`` and its
    first line is the answer.
    """
    shots = [qa_prompt(row["question"], template) + " " + str(row["answer"]).strip() for row in examples]
    return FEW_SHOT_SEPARATOR.join(shots + [qa_prompt(question, template)])


def chat_prompt(tokenizer, question: str, instruction: str = CHAT_INSTRUCTION) -> str:
    """A question sent the way a chat model expects it: its chat template, the reply to begin.

    A fair zero-shot baseline for an instruction-tuned model (a raw ``Question:/Answer:``
    text is not what such a model was trained to continue).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use the plain template (qa_prompt) instead")
    content = f"{instruction}\n{question.strip()}" if instruction else question.strip()
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def qa_pairs(rows: Iterable[Mapping], template: str = DEFAULT_TEMPLATE) -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs from QA rows (fields ``question`` and ``answer``).

    The target starts with a space because it follows ``Answer:`` in the text.
    """
    pairs = []
    for row in rows:
        missing = {"question", "answer"} - set(row)
        if missing:
            raise KeyError(f"QA rows need the fields question and answer; missing {sorted(missing)}")
        pairs.append((qa_prompt(row["question"], template), " " + str(row["answer"]).strip()))
    return pairs


def extract_answer(generated: str) -> str:
    """The answer part of a continuation: its first non-empty line, stripped."""
    for line in generated.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# --- QA metrics ------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, squeeze whitespace (SQuAD)."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(gold: str | Sequence[str]) -> list[str]:
    return [gold] if isinstance(gold, str) else list(gold)


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _as_list(gold)))


def token_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """Harmonic mean of token precision and recall after normalisation (best gold answer)."""

    def f1(pred_text: str, gold_text: str) -> float:
        pred, ref = normalize_answer(pred_text).split(), normalize_answer(gold_text).split()
        if not pred or not ref:
            return float(pred == ref)
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, g) for g in _as_list(gold))


def contains_answer(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 if a normalised gold answer appears, as whole words, inside the normalised prediction.

    Unlike EM, this does not punish a full sentence ("The capital of Jordan is Amman."),
    so it separates *knowing* the answer from *answering in the expected form*.
    """
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in pred for g in _as_list(gold)))


QA_METRICS = {"em": exact_match, "f1": token_f1, "contains": contains_answer}


def qa_item_scores(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, list[float]]:
    """Per-question scores, one list per metric in ``QA_METRICS`` (for intervals and paired tests)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    if not predictions:
        raise ValueError("no predictions to score")
    return {name: [metric(p, g) for p, g in zip(predictions, golds)] for name, metric in QA_METRICS.items()}


def qa_scores(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean exact match, token F1 and contains-the-answer, as fractions in [0, 1]."""
    items = qa_item_scores(predictions, golds)
    return {name: sum(values) / len(values) for name, values in items.items()}


# --- verbalizer label words ------------------------------------------------------------------

SENTIMENT_LABEL_WORDS = {
    "negative": ["bad"],
    "neutral": ["fine"],
    "positive": ["good"],
}


def check_single_token_words(tokenizer, label_words: Mapping[str, Sequence[str]]) -> None:
    """Raise if a label word is not one token (after a space) for this tokenizer.

    OpenPrompt's ``ManualVerbalizer`` scores a word by its first token; two words sharing a
    first token would get identical scores and the classifier could not learn.
    """
    for label, words in label_words.items():
        for word in words:
            ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f"label word {word!r} (label {label!r}) is {len(ids)} tokens for this "
                    "tokenizer; pick words that are single tokens after a space"
                )


# --- OpenPrompt pieces (classic recipe) ------------------------------------------------------

OPENPROMPT_QA_TEMPLATE = 'Question: {"placeholder":"text_a"}\nAnswer: {"mask"}'
OPENPROMPT_SENTIMENT_TEMPLATE = '{"placeholder":"text_a"} Overall, it was {"mask"}.'


def input_examples(rows: Iterable[Mapping], labels: Sequence[str] | None = None) -> list:
    """OpenPrompt ``InputExample``s from course rows.

    QA rows (question/answer) become ``text_a`` = question and ``tgt_text`` = answer;
    classification rows (text/label) become ``text_a`` = text and an integer label (its
    index in ``labels``).
    """
    from .legacy import openprompt_module

    InputExample = openprompt_module("openprompt.data_utils").InputExample
    examples = []
    for i, row in enumerate(rows):
        guid = str(row.get("id", i))
        if "question" in row:
            examples.append(InputExample(guid=guid, text_a=row["question"], tgt_text=str(row["answer"])))
        elif "text" in row and labels is not None:
            if row["label"] not in labels:
                raise ValueError(f"label {row['label']!r} is not one of {list(labels)}")
            examples.append(InputExample(guid=guid, text_a=row["text"], label=list(labels).index(row["label"])))
        else:
            raise KeyError(
                "rows need question/answer (QA) or text/label plus the labels argument (classification)"
            )
    return examples


def openprompt_sentiment_verbalizer(
    tokenizer, labels: Sequence[str], label_words: Mapping[str, Sequence[str]] = SENTIMENT_LABEL_WORDS
):
    """OpenPrompt ``ManualVerbalizer`` mapping each label to its (single-token) words."""
    from .legacy import openprompt_module

    missing = [label for label in labels if label not in label_words]
    if missing:
        raise ValueError(f"no label words for {missing}; give label_words for every label")
    check_single_token_words(tokenizer, {label: label_words[label] for label in labels})
    return openprompt_module("openprompt.prompts").ManualVerbalizer(
        tokenizer=tokenizer,
        classes=list(labels),
        label_words={label: list(label_words[label]) for label in labels},
        prefix=" ",
    )


def train_prompt_model(
    prompt_model, dataloader, *, num_steps: int, lr: float, desc: str = "train"
) -> dict:
    """Train an OpenPrompt model (generation or classification) for ``num_steps`` batches.

    Returns ``{"losses": [...], "seconds": s, "tokens": n}``. Only parameters left trainable
    (the delta's) are optimised. A plain loop, like the tutorial's, rather than a Trainer:
    OpenPrompt models take its own batch objects, which transformers' Trainer does not know.
    """
    params = [p for p in prompt_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the prompt model has no trainable parameters; attach a delta first")
    optimizer = torch.optim.AdamW(params, lr=lr)
    is_generation = hasattr(prompt_model, "generate")
    loss_fn = torch.nn.CrossEntropyLoss()
    prompt_model.train()
    losses, tokens = [], 0
    start = time.perf_counter()
    batches = _cycle(dataloader)
    with progress(total=num_steps, desc=desc) as bar:
        for _ in range(num_steps):
            batch = next(batches)
            if is_generation:
                loss = prompt_model(batch)
            else:
                logits = prompt_model(batch)
                loss = loss_fn(logits, batch["label"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    prompt_model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "tokens": tokens}


def _cycle(dataloader):
    while True:
        yielded = False
        for batch in dataloader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the data loader is empty")


@torch.no_grad()
def classify_correct(prompt_model, dataloader) -> list[float]:
    """Per-example correctness (1.0/0.0) of an OpenPrompt ``PromptForClassification``."""
    prompt_model.eval()
    correct: list[float] = []
    for batch in dataloader:
        predicted = prompt_model(batch).argmax(dim=-1)
        correct += (predicted == batch["label"]).float().tolist()
    if not correct:
        raise ValueError("the data loader is empty")
    return correct


def classify_accuracy(prompt_model, dataloader) -> float:
    """Accuracy of an OpenPrompt ``PromptForClassification`` over a data loader."""
    correct = classify_correct(prompt_model, dataloader)
    return sum(correct) / len(correct)
