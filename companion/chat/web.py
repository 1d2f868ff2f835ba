"""The web chat: Gradio's ``ChatInterface`` over the same ``Assistant`` as the terminal chat.

``build_app`` makes a page with a model dropdown (the base model and every saved delta that
``sources.find_deltas`` lists) and a chat box whose replies stream in as they are
generated; ``launch`` serves it on 127.0.0.1 only. Gradio is an optional extra
(``pip install -e .[web]``) so the core course stays lean; it is imported here only.
The page uses system fonts, so it looks right on a machine with no internet access.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ..config import shown_path
from .assistant import Assistant
from .sources import BASE_CHOICE, find_deltas, open_model

HOST = "127.0.0.1"  # loopback only: a workshop laptop's chat is not served to the network
TITLE = "Chat with what you tuned"


class WebExtraMissing(ModuleNotFoundError, LookupError):
    """Gradio is not installed (a LookupError too, so the command line prints one error line)."""


def import_gradio():
    """The ``gradio`` module, or an error naming the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio
    except ModuleNotFoundError:
        raise WebExtraMissing(
            "the web chat needs gradio, an optional extra: pip install -e '.[web]' "
            "(or use the terminal chat: python -m companion.chat)"
        ) from None
    return gradio


class ModelShelf:
    """The model the web chat talks to, loaded on first use; picking another one replaces it.

    ``choices`` maps each dropdown label to a delta folder (``None`` for the base model).
    One model is kept in memory at a time; a lock keeps two requests from loading at once.
    """

    def __init__(self, choices: Mapping[str, Path | None], make_assistant: Callable, base_model: str | None = None):
        self.choices = dict(choices)
        self.make_assistant = make_assistant
        self.base_model = base_model
        self.current: tuple[str, Assistant] | None = None
        self.lock = threading.Lock()

    def assistant(self, label: str) -> Assistant:
        if label not in self.choices:
            raise ValueError(f"unknown model choice {label!r}; choose one of: {', '.join(self.choices)}")
        with self.lock:
            if self.current is None or self.current[0] != label:
                self.current = None  # free the old model before loading the new one
                model, tokenizer, _ = open_model(self.choices[label], self.base_model)
                self.current = (label, self.make_assistant(model, tokenizer))
            return self.current[1]


def model_choices(base_model: str, deltas_root: str | Path | None = None,
                  extra_delta: str | Path | None = None) -> dict[str, Path | None]:
    """Dropdown label -> delta folder: the base model first, then the saved deltas."""
    choices: dict[str, Path | None] = {f"{BASE_CHOICE} ({base_model})": None}
    for name, folder in find_deltas(deltas_root).items():
        choices[f"delta: {name}"] = folder
    if extra_delta is not None and Path(extra_delta).resolve() not in {
            p.resolve() for p in choices.values() if p is not None}:
        choices[f"delta: {shown_path(Path(extra_delta))}"] = Path(extra_delta)
    return choices


def _text(content) -> str:
    """A message's text, whether Gradio sent a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def build_app(shelf: ModelShelf, initial: str | None = None):
    """The Gradio page (a ``gr.Blocks``): a model dropdown above a streaming ``ChatInterface``."""
    gr = import_gradio()
    labels = list(shelf.choices)
    initial = initial or labels[0]

    def respond(message, history, choice) -> Iterator[str]:
        text = _text(message).strip()
        if not text:
            raise gr.Error("type a message first")
        conversation = [{"role": m["role"], "content": _text(m.get("content")).strip()}
                        for m in history or [] if m.get("role") in ("user", "assistant")]
        conversation.append({"role": "user", "content": text})
        yield from shelf.assistant(choice).stream(conversation)

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nPick the base model or a delta you saved, then type a message.")
        dropdown = gr.Dropdown(choices=labels, value=initial, label="Model", interactive=True)
        gr.ChatInterface(respond, additional_inputs=[dropdown], api_name="chat", analytics_enabled=False,
                         autofocus=False)
    return app


def launch(app, port: int | None = None, *, block: bool = True):
    """Serve ``app`` on 127.0.0.1 (``port`` None: Gradio's first free port from 7860).

    ``block=False`` returns at once (tests, notebooks); call ``app.close()`` to stop.
    Returns the page's address.
    """
    gr = import_gradio()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app.queue()
    app.launch(server_name=HOST, server_port=port, share=False, ssr_mode=False, prevent_thread_lock=True,
               quiet=True, show_error=True, theme=theme, mcp_server=False, pwa=False)
    url = app.local_url
    if block:
        print(f"web chat on {url} (Ctrl-C stops it)", flush=True)
        try:
            app.block_thread()
        finally:
            app.close()
    return url
