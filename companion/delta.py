"""Delta tuning with PEFT: method configs by name, a CPU training loop, evaluation, save/load, ask.

A *delta* is the small set of new parameters trained on top of a frozen backbone (LoRA
matrices, soft prompt vectors, prefix key/values, IA3 scaling vectors). This module gives
every chapter one way to make, train, save, reload and query one:

- ``peft_config(method, model, **knobs)`` and ``attach(model, method, **knobs)`` for the
  methods in ``METHODS`` (targets found per architecture by ``companion.arch``);
- ``train(model, tokenizer, pairs, num_steps=..., lr=..., batch_size=..., max_length=...)``
  trains on ``(prompt, target)`` pairs with the loss on the target tokens only;
- ``generate_answers`` / ``evaluate_qa`` / ``ask`` / ``interactive`` query a model;
- ``save_delta`` / ``load_delta`` write and read a delta checkpoint that remembers which
  backbone it was made for, and refuse another one with a clear error.

Command line, like the original tutorial's ``--mode interactive_inference``::

    python -m companion.delta ask --delta PATH                # interactive loop
    python -m companion.delta ask --delta PATH -q "Capital of France?"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, StoppingCriteria, StoppingCriteriaList

from . import arch
from .config import get_settings, seed_everything
from .prompting import DEFAULT_TEMPLATE, extract_answer, qa_prompt, qa_scores

DELTA_INFO_FILE = "course_delta.json"


class DeltaMismatchError(ValueError):
    """A delta checkpoint was made for another backbone than the one it is loaded into."""


# Adapter configurations live in companion.adapters (chapter 3 uses them too).
from .adapters import METHODS, _quiet_peft, attach, peft_config, trainable_parameters  # noqa: E402,F401


def backbone_bytes(model) -> int:
    """Bytes of the backbone's parameters as held in memory (shared tensors counted once)."""
    seen, total = set(), 0
    for name, parameter in arch.unwrap(model).named_parameters():
        if id(parameter) in seen or "lora_" in name or "ia3_" in name:
            continue
        seen.add(id(parameter))
        total += parameter.numel() * parameter.element_size()
    return total


# --- training ---------------------------------------------------------------------------------


