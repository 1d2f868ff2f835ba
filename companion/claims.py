"""Checks that a notebook's prose quotes only figures its own outputs show.

A decimal (``0.87``), a percentage (``48%``) or a ratio (``10.5x``) typed into a markdown
cell must appear in an output of the same notebook (as ``0.87``, ``0.870``, ``87%`` or
``87.0%``...), or the prose has drifted from the run. Markdown that a cell displays
(``display(Markdown(f"..."))``) is an output, which is how summaries stay true. Figures in
inline code, math or link targets are not checked: a figure quoted from a paper goes in
backticks with its source.

A chapter's exercises quote what a correct solution gives: markdown cells from a heading
that starts with ``## Exercises`` on may also cite figures that the outputs of the
chapter's solutions notebook (``solutions/NN_solutions.ipynb`` beside it) show.

    python -m companion.claims notebooks/*.ipynb      # lists unsupported figures, exit 1 if any
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

FIGURE = re.compile(r"(?<![\w.\-/])(\d+\.\d+|\d+(?:\.\d+)?\s?%|\d+(?:\.\d+)?[x×])(?![\w.%])")
EXCLUDED = re.compile(r"`[^`]*`|\]\([^)]*\)|\$[^$]*\$|<[^>]+>")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _text(value) -> str:
    return value if isinstance(value, str) else "".join(value)


def output_text(notebook: dict) -> str:
    """Everything the notebook's code cells show: streams, results and displayed text/markdown."""
    parts = []
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        for output in cell.get("outputs", []):
            if "text" in output:
                parts.append(_text(output["text"]))
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/"):
                    parts.append(_text(value))
    return "\n".join(parts)


def _forms(figure: str) -> set[str]:
    """Printed forms that show the same figure: 0.87 ~ 0.870 ~ 87% ~ 87.0%; 48% ~ 0.48."""
    core = figure.rstrip("x×%").strip()
    value = float(core)
    decimals = len(core.split(".")[1]) if "." in core else 0
    forms = {core, f"{value:.{decimals}f}"}
    if figure.endswith("%"):
        forms |= {f"{value / 100:.{decimals + 2}f}", f"{value / 100:.{decimals + 3}f}"}
    elif not figure.endswith(("x", "×")):
        forms |= {f"{value:.{decimals + 1}f}", f"{value * 100:.{max(0, decimals - 2)}f}"}
    return forms


EXERCISES_HEADING = re.compile(r"^##\s+Exercises", re.M)


def solutions_path(path: str | Path) -> Path:
    """Where a chapter's solutions notebook lives: ``notebooks/solutions/NN_solutions.ipynb``."""
    path = Path(path)
    return path.parent / "solutions" / f"{path.name[:2]}_solutions.ipynb"


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def unsupported_figures(path: str | Path) -> list[str]:
    """``"markdown cell N: FIGURE"`` for every figure in the prose that no output shows."""
    notebook = _read(Path(path))
    shown = set(NUMBER.findall(output_text(notebook)))
    solutions = solutions_path(path)
    shown_with_solutions = shown | (set(NUMBER.findall(output_text(_read(solutions)))) if solutions.exists() else set())
    problems = []
    in_exercises = False
    for index, cell in enumerate(notebook.get("cells", [])):
        if cell.get("cell_type") != "markdown":
            continue
        source = _text(cell.get("source", ""))
        if re.search(r"^##\s", source, re.M):
            in_exercises = bool(EXERCISES_HEADING.search(source))
        prose = EXCLUDED.sub(" ", source)
        for figure in FIGURE.findall(prose):
            if not _forms(figure) & (shown_with_solutions if in_exercises else shown):
                problems.append(f"markdown cell {index}: {figure.strip()}")
    return problems


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    problems = [f"{path}: {problem} appears in no output" for path in paths for problem in unsupported_figures(path)]
    print("\n".join(problems) or "every figure in the prose appears in an output")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
