"""``python -m companion.delta ask --delta PATH [-q QUESTION]``: ask a saved delta questions."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import cli
from ..config import get_settings, seed_everything
from ..prompting import DEFAULT_TEMPLATE
from .answering import ask, interactive
from .checkpoint import delta_info, load_delta, load_delta_tokenizer

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.delta", description="Ask a saved delta questions.")
    commands = parser.add_subparsers(dest="command", required=True)
    ask_parser = commands.add_parser("ask", help="answer questions with a saved delta")
    ask_parser.add_argument("--delta", required=True, help="folder written by save_delta")
    ask_parser.add_argument("-q", "--question", action="append", help="ask this and exit (repeatable)")
    ask_parser.add_argument("--base", help="backbone to load instead of the one the delta names")
    cli.add_debug_flag(ask_parser)
    args = parser.parse_args(argv)

    from ..models import load_lm

    seed_everything()
    info = delta_info(args.delta)
    base, _ = load_lm(args.base or info["backbone"]["name"] or get_settings().model)
    model = load_delta(args.delta, base)
    tokenizer = load_delta_tokenizer(args.delta)
    template = info.get("template", DEFAULT_TEMPLATE)
    if args.question:
        for question in args.question:
            print(f"Q: {question}\nA: {ask(model, tokenizer, question, template=template)}")
    else:
        interactive(model, tokenizer, template=template)
    return 0
