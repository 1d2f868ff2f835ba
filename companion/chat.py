"""Chatting with a model through its chat template: batched replies, multi-turn, identity line.

``Assistant(model, tokenizer, identity=...)`` answers lists of conversations in batches
(``reply``), single questions (``ask``), or keeps a running conversation (``chat``). The
identity line (``data/identity.txt`` by default when ``identity=True``) becomes the system
message, so the model knows who it is supposed to be.

``generate_replies`` is the batched generation under all of it; ``companion.sft`` uses it
for self-sampling and for evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import DATA_DIR

IDENTITY_FILE = DATA_DIR / "identity.txt"
ROLES = ("system", "user", "assistant")

Message = dict[str, str]
Conversation = list[Message]


def read_identity(path: str | Path = IDENTITY_FILE) -> str:
    """The identity line: the first non-empty line of ``path`` that is not a ``#`` comment."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"identity file {path} does not exist; pass identity='...' text instead")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ValueError(f"identity file {path} has no identity line (only blank or # lines)")


def check_conversation(conversation: Sequence[Message], where: str = "conversation") -> None:
    """Raise a clear error unless ``conversation`` is a non-empty list of role/content messages."""
    if isinstance(conversation, (str, dict)) or not isinstance(conversation, Sequence) or not conversation:
        raise TypeError(
            f"{where} must be a non-empty list of messages like "
            "[{'role': 'user', 'content': 'Hi'}]; for plain questions use Assistant.ask"
        )
    for number, message in enumerate(conversation):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise TypeError(f"{where}, message {number}: expected a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}, message {number}: role {message['role']!r} is not one of {ROLES}")
        if not isinstance(message["content"], str):
            raise TypeError(f"{where}, message {number}: content must be a string")


def render_prompts(tokenizer, conversations: Sequence[Conversation]) -> list[str]:
    """Each conversation rendered by the chat template, ending with the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template; use a chat model (the default smollm2-135m, "
            "or tiny-llama in tests) or set tokenizer.chat_template"
        )
    for number, conversation in enumerate(conversations):
        check_conversation(conversation, f"conversation {number}")
    return [
        tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
    batch_size: int = 8,
    progress: bool | str = False,
) -> list[str]:
    """The model's reply to each conversation, generated ``batch_size`` at a time.

    Conversations are batched by prompt length (less padding, so faster) and the replies
    come back in the input order. Greedy unless ``do_sample``; sampling uses torch's
    global generator, so seed it (``seed_everything``) for repeatable samples.
    ``repetition_penalty`` > 1 discourages the loops small models fall into when greedy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = render_prompts(tokenizer, conversations)
    # Chat templates already write the BOS/special tokens, so the tokenizer must not add more.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    replies: list[str] = [""] * len(prompts)
    # top_k=None switches off transformers' default top-k, so only top-p trims the sampling.
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
                if do_sample else dict(do_sample=False))
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    description = progress if isinstance(progress, str) else "generating"
    try:
        for batch in tqdm(batches, desc=description, disable=not progress):
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False)
            output = model.generate(
                **encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=repetition_penalty, **sampling,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                replies[i] = text.strip()
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return replies


class Assistant:
    """Batched chat with a model through its chat template, with an optional identity line.

    ``identity`` is the system message: a string, a path to a file, ``True`` for the
    course's ``data/identity.txt``, or ``None`` for the chat template's own default.
    Greedy by default (answers repeat); pass ``do_sample=True`` for varied answers.
    """

    def __init__(self, model, tokenizer, identity: str | Path | bool | None = None, *,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 0.7,
                 top_p: float = 0.95, repetition_penalty: float = 1.0, batch_size: int = 8):
        if identity is True:
            identity = read_identity()
        elif isinstance(identity, Path):
            identity = read_identity(identity)
        elif identity is False:
            identity = None
        self.model, self.tokenizer = model, tokenizer
        self.identity: str | None = identity
        self.options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                            top_p=top_p, repetition_penalty=repetition_penalty, batch_size=batch_size)
        self.history: Conversation = []
        render_prompts(tokenizer, [[{"role": "user", "content": "check"}]])  # fail early if no template

    def with_identity(self, conversation: Sequence[Message]) -> Conversation:
        """``conversation`` with the identity line as its system message (unless it has one)."""
        conversation = list(conversation)
        if self.identity and (not conversation or conversation[0].get("role") != "system"):
            conversation.insert(0, {"role": "system", "content": self.identity})
        return conversation

    def reply(self, conversations: Sequence[Conversation], **options) -> list[str]:
        """The assistant's next message in each conversation (batched)."""
        if isinstance(conversations, (str, dict)) or not isinstance(conversations, Sequence):
            raise TypeError("reply takes a list of conversations (each a list of messages); for one use chat/ask")
        return generate_replies(self.model, self.tokenizer,
                                [self.with_identity(c) for c in conversations],
                                **{**self.options, **options})

    def ask(self, questions: Sequence[str] | str, **options) -> list[str] | str:
        """Answer one question (returns a string) or many (a list), each in a fresh conversation."""
        single = isinstance(questions, str)
        items = [questions] if single else list(questions)
        answers = self.reply([[{"role": "user", "content": q}] for q in items], **options)
        return answers[0] if single else answers

    def chat(self, text: str, **options) -> str:
        """Say ``text`` in the running conversation and get the reply; both join the history."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("chat needs a non-empty message")
        conversation = self.history + [{"role": "user", "content": text}]
        answer = self.reply([conversation], **options)[0]
        self.history = conversation + [{"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        """Forget the running conversation (the identity line stays)."""
        self.history = []
