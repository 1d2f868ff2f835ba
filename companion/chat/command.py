"""``python -m companion.chat``: chat in the terminal (or, with ``--web``, in a browser).

Examples::

    python -m companion.chat                                  # the course's default model
    python -m companion.chat --delta outputs/deltas/ch3_delia  # a delta you saved (folder or name)
    python -m companion.chat --web                            # a web chat on http://127.0.0.1:7860
    python -m companion.chat --greedy --max-new-tokens 40 --identity my_identity.txt

Errors (a missing or mismatched delta, a bad setting) print one line ``error: ...`` and exit
with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import cli
from ..config import get_settings, seed_everything, shown_path
from .assistant import IDENTITY_FILE, Assistant, check_options, read_identity
from .sources import DELTAS_ROOT, open_model


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m companion.chat",
        description="Chat with the course's model or with a delta you saved. In the terminal: "
                    "/reset forgets the conversation, /quit leaves.",
    )
    what = parser.add_argument_group("what to chat with")
    what.add_argument("--delta", help="a saved delta: its folder, or its name under outputs/deltas/ "
                                      "(e.g. ch1/lora); default: the base model")
    what.add_argument("--model", help="base model (default: COURSE_MODEL, or the backbone the delta names)")
    what.add_argument("--identity", metavar="FILE", default=str(IDENTITY_FILE),
                      help=f"file with the identity line (default: {shown_path(IDENTITY_FILE)})")
    what.add_argument("--no-identity", action="store_true", help="no identity line: the chat template's default")
    sampling = parser.add_argument_group("generation")
    sampling.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default 128)")
    sampling.add_argument("--greedy", action="store_true", help="always the likeliest token (no sampling)")
    sampling.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    sampling.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    sampling.add_argument("--repetition-penalty", type=float, default=1.1,
                          help="> 1 discourages loops (default 1.1; 1 = none)")
    sampling.add_argument("--seed", type=int, help="seed for sampling (default: COURSE_SEED)")
    web = parser.add_argument_group("web chat")
    web.add_argument("--web", action="store_true", help="serve a web chat on 127.0.0.1 instead (needs the web extra)")
    web.add_argument("--port", type=int, help="port of the web chat (default: the first free one from 7860)")
    web.add_argument("--deltas-dir", default=str(DELTAS_ROOT),
                     help=f"where the web chat's dropdown looks for deltas (default: {shown_path(DELTAS_ROOT)})")
    cli.add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Check everything cheap before loading a model, so a typo fails in a second.
    check_options(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty)
    identity = None if args.no_identity else read_identity(args.identity)
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.web:
        from .web import import_gradio

        import_gradio()  # the install hint before a model is loaded
    seed_everything(args.seed)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, batch_size=1)

    def make_assistant(model, tokenizer) -> Assistant:
        return Assistant(model, tokenizer, identity=identity, **options)

    if args.web:
        return _serve(args, make_assistant)
    model, tokenizer, label = open_model(args.delta, args.model, args.deltas_dir)
    from .terminal import terminal_chat

    print(f"chatting with {label}" + (f" as: {identity}" if identity else ""))
    terminal_chat(make_assistant(model, tokenizer))
    return 0


def _serve(args, make_assistant) -> int:
    from .sources import resolve_delta
    from .web import ModelShelf, build_app, launch, model_choices

    base_model = args.model or get_settings().model
    delta = resolve_delta(args.delta, args.deltas_dir) if args.delta else None
    choices = model_choices(base_model, args.deltas_dir, extra_delta=delta)
    shelf = ModelShelf(choices, make_assistant, base_model=args.model)
    initial = next((label for label, folder in choices.items()
                    if folder is not None and delta is not None and folder.resolve() == delta.resolve()),
                   next(iter(choices)))
    shelf.assistant(initial)  # load now: a missing or mismatched delta fails here, not in the page
    launch(build_app(shelf, initial), args.port)
    return 0
