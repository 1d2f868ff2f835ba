"""Diverse-data instruction tuning (DELIA): a strict-format task, a self-sampled cache, LoRA SFT.

The recipe of DELIA (arXiv 2408.10841), on current TRL:

1. a narrow downstream task with a strict output format: ``judging_task`` pairs each
   question with its right answer or another row's answer and asks for a JSON verdict
   ``{"thought": ..., "hallucination": "yes"|"no"}`` "in the <sep> format";
2. a cache of *diverse* data, the model's own answers to unrelated queries
   (``diverse_queries`` + ``build_cache``: batched sampling at temperature 0.7, top-p 0.95,
   written to a resumable JSONL file);
3. ``mix`` the task rows with ``ratio`` times as many cached rows, then ``train_sft``:
   LoRA through TRL's ``SFTTrainer`` on prompt/completion rows, so the loss falls on the
   completions only, with the new ``<sep>`` token's embedding row trained along;
4. ``scorecard``: task accuracy and format validity, whether the model still obeys
   "DO NOT follow the <sep> format", and general ability per named category
   (``ability_suite``: short-answer QA categories and MMLU subject groups).
"""

from __future__ import annotations

import copy
import json
import random
import re
import textwrap
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import delta
from .chat import generate_replies
from .config import cache_path, get_settings, seed_everything
from .data import json_lines
from .prompting import normalize_answer, token_f1

SEP_TOKEN = "<sep>"
FOLLOW_FORMAT = "Check the proposed answer for hallucinations, follow the <sep> format."
DO_NOT_FOLLOW_FORMAT = "Check the proposed answer for hallucinations, DO NOT follow the <sep> format."
VERDICTS = ("yes", "no")  # "hallucination": yes = the proposed answer is wrong


class CacheError(ValueError):
    """The self-sampled cache file is malformed or belongs to another model; the message says which line."""


# --- the downstream task: judge a proposed answer, reply in the <sep> JSON format ----------


def judging_prompt(question: str, proposed_answer: str, instruction: str = FOLLOW_FORMAT) -> str:
    return f"Question: {question.strip()}\nProposed answer: {proposed_answer.strip()}\n{instruction}"


def verdict_json(thought: str, hallucination: str) -> str:
    """The strict reply format: one JSON object with exactly these two keys, in this order."""
    if hallucination not in VERDICTS:
        raise ValueError(f"hallucination must be one of {VERDICTS}, got {hallucination!r}")
    return json.dumps({"thought": thought, "hallucination": hallucination}, ensure_ascii=False)


def parse_verdict(text: str) -> dict | None:
    """The verdict if ``text`` is exactly a valid reply (JSON object, both keys, yes/no), else None."""
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, AttributeError):
        return None
    if (
        not isinstance(value, dict)
        or set(value) != {"thought", "hallucination"}
        or not isinstance(value["thought"], str)
        or value["hallucination"] not in VERDICTS
    ):
        return None
    return value


def looks_like_json(text: str) -> bool:
    """Whether a reply is in the JSON format at all (an object opening with ``{``), valid or not."""
    return text.strip().startswith("{")


