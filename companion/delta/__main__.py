"""``python -m companion.delta``: see ``companion.delta.command``."""

from .. import cli
from .command import main

raise SystemExit(cli.run(main))
