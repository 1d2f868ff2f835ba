"""Chatting with a model: batched replies and multi-turn chat, in code, in a terminal, in a browser.

- ``Assistant(model, tokenizer, identity=...)`` (``assistant``): batched replies, running
  conversations, streamed replies through the model's chat template, with an identity line
  as the system message; ``generate_replies`` is the batched generation under it.
- ``python -m companion.chat`` (``command``): a terminal chat (``terminal``) with the default
  model or a saved delta (``sources``), or with ``--web`` a Gradio web chat (``web``, the
  optional ``web`` extra) with a dropdown of the saved deltas.
"""

from .assistant import (
    IDENTITY_FILE,
    ROLES,
    Assistant,
    Conversation,
    ConversationError,
    Message,
    check_conversation,
    check_options,
    generate_replies,
    read_identity,
    render_prompts,
    stream_reply,
)
from .sources import find_deltas, open_model, resolve_delta

__all__ = [
    "IDENTITY_FILE", "ROLES", "Assistant", "Conversation", "ConversationError", "Message", "check_conversation",
    "check_options", "find_deltas", "generate_replies", "open_model", "read_identity", "render_prompts",
    "resolve_delta", "stream_reply",
]
