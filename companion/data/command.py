"""The command line of the data registry: ``python -m companion.data fetch|list``."""

from __future__ import annotations

from .books import fetch_books
from .registry import REGISTRY, available_datasets, load_data
from .schema import SPLITS


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.data fetch|list``: prepare the offline data or list it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m companion.data")
    parser.add_argument("command", choices=["fetch", "list"])
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"books: {fetch_books()}")
    for name in available_datasets():
        spec = REGISTRY[name]
        if args.command == "list":
            data = load_data(name)
            sizes = ", ".join(f"{s} {len(data[s])}" for s in SPLITS)
            print(f"{name:14s} {spec.kind:16s} {sizes}")
    return 0