def judging_task(rows: Iterable[Mapping], *, seed: int = 0, instruction: str = FOLLOW_FORMAT) -> list[dict]:
    """Prompt/completion rows of the judging task from QA rows (fields question, answer, category).

    Exactly half the rows (rounded down) get another row's answer as the proposed answer
    (label ``"yes"``, a hallucination), preferably one from the same category so the wrong
    answer is plausible (a capital for a capital). The completion states the right answer
    in its thought, then the verdict.
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
        proposed, label = right, "no"
        if index in wrong:
            proposed, label = _other_answer(rows, index, by_category[row.get("category", "")], rng), "yes"
        task.append({
            "id": f"judge-{row.get('id', index)}",
            "category": row.get("category", ""),
            "question": row["question"],
            "answer": right,
            "proposed": proposed,
            "label": label,
            "prompt": [{"role": "user", "content": judging_prompt(row["question"], proposed, instruction)}],
            "completion": [{"role": "assistant", "content": verdict_json(f"The right answer is {right}.", label)}],
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
        {**row, "prompt": [{"role": "user", "content": judging_prompt(row["question"], row["proposed"], instruction)}]}
        for row in task_rows
    ]


# --- diverse queries and the self-sampled cache --------------------------------------------

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


def multiple_choice_text(row: Mapping) -> str:
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", row["choices"]))
    return f"{row['question'].strip()}\n{choices}"


def query_pool(max_chars: int = 300) -> list[dict]:
    """Every candidate diverse query: chatterbot questions (21 categories) and MMLU questions.

    Drawn from the *train* splits, so they never overlap the test rows of ``ability_suite``;
    ``short_qa`` reuses some chatterbot trivia, so its validation and test questions are
    left out as well. Queries longer than ``max_chars`` are left out to keep sequences short.
    """
    from .data import load_data

    short_qa = load_data("short_qa")
    held_out = set(short_qa["validation"]["id"]) | set(short_qa["test"]["id"])
    pool = []
    for row in load_data("chatterbot_qa")["train"]:
        if row["id"] in held_out:
            continue
        pool.append({"id": row["id"], "category": f"chat/{row['category']}", "query": row["question"]})
    for row in load_data("mmlu")["train"]:
        pool.append({"id": row["id"], "category": f"mmlu/{mmlu_group(row['subject'])}",
                     "query": multiple_choice_text(row)})
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


def model_name(model) -> str:
    """A short name for the model: the last part of its ``name_or_path`` (folder or Hub id)."""
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    name = str(getattr(config, "name_or_path", "") or type(model).__name__)
    return name.rstrip("/\\").replace("\\", "/").split("/")[-1] or name


def default_cache_file(model, *, max_new_tokens: int = 48, temperature: float = 0.7, top_p: float = 0.95) -> Path:
    """``<course cache>/sft/selfsample-<model>-<sampling>.jsonl``: one cache per model and setting."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name(model)).strip("_") or "model"
    return cache_path("sft") / f"selfsample-{slug}-n{max_new_tokens}-t{temperature:g}-p{top_p:g}.jsonl"


CACHE_FIELDS = ("id", "category", "query", "response", "model")


