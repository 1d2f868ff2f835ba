"""companion.course: executing notebooks, tidy saved outputs, one-line errors."""

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from companion import cli, course


def test_progress_bar_refreshes_collapse_to_the_final_line():
    cell = new_code_cell("x", outputs=[
        new_output("stream", name="stdout", text="train:   0%|   | 0/2\r"),
        new_output("stream", name="stdout", text="train:  50%|#  | 1/2\rtrain: 100%|## | 2/2\n"),
        new_output("stream", name="stdout", text="loss 0.5\n"),
        new_output("stream", name="stderr", text="a warning\n"),
        new_output("stream", name="stdout", text="\r\n"),
    ])
    notebook = new_notebook(cells=[cell])
    course.tidy_streams(notebook)
    outputs = notebook.cells[0].outputs
    assert [o["name"] for o in outputs] == ["stdout", "stderr"]
    assert outputs[0]["text"] == "train: 100%|## | 2/2\nloss 0.5\n"


def test_a_notebook_runs_in_the_mode_asked_and_records_it(tmp_path):
    path = tmp_path / "probe.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell(
        "from companion.config import settings\nfor i in range(3): print(i, end='\\r')\nprint(settings.mode)")],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    seconds = course.execute_notebook(path, fast=True)
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].outputs[0]["text"] == "fast\n"
    assert notebook.metadata["course"]["mode"] == "fast" and seconds > 0
    assert notebook.metadata["course"]["completed"] is True and notebook.metadata["course"]["load_before"] >= 0


def test_a_failed_run_is_written_and_marked_incomplete(tmp_path):
    path = tmp_path / "fails.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("print('before')"), new_code_cell("assert False, 'claim'")],
                                metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}}), path)
    with pytest.raises(Exception, match="claim"):
        course.execute_notebook(path, fast=True)
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].outputs[0]["text"] == "before\n"
    assert notebook.metadata["course"]["completed"] is False


def test_fast_runs_name_the_fast_figures_folder(tmp_path, capsys):
    path = tmp_path / "empty.ipynb"
    nbformat.write(new_notebook(cells=[], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                    "language": "python"}}), path)
    assert course.main(["run", "--fast", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    assert "figures: outputs/figures/fast/" in capsys.readouterr().out


def test_a_missing_notebook_is_one_error_line(tmp_path, capsys):
    assert cli.run(course.main, ["run", str(tmp_path / "nope.ipynb")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
