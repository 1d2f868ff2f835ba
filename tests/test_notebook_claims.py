"""Every figure in a notebook's prose appears in one of its own outputs (companion.claims)."""

import json

import pytest

from companion.claims import unsupported_figures
from companion.course import course_notebooks, NOTEBOOK_DIR

NOTEBOOKS = course_notebooks() + sorted((NOTEBOOK_DIR / "solutions").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_quotes_only_figures_that_outputs_show(path):
    assert unsupported_figures(path) == []


def _notebook(tmp_path, prose, output):
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": prose},
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": "x",
         "outputs": [{"output_type": "stream", "name": "stdout", "text": output}]},
    ]
    path = tmp_path / "n.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


@pytest.mark.parametrize("prose, output", [
    ("H2O keeps 0.87 at 25%", "h2o 0.870 at 25%"),
    ("EM rises to 31%", "EM 0.31"),
    ("a 10.5x speed-up", "speed-up: 10.5"),
    ("accuracy 0.31", "EM 31%"),
    ("quoted from the paper: `0.99`", "nothing"),
])
def test_supported_figures_pass(tmp_path, prose, output):
    assert unsupported_figures(_notebook(tmp_path, prose, output)) == []


@pytest.mark.parametrize("prose, output, figure", [
    ("H2O keeps 0.87", "h2o 0.86", "0.87"),
    ("a 10.8x speed-up", "speed-up 10.5x", "10.8x"),
    ("takes 12.4 minutes", "took 12.3 min", "12.4"),
    ("48% of replies", "0.47", "48%"),
])
def test_drifted_figures_are_reported(tmp_path, prose, output, figure):
    assert unsupported_figures(_notebook(tmp_path, prose, output)) == [f"markdown cell 0: {figure}"]


def test_exercises_may_quote_the_solutions_notebook_and_only_they(tmp_path):
    def write(path, cells):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))

    def markdown(text):
        return {"cell_type": "markdown", "metadata": {}, "source": text}

    chapter = tmp_path / "07_chapter.ipynb"
    write(chapter, [markdown("## Results\nEM 0.42"), markdown("## Exercises\nyou should get about 0.42"),
                    markdown("Hint: the table's 0.42 again")])
    write(tmp_path / "solutions" / "07_solutions.ipynb", [
        {"cell_type": "code", "metadata": {}, "execution_count": 1, "source": "x",
         "outputs": [{"output_type": "stream", "name": "stdout", "text": "EM 0.420\n"}]}])
    assert unsupported_figures(chapter) == ["markdown cell 0: 0.42"]
