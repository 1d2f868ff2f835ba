"""Executes the course notebooks end to end: ``python -m companion.course run [--fast]``.

Each notebook runs in a fresh kernel of this Python (nbclient), in the notebooks folder,
with ``COURSE_FAST`` set for the mode asked for. The executed notebook is written back in
place (or to ``--output-dir``) with its run time, mode and model in its metadata under
``course``, which ``benchmarks/notebook_times.py`` reads to build the README's table.

Before writing, each cell's stream outputs are tidied the way a terminal would show them
(``tidy_streams``): consecutive chunks of one stream are joined and a progress bar's
carriage-return updates collapse to its final line, so a saved notebook shows one line per
finished bar rather than every refresh.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import re

from . import cli
from .config import REPO_ROOT, figure_path, get_settings

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def course_notebooks() -> list[Path]:
    """The course's notebooks in reading order (``NN_name.ipynb``)."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@contextmanager
def _environment(**values: str):
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_OVERWRITTEN = re.compile(r"[^\n]*\r(?=[^\n])")


def _resolve_carriage_returns(text: str) -> str:
    """Text as a terminal shows it: what a carriage return rewrote is gone."""
    text = text.replace("\r\n", "\n")
    return _OVERWRITTEN.sub("", text).replace("\r", "")


def tidy_streams(notebook) -> None:
    """Join each cell's consecutive chunks of one stream and apply their carriage returns."""
    for cell in notebook.cells:
        if cell.get("cell_type") != "code":
            continue
        tidied = []
        for output in cell.get("outputs", []):
            previous = tidied[-1] if tidied else None
            if (output.get("output_type") == "stream" and previous is not None
                    and previous.get("output_type") == "stream" and previous.get("name") == output.get("name")):
                previous["text"] = previous["text"] + output["text"]
            else:
                tidied.append(output)
        for output in tidied:
            if output.get("output_type") == "stream":
                output["text"] = _resolve_carriage_returns(output["text"])
        cell["outputs"] = [o for o in tidied if o.get("output_type") != "stream" or o["text"].strip()]


def execute_notebook(path: str | Path, *, fast: bool, output: str | Path | None = None,
                     timeout: int = 3600) -> float:
    """Run one notebook top to bottom; returns the seconds it took.

    A failing cell stops the run with nbclient's ``CellExecutionError``, which names the
    cell and shows its traceback; the partly executed notebook is still written, so the
    failing output can be read.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; notebooks: {[p.name for p in course_notebooks()]}")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    load_before = round(os.getloadavg()[0], 1)  # other work on the machine slows a timed run
    start = time.perf_counter()
    completed = False
    # The kernel inherits this process's environment: that is how the mode reaches it.
    with _environment(COURSE_FAST="1" if fast else "0"):
        try:
            client.execute()
            completed = True
        finally:
            seconds = time.perf_counter() - start
            tidy_streams(notebook)
            notebook.metadata["course"] = {
                "mode": "fast" if fast else "full",
                "seconds": round(seconds, 1),
                "model": get_settings().model,
                "threads": get_settings().threads,
                "load_before": load_before,
                "load_after": round(os.getloadavg()[1], 1),  # 5-minute average: others' work during the run
                "completed": completed,
            }
            nbformat.write(notebook, Path(output) if output else path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks (all of them by default)")
    run.add_argument("notebooks", nargs="*", type=Path, help="notebook files (default: all, in order)")
    run.add_argument("--fast", action="store_true", help="fast mode: small sizes (as the tests use)")
    run.add_argument("--output-dir", type=Path, default=None,
                     help="write executed notebooks here instead of in place")
    sub.add_parser("list", help="list the notebooks in order")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)

    if args.command == "list":
        for path in course_notebooks():
            print(path.relative_to(REPO_ROOT))
        return 0
    paths = args.notebooks or course_notebooks()
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    mode = "fast" if args.fast else "full"
    print(f"running {len(paths)} notebook(s) in {mode} mode on {get_settings().model}")
    for path in paths:
        output = args.output_dir / Path(path).name if args.output_dir else None
        print(f"- {path} ...", end=" ", flush=True)
        seconds = execute_notebook(path, fast=args.fast, output=output)
        print(f"{seconds / 60:.1f} min")
    with _environment(COURSE_FAST="1" if args.fast else "0"):
        print(f"figures: {figure_path('x').parent.relative_to(REPO_ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
