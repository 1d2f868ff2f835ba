"""``python -m companion.chat``: see ``companion.chat.command``."""

from .. import cli
from .command import main

raise SystemExit(cli.run(main))
