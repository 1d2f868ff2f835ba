"""Chatting with a model through its chat template: batched replies, multi-turn, identity line.

``Assistant(model, tokenizer, identity=...)`` answers lists of conversations in batches
(``reply``), single questions (``ask``), keeps a running conversation (``chat``), or streams
a reply piece by piece (``stream``, used by the terminal and web chats). The identity line
becomes the system message, so the model knows who it is supposed to be.

``generate_replies`` is the batched generation under all of it; ``companion.sft`` uses it
for self-sampling and for evaluation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..config import DATA_DIR
from ..models import padding_side
from ..progress import progress as progress_bar

IDENTITY_FILE = DATA_DIR / "identity.txt"
ROLES = ("system", "user", "assistant")

Message = dict[str, str]
Conversation = list[Message]


class ConversationError(ValueError, TypeError):
    """A conversation that is not a list of ``{"role": ..., "content": ...}`` messages."""


def read_identity(path: str | Path = IDENTITY_FILE) -> str:
    """The identity line: the first non-empty line of ``path`` that is not a ``#`` comment."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"identity file {path} does not exist; pass identity='...' text instead")
    if path.is_dir():
        raise IsADirectoryError(f"identity file {path} is a folder; give the text file with the identity line")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise ValueError(f"identity file {path} has no identity line (only blank or # lines)")


def check_conversation(conversation: Sequence[Message], where: str = "conversation") -> None:
    """Raise a clear error unless ``conversation`` is a non-empty list of role/content messages."""
    if isinstance(conversation, (str, dict)) or not isinstance(conversation, Sequence) or not conversation:
        raise ConversationError(
            f"{where} must be a non-empty list of messages like "
            "[{'role': 'user', 'content': 'Hi'}]; for plain questions use Assistant.ask"
        )
    for number, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise ConversationError(
                f"{where}, message {number}: expected a dict with 'role' and 'content', got {message!r}"
            )
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ConversationError(
                f"{where}, message {number} has no {' and no '.join(repr(k) for k in missing)} "
                f"(it has {', '.join(map(repr, message)) or 'no keys'}); every message needs "
                "'role' (one of system, user, assistant) and 'content'"
            )
        if message["role"] not in ROLES:
            raise ConversationError(f"{where}, message {number}: role {message['role']!r} is not one of {ROLES}")
        if not isinstance(message["content"], str):
            raise ConversationError(f"{where}, message {number}: content must be a string")


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
    check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  repetition_penalty=repetition_penalty)
    prompts = render_prompts(tokenizer, conversations)
    # Chat templates already write the BOS/special tokens, so the tokenizer must not add more.
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    replies: list[str] = [""] * len(prompts)
    settings = _generate_settings(tokenizer, max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    description = progress if isinstance(progress, str) else "generating"
    try:
        with padding_side(tokenizer, "left"):
            for batch in progress_bar(batches, desc=description, disable=not progress):
                encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                    add_special_tokens=False)
                output = model.generate(**encoded, **settings)
                new_tokens = output[:, encoded["input_ids"].shape[1]:]
                for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    replies[i] = text.strip()
    finally:
        model.train(was_training)
    return replies


def check_options(*, max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float) -> None:
    """Raise a clear error for generation settings ``generate`` would reject deep inside."""
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy decoding for no randomness), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 means none), got {repetition_penalty}")


def _generate_settings(tokenizer, max_new_tokens, do_sample, temperature, top_p, repetition_penalty) -> dict:
    # top_k=None switches off transformers' default top-k, so only top-p trims the sampling.
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
                if do_sample else dict(do_sample=False))
    return dict(max_new_tokens=int(max_new_tokens), pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=repetition_penalty, **sampling)


