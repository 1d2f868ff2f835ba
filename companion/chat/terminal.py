"""The terminal chat: read a line, stream the reply, keep the history; ``/reset`` and ``/quit``."""

from __future__ import annotations

import sys
from typing import TextIO

from .assistant import Assistant

HELP = "Type a message and press Enter; /reset forgets the conversation, /quit (or Ctrl-D) leaves."
COMMANDS = {"/reset": "forget the conversation so far", "/quit": "leave the chat", "/help": "show this help"}


def terminal_chat(assistant: Assistant, lines: TextIO | None = None, out: TextIO | None = None, *,
                  you: str = "you> ", model: str = "assistant> ") -> int:
    """Chat on ``lines`` (standard input) and ``out`` (standard output) until ``/quit`` or end of input.

    Returns the number of replies given. Each reply is printed as it is generated.
    """
    lines = sys.stdin if lines is None else lines
    out = sys.stdout if out is None else out
    print(HELP, file=out)
    replies = 0
    while True:
        print(you, end="", file=out, flush=True)
        line = lines.readline()
        if not line:  # end of input (Ctrl-D, or the end of a piped file)
            print(file=out)
            return replies
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return replies
        if text == "/reset":
            assistant.reset()
            print("(conversation forgotten; the identity line stays)", file=out)
            continue
        if text.startswith("/"):
            known = ", ".join(f"{name} ({what})" for name, what in COMMANDS.items())
            if text != "/help":
                print(f"unknown command {text}; commands: {known}", file=out)
            else:
                print(f"{HELP}\ncommands: {known}", file=out)
            continue
        print(model, end="", file=out, flush=True)
        shown = ""
        for partial in assistant.chat_stream(text):
            # each item is the whole reply so far: print only what is new
            out.write(partial[len(shown):] if partial.startswith(shown) else "\n" + partial)
            out.flush()
            shown = partial
        print(file=out, flush=True)
        replies += 1
