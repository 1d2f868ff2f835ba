"""``python -m companion.kv``: see ``companion.kv.command``."""

from ..cli import run
from .command import main

if __name__ == "__main__":
    raise SystemExit(run(main))
