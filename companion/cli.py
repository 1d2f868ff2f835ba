"""How every command line of the course reports errors: one line ``error: ...``, exit code 2.

The course's commands (``python -m companion.delta``, ``chips``, ``kv``, ``course``,
``chat``) wrap their ``main`` with :func:`run`. Bad input (a missing file, a damaged
checkpoint, an unknown model or method, a malformed config) raises an exception whose
message already names the problem and the fix; ``run`` prints that message on one line and
exits with status 2, the convention of argparse for usage errors. ``--debug`` (anywhere on
the command line) shows the full traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .models import ModelNotAvailableError

DEBUG_FLAG = "--debug"
BAD_INPUT_EXIT = 2
INTERNAL_ERROR_EXIT = 1

# Errors that mean "the input is wrong" (their messages name the fix).
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, OSError, ModelNotAvailableError)


def add_debug_flag(parser) -> None:
    """Document ``--debug`` in a command's ``--help`` (``run`` acts on it)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of an error")


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts and sizes: a whole number >= 1, or a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    return " ".join(text.split())


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)`` and turn an exception into one ``error:`` line and an exit code.

    Returns the exit status: ``main``'s, 2 for bad input, 1 for an unexpected error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BAD_INPUT_ERRORS as error:
        if debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return BAD_INPUT_EXIT
    except Exception as error:  # a bug, not bad input: say how to get the traceback
        if debug:
            raise
        print(f"error: unexpected {type(error).__name__}: {_one_line(error)} "
              f"(run again with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return INTERNAL_ERROR_EXIT
    return int(status or 0)