def stream_reply(
    model,
    tokenizer,
    conversation: Conversation,
    *,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    repetition_penalty: float = 1.0,
    **_unused,
) -> Iterator[str]:
    """The model's reply to one conversation, yielded as it grows (each item: the text so far).

    The same generation as ``generate_replies`` for one conversation (the last item equals
    its reply); ``generate`` runs in a worker thread and transformers' ``TextIteratorStreamer``
    hands over the decoded text. An error in the worker is raised here. Closing the generator
    early (a web user pressing Stop) stops the generation at the next token.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class StopWhenAsked(StoppingCriteria):
        def __init__(self):
            self.asked = threading.Event()

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), self.asked.is_set(), dtype=torch.bool)

    check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  repetition_penalty=repetition_penalty)
    prompt = render_prompts(tokenizer, [conversation])[0]
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    settings = _generate_settings(tokenizer, max_new_tokens, do_sample, temperature, top_p, repetition_penalty)
    failure: list[BaseException] = []
    stop = StopWhenAsked()

    def work():
        try:
            with torch.no_grad():  # no_grad is per thread: set it in the worker
                model.generate(**encoded, streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]),
                               **settings)
        except BaseException as error:  # handed to the caller below
            failure.append(error)
            streamer.end()

    was_training = model.training
    model.eval()
    worker = threading.Thread(target=work, name="chat-generate", daemon=True)
    worker.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            if text.strip():
                yield text.strip()
    finally:
        stop.asked.set()  # no-op when generation is done; otherwise the caller stopped reading
        worker.join()
        model.train(was_training)
    if failure:
        raise failure[0]
    if not text.strip():
        yield ""


class Assistant:
    """Batched chat with a model through its chat template, with an optional identity line.

    The identity line is the system message. Give it one of two ways, never both:

    - ``identity="You are ..."``: the text itself (``True``: the course's
      ``data/identity.txt``; ``None``/``False``: the chat template's own default);
    - ``identity_file="path/to/identity.txt"``: read the first line that is not blank or a
      ``#`` comment (``read_identity``). A ``Path`` given as ``identity`` is read too.

    A string ``identity`` that names an existing file, or looks like a file name, is refused
    with a message pointing to ``identity_file=`` (the path text would otherwise silently
    become the system prompt). Greedy by default (answers repeat); pass ``do_sample=True``
    for varied answers.
    """

    def __init__(self, model, tokenizer, identity: str | Path | bool | None = None, *,
                 identity_file: str | Path | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 0.7,
                 top_p: float = 0.95, repetition_penalty: float = 1.0, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.identity: str | None = _identity_text(identity, identity_file)
        check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      repetition_penalty=repetition_penalty)
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
            raise ConversationError(
                "reply takes a list of conversations (each a list of messages); for one use chat/ask"
            )
        return generate_replies(self.model, self.tokenizer,
                                [self.with_identity(c) for c in conversations],
                                **{**self.options, **options})

    def stream(self, conversation: Conversation, **options) -> Iterator[str]:
        """The assistant's next message in one conversation, yielded as it grows."""
        check_conversation(conversation)
        return stream_reply(self.model, self.tokenizer, self.with_identity(conversation),
                            **{**self.options, **options})

    def ask(self, questions: Sequence[str] | str, **options) -> list[str] | str:
        """Answer one question (returns a string) or many (a list), each in a fresh conversation."""
        single = isinstance(questions, str)
        items = [questions] if single else list(questions)
        answers = self.reply([[{"role": "user", "content": q}] for q in items], **options)
        return answers[0] if single else answers

    def chat(self, text: str, **options) -> str:
        """Say ``text`` in the running conversation and get the reply; both join the history."""
        answer = ""
        for answer in self.chat_stream(text, **options):
            pass
        return answer

    def chat_stream(self, text: str, **options) -> Iterator[str]:
        """``chat``, yielding the reply as it grows; the finished turn joins the history."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("chat needs a non-empty message")
        conversation = self.history + [{"role": "user", "content": text}]
        answer = ""
        for answer in self.stream(conversation, **options):
            yield answer
        self.history = conversation + [{"role": "assistant", "content": answer}]

    def reset(self) -> None:
        """Forget the running conversation (the identity line stays)."""
        self.history = []


FILE_SUFFIXES = (".txt", ".md", ".text")


def _names_a_file(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a file
        return False


def _identity_text(identity, identity_file) -> str | None:
    """The system message from ``Assistant``'s ``identity``/``identity_file`` arguments."""
    if identity_file is not None:
        if identity not in (None, False):
            raise ValueError("give the identity line either as identity='text' or as identity_file='path', not both")
        return read_identity(identity_file)
    if identity is True:
        return read_identity()
    if identity is None or identity is False:
        return None
    if isinstance(identity, Path):
        return read_identity(identity)
    if not isinstance(identity, str):
        raise TypeError(f"identity must be text, True or None, got {type(identity).__name__}")
    text = identity.strip()
    if (" " not in text and text.lower().endswith(FILE_SUFFIXES)) or _names_a_file(text):
        raise ValueError(
            f"identity={identity!r} looks like a file name, not an identity line; pass "
            f"identity_file={identity!r} to read the line from that file"
        )
    return text or None
