"""LoRA SFT through TRL's ``SFTTrainer``: prompt/completion rows, loss on the completions only.

``train_sft`` copies the model, wraps it with LoRA (``companion.adapters.peft_config``, the
configuration chapter 1 uses too) plus trainable rows for new tokens (PEFT's
``trainable_token_indices``), and trains with TRL on conversational prompt/completion rows,
so the loss starts after the prompt. ``companion.sft.recipes`` has the small loop the
chapter's experiment uses (same task batches for every recipe, KL replay).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..adapters import peft_config
from ..config import cache_path, get_settings, seed_everything
from ..progress import progress as progress_bar


def lora_config(model, *, trainable_tokens: Sequence[int] = (), r: int = 8, lora_alpha: int | None = None):
    """LoRA on the attention projections plus trainable rows for ``trainable_tokens``.

    ``trainable_tokens`` are embedding rows trained along with LoRA (PEFT's
    ``trainable_token_indices``: a small delta on those rows only, the rest stays frozen).
    ``lora_alpha`` defaults to ``2 * r`` (the course's r=8, alpha=16).
    """
    knobs = dict(r=r, lora_alpha=2 * r if lora_alpha is None else lora_alpha)
    rows = model.get_input_embeddings().weight.shape[0]
    outside = [i for i in trainable_tokens if not 0 <= int(i) < rows]
    if outside:
        raise ValueError(f"token ids {outside} are outside the embedding matrix ({rows} rows); "
                         "add the token with add_special_token first")
    if trainable_tokens:
        knobs["trainable_token_indices"] = [int(i) for i in trainable_tokens]
    return peft_config("lora", model, **knobs)


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


def _progress_callback():
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        """One text bar over the optimizer steps with the latest loss (instead of log tables)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = progress_bar(total=state.max_steps, desc="SFT")

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return StepBar()


def _course_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class CourseSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with the model's own loss instead of TRL's fused LM head.

        TRL computes the loss by reading ``lm_head.weight`` and ``lm_head.bias`` directly.
        With PEFT's trainable token rows on a tied head, the head is a
        ``TrainableTokensWrapper``: that path fails ("no attribute 'bias'") and would skip
        the new token's delta on the output side anyway.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False},
                                        return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return CourseSFTTrainer


@contextmanager
def quiet_setup():
    """No dataset progress bars and no deprecation warning transformers raises inside PEFT/TRL."""
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


def check_rows(rows: Sequence[Mapping]) -> None:
    if not rows:
        raise ValueError("no training rows")
    for number, row in enumerate(rows):
        if not isinstance(row.get("prompt"), list) or not isinstance(row.get("completion"), list):
            raise ValueError(
                f"training row {number} needs 'prompt' and 'completion' message lists "
                "(as judging_task / cache_rows_to_sft / mix produce)"
            )


def _sft_dataset(rows: Sequence[Mapping]):
    from datasets import Dataset

    check_rows(rows)
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def sft_trainer(model, tokenizer, rows: Sequence[Mapping], *, epochs: float = 1.0, num_steps: int | None = None,
                lr: float = 1e-3, batch_size: int = 4, max_length: int = 128,
                trainable_tokens: Sequence[int] = (), r: int = 8, seed: int | None = None,
                progress: bool = True):
    """A TRL ``SFTTrainer`` for LoRA on a *copy* of ``model`` (the given model stays untouched).

    Rows are conversational prompt/completion pairs, so TRL renders them with the chat
    template and puts the loss on the completion tokens only (``completion_only_loss``).
    CPU settings: fp32, no gradient checkpointing, no checkpoints written, constant lr.
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
    with quiet_setup():
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


def train_sft(model, tokenizer, rows: Sequence[Mapping], **options) -> SFTRun:
    """Train LoRA (and any ``trainable_tokens`` rows) on a copy of ``model``; see ``sft_trainer``."""
    seed_everything(options.get("seed"))
    trainer = sft_trainer(model, tokenizer, rows, **options)
    start = time.perf_counter()
    with quiet_setup():
        trainer.train()
    seconds = time.perf_counter() - start
    tuned = trainer.model
    tuned.eval()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    tokens = round(sum(lengths) * (trainer.state.epoch or 0.0))
    return SFTRun(model=tuned, steps=trainer.state.global_step, seconds=seconds, tokens=tokens, losses=losses)
