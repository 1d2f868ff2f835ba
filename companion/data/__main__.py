"""``python -m companion.data fetch|list``: see ``companion.data.command``."""

from .command import main

if __name__ == "__main__":
    raise SystemExit(main())