def encode_pair(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """Token ids of ``prompt + target + eos`` with labels -100 on the prompt.

    If the whole does not fit in ``max_length``, the prompt loses tokens from its start
    (the answer is what is learnt, so it is kept).
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if not target_ids[:-1]:
        raise ValueError(f"empty target for prompt {prompt[:60]!r}")
    target_ids = target_ids[: max_length - 1]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(target_ids))):]
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
        "labels": [-100] * len(prompt_ids) + target_ids,
    }


def train(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    num_steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int | None = None,
    desc: str = "train",
) -> list[float]:
    """Train the trainable parameters of ``model`` on ``(prompt, target)`` pairs; losses per step.

    The loss is the model's own causal-LM loss on the target tokens (prompt and padding
    are labelled -100). Batches are drawn from a seeded shuffle of the pairs, cycling
    when the steps outnumber them. A short explicit loop rather than ``transformers.Trainer``:
    for a few dozen CPU steps the Trainer's logging, checkpointing and accelerate set-up
    cost more than the loop they replace, and this loop is what the chapter explains.
    """
    if num_steps < 1 or batch_size < 1:
        raise ValueError("num_steps and batch_size must be at least 1")
    if not pairs:
        raise ValueError("no training pairs")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call companion.delta.attach first")
    seed = seed_everything(seed)
    order_rng = random.Random(seed)
    encoded = [encode_pair(tokenizer, p, t, max_length) for p, t in pairs]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses: list[float] = []
    order: list[int] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # training rows: real tokens first, then padding
    model.train()
    try:
        with tqdm(total=num_steps, desc=desc) as bar:
            for _ in range(num_steps):
                if len(order) < batch_size:
                    fresh = list(range(len(encoded)))
                    order_rng.shuffle(fresh)
                    order += fresh
                picked, order = order[:batch_size], order[batch_size:]
                batch = collator([encoded[i] for i in picked])
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    finally:
        tokenizer.padding_side = side
        model.eval()
    return losses


def training_tokens(tokenizer, pairs: Sequence[tuple[str, str]], *, num_steps: int, batch_size: int,
                    max_length: int) -> int:
    """Approximate number of real tokens ``train`` processes (mean pair length x rows seen)."""
    lengths = [len(encode_pair(tokenizer, p, t, max_length)["input_ids"]) for p, t in pairs]
    return round(sum(lengths) / len(lengths) * num_steps * batch_size)


# --- generation and evaluation ----------------------------------------------------------------


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
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc=desc or "generate", disable=len(starts) < 2):
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
    finally:
        tokenizer.padding_side = side
    return answers


def evaluate_qa(
    model, tokenizer, rows: Sequence[Mapping], *, template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 16, batch_size: int = 16, desc: str | None = None,
) -> dict:
    """EM and token F1 of ``model`` on QA rows; also returns the predictions and the seconds taken."""
    start = time.perf_counter()
    prompts = [qa_prompt(row["question"], template) for row in rows]
    predictions = generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc
    )
    scores = qa_scores(predictions, [row["answer"] for row in rows])
    return {**scores, "predictions": predictions, "seconds": time.perf_counter() - start}


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


# --- one method end to end ----------------------------------------------------------------------

# Learning rates that work for a few dozen steps on the course's models (measured on
# short_qa with SmolLM2-135M): soft prompts and scaling vectors need larger steps than LoRA.
SUGGESTED_LR = {"lora": 2e-3, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "ia3": 1e-2}


def tune_and_evaluate(
    method: str,
    pairs: Sequence[tuple[str, str]],
    eval_rows: Sequence[Mapping],
    *,
    num_steps: int,
    batch_size: int,
    max_length: int,
    lr: float | None = None,
    save_dir: str | Path | None = None,
    model_name: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    max_new_tokens: int = 16,
    knobs: Mapping | None = None,
) -> dict:
    """Fresh backbone -> attach ``method`` -> train -> save -> evaluate; returns a record.

    The record holds: method, trainable (parameters), losses, train_seconds,
    tokens_per_second, checkpoint_bytes, backbone_bytes, em, f1, predictions, and the
    trained ``model`` and ``tokenizer``. ``lr`` defaults to ``SUGGESTED_LR[method]``.
    """
    from .models import load_lm

    if method not in METHODS:
        raise ValueError(f"unknown delta method {method!r}; known: {', '.join(METHODS)}")
    lr = SUGGESTED_LR[method] if lr is None else lr
    seed_everything()
    base, tokenizer = load_lm(model_name)
    model = attach(base, method, **dict(knobs or {}))
    start = time.perf_counter()
    losses = train(model, tokenizer, pairs, num_steps=num_steps, lr=lr, batch_size=batch_size,
                   max_length=max_length, desc=method)
    seconds = time.perf_counter() - start
    tokens = training_tokens(tokenizer, pairs, num_steps=num_steps, batch_size=batch_size, max_length=max_length)
    record = {
        "method": method,
        "trainable": trainable_parameters(model),
        "losses": losses,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "backbone_bytes": backbone_bytes(model),
    }
    if save_dir is not None:
        path = save_delta(model, Path(save_dir) / method, template=template)
        record["checkpoint_bytes"] = checkpoint_bytes(path)
        record["path"] = path
    scores = evaluate_qa(model, tokenizer, eval_rows, template=template, max_new_tokens=max_new_tokens,
                         desc=f"{method} eval")
    record.update(em=scores["em"], f1=scores["f1"], predictions=scores["predictions"],
                  eval_seconds=scores["seconds"], model=model, tokenizer=tokenizer)
    return record


# --- save and load ----------------------------------------------------------------------------


def backbone_fingerprint(model) -> dict:
    """What identifies a backbone: its type, shapes, and a checksum of some embedding rows."""
    base = arch.unwrap(model)
    config = base.config
    embedding = base.get_input_embeddings().weight
    rows = embedding.detach()[:16].to(torch.float32).contiguous().numpy().tobytes()
    return {
        "name": _course_name(base),
        "model_type": config.model_type,
        "hidden_size": arch.hidden_size(base),
        "num_layers": arch.num_layers(base),
        "vocab_size": int(embedding.shape[0]),
        "embedding_sha256": hashlib.sha256(rows).hexdigest()[:16],
    }


def _course_name(base) -> str:
    """The name ``load_lm`` knows this backbone by (``load_lm`` sets ``name_or_path``)."""
    return str(getattr(base.config, "name_or_path", "") or "")


def save_delta(model: PeftModel, path: str | Path, *, template: str = DEFAULT_TEMPLATE) -> Path:
    """Write the delta (not the backbone) to ``path``, plus a note of the backbone it needs."""
    if not isinstance(model, PeftModel):
        raise TypeError("save_delta expects a model returned by companion.delta.attach or load_delta")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    method = model.peft_config[model.active_adapter].peft_type.value.lower()
    info = {"backbone": backbone_fingerprint(model), "method": method, "template": template}
    (path / DELTA_INFO_FILE).write_text(json.dumps(info, indent=2))
    return path


def delta_info(path: str | Path) -> dict:
    """The note ``save_delta`` wrote: backbone fingerprint, method, template."""
    path = Path(path)
    info_file = path / DELTA_INFO_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"no delta checkpoint folder at {path}; save one with save_delta")
    if not info_file.exists():
        raise FileNotFoundError(
            f"{path} has no {DELTA_INFO_FILE}; it was not written by companion.delta.save_delta"
        )
    return json.loads(info_file.read_text())


def load_delta(path: str | Path, base_model=None) -> PeftModel:
    """Load a delta saved by ``save_delta`` onto ``base_model`` (default: load its backbone).

    Raises ``DeltaMismatchError`` if ``base_model`` is not the backbone the delta was made
    for (another architecture, size, or weights). Like PEFT, this modifies ``base_model``
    in place; the returned model is in eval mode.
    """
    info = delta_info(path)
    expected = info["backbone"]
    if base_model is None:
        from .models import load_lm

        base_model, _ = load_lm(expected["name"])
    found = backbone_fingerprint(base_model)
    differences = [
        f"{key}: checkpoint {expected[key]!r}, model {found[key]!r}"
        for key in ("model_type", "hidden_size", "num_layers", "vocab_size", "embedding_sha256")
        if expected.get(key) != found[key]
    ]
    if differences:
        raise DeltaMismatchError(
            f"the delta at {path} was made for backbone {expected['name']!r}, not for "
            f"{found['name']!r} ({'; '.join(differences)}); load it onto the backbone it was "
            "trained on (load_delta(path) loads that one for you)"
        )
    with _quiet_peft():
        model = PeftModel.from_pretrained(base_model, str(path))
    model.eval()
    return model


def checkpoint_bytes(path: str | Path) -> int:
    """Total size of the files in a checkpoint folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.delta", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ask_parser = commands.add_parser("ask", help="answer questions with a saved delta")
    ask_parser.add_argument("--delta", required=True, help="folder written by save_delta")
    ask_parser.add_argument("-q", "--question", action="append", help="ask this and exit (repeatable)")
    ask_parser.add_argument("--base", help="backbone to load instead of the one the delta names")
    args = parser.parse_args(argv)

    from .models import load_lm

    seed_everything()
    info = delta_info(args.delta)
    base, tokenizer = load_lm(args.base or info["backbone"]["name"] or get_settings().model)
    try:
        model = load_delta(args.delta, base)
    except DeltaMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    template = info.get("template", DEFAULT_TEMPLATE)
    if args.question:
        for question in args.question:
            print(f"Q: {question}\nA: {ask(model, tokenizer, question, template=template)}")
    else:
        interactive(model, tokenizer, template=template)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
