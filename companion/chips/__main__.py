"""``python -m companion.chips``: see ``companion.chips.command``."""

from .. import cli
from .command import main

raise SystemExit(cli.run(main))