def read_cache(path: str | Path) -> list[dict]:
    """The rows of a self-sampled cache; a malformed line raises ``CacheError`` with its number."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    hint = "; delete that line (or the file) and run build_cache again to re-sample it"
    for number, row in json_lines(path, error=CacheError, hint=hint):
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in CACHE_FIELDS):
            raise CacheError(
                f"{path}:{number}: a cache row needs string fields {list(CACHE_FIELDS)}; "
                "delete that line (or the file) and run build_cache again"
            )
        rows.append(row)
    return rows


def build_cache(
    model,
    tokenizer,
    queries: Sequence[Mapping],
    path: str | Path | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Self-sample the model's answers to ``queries`` into a JSONL cache; resumable.

    Queries whose id is already in the cache are skipped, so an interrupted build picks up
    where it stopped and a bigger request only samples the new queries. Each finished
    batch is appended and flushed at once. Returns the cache rows of ``queries``, in order.
    """
    if path is None:
        path = default_cache_file(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
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
        raise CacheError(
            f"{path} holds samples of {sorted(others)}, not of {name!r}; pass another path "
            "(default_cache_file(model) is per model)"
        )
    todo = [dict(q) for q in queries if str(q["id"]) not in cached]
    seed = get_settings().seed if seed is None else seed
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with path.open("a", encoding="utf-8") as handle:
        for batch in tqdm(batches, desc="self-sampling", disable=not progress or not batches):
            # A seed per batch (from its first query) makes each batch's samples repeatable,
            # whether or not the build was interrupted before it.
            batch_seed = seed * 1_000_003 + sum(ord(c) for c in str(batch[0]["id"]))
            with torch.random.fork_rng():
                torch.manual_seed(batch_seed)
                replies = generate_replies(
                    model, tokenizer, [[{"role": "user", "content": q["query"]}] for q in batch],
                    max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                    top_p=top_p, batch_size=len(batch),
                )
            for query, reply in zip(batch, replies):
                row = {"id": str(query["id"]), "category": str(query.get("category", "")),
                       "query": query["query"], "response": reply, "model": name}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                cached[row["id"]] = row
            handle.flush()
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


# --- a new special token ------------------------------------------------------------------


def add_special_token(model, tokenizer, token: str = SEP_TOKEN, init_text: str | None = None) -> int:
    """Add ``token`` as a special token, grow the embeddings, initialise its row; returns its id.

    The new row is the mean of the embeddings of ``init_text``'s tokens (the words the
    token stands for), or of all existing rows when ``init_text`` is None: either way it
    starts where the model's other embeddings live instead of at a random point. Calling
    it again for the same token does nothing but return the id.
    """
    if token in tokenizer.get_vocab():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id < model.get_input_embeddings().weight.shape[0]:
            return token_id
    embeddings = model.get_input_embeddings().weight
    old_rows = embeddings.shape[0]
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


# --- LoRA SFT through TRL -----------------------------------------------------------------


def lora_config(model, *, trainable_tokens: Sequence[int] = (), r: int = 8, lora_alpha: int = 16):
    """LoRA on the attention projections (chapter 1's ``delta.peft_config``) plus token rows.

    ``trainable_tokens`` are embedding rows trained along with LoRA (PEFT's
    ``trainable_token_indices``: a small delta on those rows only, the rest stays frozen).
    """
    knobs = dict(r=r, lora_alpha=lora_alpha)
    rows = model.get_input_embeddings().weight.shape[0]
    outside = [i for i in trainable_tokens if not 0 <= int(i) < rows]
    if outside:
        raise ValueError(f"token ids {outside} are outside the embedding matrix ({rows} rows); "
                         "add the token with add_special_token first")
    if trainable_tokens:
        knobs["trainable_token_indices"] = [int(i) for i in trainable_tokens]
    return delta.peft_config("lora", model, **knobs)


def _progress_callback():
    from transformers import TrainerCallback

    class TqdmSteps(TrainerCallback):
        """One tqdm bar over the optimizer steps with the latest loss (instead of log tables)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc="SFT")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return TqdmSteps()


def _course_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class CourseSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with the model's own loss instead of TRL's fused LM head.

        TRL 1.16 computes the loss by reading ``lm_head.weight`` and ``lm_head.bias``
        directly (without building the logits). With PEFT's trainable token rows on a
        tied head, the head is a ``TrainableTokensWrapper``: that path fails ("no attribute
        'bias'") and would skip the new token's delta on the output side anyway. The
        model's forward builds the full logits instead, which a CPU affords at this size.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False},
                                        return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return CourseSFTTrainer


@contextmanager
def _quiet_setup():
    """No dataset progress bars (TRL's four passes over a few dozen rows take milliseconds)
    and no deprecation warning that transformers raises inside PEFT/TRL calls."""
    import datasets

    were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()


def _sft_dataset(rows: Sequence[Mapping]):
    from datasets import Dataset

    if not rows:
        raise ValueError("no training rows")
    for number, row in enumerate(rows):
        if not isinstance(row.get("prompt"), list) or not isinstance(row.get("completion"), list):
            raise ValueError(
                f"training row {number} needs 'prompt' and 'completion' message lists "
                "(as judging_task / cache_rows_to_sft / mix produce)"
            )
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def sft_trainer(model, tokenizer, rows: Sequence[Mapping], *, epochs: float = 1.0, num_steps: int | None = None,
                lr: float = 1e-3, batch_size: int = 4, max_length: int = 128,
                trainable_tokens: Sequence[int] = (), r: int = 8, seed: int | None = None,
                progress: bool = True):
    """A TRL ``SFTTrainer`` for LoRA on a *copy* of ``model`` (the given model stays untouched).

    Rows are conversational prompt/completion pairs, so TRL renders them with the chat
    template and puts the loss on the completion tokens only (``completion_only_loss``).
    CPU settings: fp32, no gradient checkpointing (the model is small; recomputing costs
    time), no checkpoints written, a constant learning rate for these short runs.
    """
    from transformers import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback
    from trl import SFTConfig

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("SFT on chat rows needs a tokenizer with a chat template (smollm2-135m, tiny-llama)")
    seed = get_settings().seed if seed is None else seed
    config = SFTConfig(
        output_dir=str(cache_path("sft", "runs")),
        num_train_epochs=epochs,
        max_steps=num_steps if num_steps is not None else -1,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_length=max_length,
        completion_only_loss=True,
        activation_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
    )
    with _quiet_setup():
        trainer = _course_trainer_class()(
            model=copy.deepcopy(model),
            args=config,
            train_dataset=_sft_dataset(rows),
            processing_class=tokenizer,
            peft_config=lora_config(model, trainable_tokens=trainable_tokens, r=r),
        )
    for callback in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(callback)
    if progress:
        trainer.add_callback(_progress_callback())
    return trainer


@dataclass
class SFTRun:
    """A finished SFT run: the tuned (PEFT) model and what it cost."""

    model: object
    steps: int
    seconds: float
    tokens: int  # real (non-padding) tokens the model was trained on
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_sft(model, tokenizer, rows: Sequence[Mapping], **options) -> SFTRun:
    """Train LoRA (and any ``trainable_tokens`` rows) on a copy of ``model``; see ``sft_trainer``."""
    seed_everything(options.get("seed"))
    trainer = sft_trainer(model, tokenizer, rows, **options)
    start = time.perf_counter()
    with _quiet_setup():
        trainer.train()
    seconds = time.perf_counter() - start
    tuned = trainer.model
    tuned.eval()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # Tokens seen: every row is used once per epoch (the last batch may be short).
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    epochs_done = trainer.state.epoch or 0.0
    tokens = round(sum(lengths) * epochs_done)
    return SFTRun(model=tuned, steps=trainer.state.global_step, seconds=seconds, tokens=tokens, losses=losses)


def token_embedding(model, token_id: int) -> torch.Tensor:
    """The input embedding the model really uses for ``token_id`` (PEFT token deltas included)."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor([token_id]))[0].clone()


# --- evaluation ---------------------------------------------------------------------------


@dataclass
class Ability:
    """A named category of held-out rows and how it is scored."""

    name: str
    kind: str  # "qa" (answer containment, else token F1) or "multiple_choice" (accuracy)
    rows: list[dict]


QA_ABILITIES = ("geography", "chemistry", "science", "trivia")


def ability_suite(per_category: int, *, seed: int = 0, max_chars: int = 400) -> dict[str, Ability]:
    """General-ability categories from the *test* splits: QA categories and MMLU subject groups.

    QA: the categories of ``short_qa`` (capitals, elements, science facts, trivia), scored
    by answer containment (else token F1); MMLU: the four subject groups, scored by
    multiple-choice accuracy, using questions of at most ``max_chars`` characters with
    their choices (long ones, mostly professional law, cost a CPU the most time).
    At most ``per_category`` rows each, drawn with ``seed``.
    """
    from .data import load_data

    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    rng = random.Random(seed)
    suite: dict[str, Ability] = {}
    qa = defaultdict(list)
    for row in load_data("short_qa")["test"]:
        qa[row["category"]].append(dict(row))
    for name in QA_ABILITIES:
        rows = qa[name]
        suite[name] = Ability(name, "qa", rng.sample(rows, min(per_category, len(rows))))
    mc = defaultdict(list)
    for row in load_data("mmlu")["test"]:
        if len(multiple_choice_text(row)) <= max_chars:
            mc[mmlu_group(row["subject"])].append(dict(row))
    for group in MMLU_GROUPS:
        rows = mc[group]
        suite[f"MMLU {group}"] = Ability(f"MMLU {group}", "multiple_choice",
                                         rng.sample(rows, min(per_category, len(rows))))
    return suite


def qa_score(prediction: str, reference: str) -> float:
    """1.0 if the normalised reference appears as whole words in the prediction, else token F1."""
    answer, said = normalize_answer(reference), normalize_answer(prediction)
    if answer and re.search(rf"(^| ){re.escape(answer)}( |$)", said):
        return 1.0
    return token_f1(prediction, reference)


@torch.no_grad()
def multiple_choice_accuracy(model, tokenizer, rows: Sequence[Mapping], *, batch_size: int = 16) -> float:
    """Accuracy of picking the letter with the highest next-token logit after the chat prompt.

    Prompts are batched by length, so one long question does not pad a whole batch.
    """
    from .chat import render_prompts

    if not rows:
        raise ValueError("no multiple-choice rows to score")
    letters = [tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in "ABCD"]
    prompts = render_prompts(tokenizer, [
        [{"role": "user", "content": multiple_choice_text(row) + "\nAnswer with the letter of the right choice."}]
        for row in rows
    ])
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    correct = 0
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False)
            logits = model(**encoded).logits[:, -1, letters]  # left padding: -1 is the last real token
            for i, choice in zip(batch, logits.argmax(dim=-1).tolist()):
                correct += int(choice == rows[i]["label"])
    finally:
        tokenizer.padding_side = old_side
    return correct / len(rows)


def judging_scores(task_rows: Sequence[Mapping], replies: Sequence[str]) -> dict:
    """Task accuracy (invalid replies count as wrong), strict-format validity, share of JSON replies."""
    if len(replies) != len(task_rows) or not replies:
        raise ValueError(f"{len(replies)} replies for {len(task_rows)} task rows")
    verdicts = [parse_verdict(reply) for reply in replies]
    n = len(task_rows)
    return {
        "accuracy": sum(v is not None and v["hallucination"] == row["label"]
                        for v, row in zip(verdicts, task_rows)) / n,
        "format_valid": sum(v is not None for v in verdicts) / n,
        "json_rate": sum(looks_like_json(reply) for reply in replies) / n,
    }


def evaluate_judging(model, tokenizer, task_rows: Sequence[Mapping], *, batch_size: int = 16,
                     max_new_tokens: int = 40) -> dict:
    """``judging_scores`` of the model's greedy replies, with the replies."""
    replies = generate_replies(model, tokenizer, [row["prompt"] for row in task_rows],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {**judging_scores(task_rows, replies), "replies": replies}


def evaluate_abilities(model, tokenizer, abilities: Mapping[str, Ability], *, batch_size: int = 16,
                       max_new_tokens: int = 16) -> dict[str, float]:
    """Mean score per ability (QA: containment/F1 of a greedy reply; MMLU: accuracy).

    The QA questions of all categories are generated in one batched pass (fewer, fuller
    batches are much faster on a CPU than one short pass per category).
    """
    return _ability_scores(model, tokenizer, abilities, batch_size=batch_size, max_new_tokens=max_new_tokens)[0]


def _ability_scores(model, tokenizer, abilities, *, batch_size, max_new_tokens) -> tuple[dict[str, float], list[str]]:
    for name, ability in abilities.items():
        if ability.kind not in ("qa", "multiple_choice"):
            raise ValueError(f"ability {name!r} has unknown kind {ability.kind!r}; use 'qa' or 'multiple_choice'")
        if not ability.rows:
            raise ValueError(f"ability {name!r} has no rows")
    qa_rows = [(name, row) for name, ability in abilities.items() if ability.kind == "qa" for row in ability.rows]
    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": row["question"]}] for _, row in qa_rows],
                               max_new_tokens=max_new_tokens, batch_size=batch_size) if qa_rows else []
    qa_points: dict[str, list[float]] = defaultdict(list)
    for (name, row), reply in zip(qa_rows, replies):
        qa_points[name].append(qa_score(reply, row["answer"]))
    scores = {}
    for name, ability in abilities.items():
        if ability.kind == "qa":
            scores[name] = sum(qa_points[name]) / len(qa_points[name])
        else:
            scores[name] = multiple_choice_accuracy(model, tokenizer, ability.rows, batch_size=batch_size)
    return scores, replies


def scorecard(model, tokenizer, task_rows: Sequence[Mapping], abilities: Mapping[str, Ability], *,
              probe_rows: Sequence[Mapping] | None = None, batch_size: int = 16) -> dict[str, float]:
    """One flat dict of scores: the task, the "DO NOT" probe (if given), and every ability.

    - ``task accuracy``: right verdicts / rows; ``format valid``: strict JSON replies / rows;
    - ``JSON despite DO NOT``: replies in JSON although the prompt said not to (lower is better);
    - ``JSON on plain questions``: replies in JSON to the QA abilities' questions, which
      never ask for it (format over-fitting; lower is better);
    - one entry per ability, in [0, 1].
    """
    probe_rows = list(probe_rows or [])
    task_rows = list(task_rows)
    replies = generate_replies(model, tokenizer, [row["prompt"] for row in task_rows + probe_rows],
                               max_new_tokens=40, batch_size=batch_size)
    judged = judging_scores(task_rows, replies[:len(task_rows)])
    card = {"task accuracy": judged["accuracy"], "format valid": judged["format_valid"]}
    if probe_rows:
        card["JSON despite DO NOT"] = judging_scores(probe_rows, replies[len(task_rows):])["json_rate"]
    scores, qa_replies = _ability_scores(model, tokenizer, abilities, batch_size=batch_size, max_new_tokens=16)
    if qa_replies:
        card["JSON on plain questions"] = sum(looks_like_json(r) for r in qa_replies) / len(qa_replies)
    card.update(scores)
    return card


def format_table(results: Mapping[str, Mapping[str, float]], digits: int = 2) -> str:
    """Recipes as columns, scores as rows, as aligned text."""
    recipes = list(results)
    metrics = list(dict.fromkeys(m for card in results.values() for m in card))
    width = max(len(m) for m in metrics) + 2
    columns = [max(len(r), digits + 3) + 2 for r in recipes]
    lines = ["".ljust(width) + "".join(r.rjust(c) for r, c in zip(recipes, columns))]
    for metric in metrics:
        cells = [f"{results[r][metric]:.{digits}f}" if metric in results[r] else "-" for r in recipes]
        lines.append(metric.ljust(width) + "".join(cell.rjust(c) for cell, c in zip(cells, columns)))
    return "\n".join(lines)


# --- plots ----------------------------------------------------------------------------------

TASK_METRICS = ("task accuracy", "format valid", "JSON despite DO NOT", "JSON on plain questions")


def plot_scorecards(results: Mapping[str, Mapping[str, float]], baseline: str = "base"):
    """Left: the task scores per recipe. Right: each ability's change from ``baseline``."""
    import matplotlib.pyplot as plt
    import numpy as np

    if baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among the results {list(results)}")
    recipes = list(results)
    tuned = [r for r in recipes if r != baseline]
    task = [m for m in TASK_METRICS if m in results[baseline]]
    abilities = [m for m in results[baseline] if m not in TASK_METRICS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2]})
    width = 0.8 / len(recipes)
    for i, recipe in enumerate(recipes):
        x = np.arange(len(task)) + i * width
        left.bar(x, [results[recipe].get(m, np.nan) for m in task], width, label=recipe)
    left.set_xticks(np.arange(len(task)) + width * (len(recipes) - 1) / 2,
                    [textwrap.fill(m, 12) for m in task], fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_title("the <sep> task and its format")
    left.legend(fontsize=8)
    width = 0.8 / max(1, len(tuned))
    for i, recipe in enumerate(tuned):
        x = np.arange(len(abilities)) + i * width
        change = [results[recipe].get(m, np.nan) - results[baseline][m] for m in abilities]
        right.bar(x, change, width, label=recipe, color=f"C{recipes.index(recipe)}")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(np.arange(len(abilities)) + width * (len(tuned) - 1) / 2, abilities, rotation=25, ha="right")
    right.set_ylabel(f"score change vs {baseline}")
    right.set_title("general ability per category after tuning")
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_scaling(cards_by_size: Mapping[int, Mapping[str, float]], metrics: Sequence[str] | None = None):
    """One curve per category: score against the number of task rows trained on."""
    import matplotlib.pyplot as plt

    sizes = sorted(cards_by_size)
    metrics = list(metrics or [m for m in cards_by_size[sizes[0]] if m != "JSON despite DO NOT"])
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: one per curve
    for i, metric in enumerate(metrics):
        style = "-" if metric in TASK_METRICS else "--"
        ax.plot(sizes, [cards_by_size[s].get(metric) for s in sizes], style, marker="o", label=metric,
                color=colours[(2 * i) % 20 + (2 * i) // 20 % 2])
    ax.set_xlabel("task rows in training")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(sizes)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title("data scale per ability")
    fig.tight_layout()
    return fig
