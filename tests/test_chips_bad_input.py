"""Chips and bad input (issue 15): each test reproduces a defect that gave a silent wrong result,
a misleading message or a traceback, and checks the clear error that replaced it."""

import json

import pytest
import torch

from companion import chips, cli
from companion.models import load_lm

SENTIMENT = chips.Task("sentiment", ("negative", "neutral", "positive"))
TEXTS = ["it was awful", "a table", "so good", "sad day", "a chair", "great fun"]
LABELS = ["negative", "neutral", "positive"] * 2


@pytest.fixture(scope="module")
def saved_opt_chips(tmp_path_factory):
    """Chips trained on tiny-opt (sentiment), saved as the command line saves them."""
    folder = tmp_path_factory.mktemp("chips") / "opt"
    model, tokenizer = load_lm("tiny-opt")
    chipped = chips.ChippedModel(model, tokenizer, SENTIMENT, seed=0)
    chipped.fit(TEXTS, LABELS, epochs=2, progress=False)
    chipped.layer = 1
    chipped.save(folder, model="tiny-opt", dataset="sentiment", input_kind="classification")
    return folder


# --- item 2: chips load onto any model of the same shape ------------------------------------


def test_chips_refuse_a_backbone_of_the_same_shape(saved_opt_chips):
    llama, llama_tokenizer = load_lm("tiny-llama")  # also 4 layers of size 64
    with pytest.raises(ValueError, match="trained on 'tiny-opt' but this model is 'tiny-llama'"):
        chips.ChippedModel.load(saved_opt_chips, llama, llama_tokenizer)
    model, tokenizer = load_lm("tiny-opt")
    assert chips.ChippedModel.load(saved_opt_chips, model, tokenizer).layer == 1


def test_predict_with_another_model_is_one_error_line(saved_opt_chips, capsys):
    argv = ["predict", "--chips", str(saved_opt_chips), "--model", "tiny-llama", "--text", "so good"]
    assert cli.run(chips.main, argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no predictions printed
    assert captured.err.startswith("error: ") and "'tiny-opt'" in captured.err and captured.err.count("\n") == 1


# --- item 5: --max-length 0 or negative ------------------------------------------------------


@pytest.mark.parametrize("max_length", [0, -3])
def test_max_length_below_one_is_refused(max_length):
    model, tokenizer = load_lm("tiny-llama")
    with pytest.raises(ValueError, match="max_length must be a whole number of tokens >= 1"):
        chips.extract_features(model, tokenizer, ["one two three"], max_length=max_length, progress=False)
    with pytest.raises(ValueError, match="max_length must be"):
        chips.ChippedModel(model, tokenizer, SENTIMENT, max_length=max_length)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_command_line_max_length_below_one(value, tmp_path, capsys):
    argv = ["train", "--task", "sentiment", "--model", "tiny-opt", "--max-length", value, "--out", str(tmp_path)]
    assert cli.run(chips.main, argv) == 2
    err = capsys.readouterr().err
    assert "--max-length: must be at least 1" in err and "Traceback" not in err


# --- item 10 ----------------------------------------------------------------------------------


def test_predict_input_names_the_file_and_the_bad_line(saved_opt_chips, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    assert cli.run(chips.main, ["predict", "--chips", str(saved_opt_chips), "--input", str(rows)]) == 2
    err = capsys.readouterr().err
    assert f"{rows}:2: not valid JSON" in err


def test_a_row_whose_text_is_not_a_string_is_named(saved_opt_chips, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": 5}\n', encoding="utf-8")
    assert cli.run(chips.main, ["predict", "--chips", str(saved_opt_chips), "--input", str(rows)]) == 2
    err = capsys.readouterr().err
    assert f"{rows}:2:" in err and "field 'text' must be a non-empty string, got 5" in err
    assert "AttributeError" not in err
    with pytest.raises(chips.TaskError, match="field 'text'"):
        chips.format_prompt({"text": 5}, SENTIMENT)


def test_a_damaged_chips_json_is_named(saved_opt_chips, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "chips.safetensors").write_bytes((saved_opt_chips / "chips.safetensors").read_bytes())
    (damaged / "chips.json").write_text('{"format": "companion.chips/2", "task": ', encoding="utf-8")
    with pytest.raises(ValueError, match=r"damaged/chips.json is damaged \(not valid JSON"):
        chips.ChippedModel.read_meta(damaged)


def test_unknown_label_names_the_tasks_file_it_came_from(tmp_path):
    path = tmp_path / "my_tasks.yaml"
    path.write_text("mood: [sad, happy]\n", encoding="utf-8")
    task = chips.get_task("mood", path)
    with pytest.raises(chips.TaskError, match="my_tasks.yaml") as error:
        task.encode(["angry"])
    assert "chips.yaml" not in str(error.value)


def test_a_task_defined_twice_is_refused():
    with pytest.raises(chips.TaskError, match=r"tasks.yaml: task 'mood' is defined twice \(lines 1 and 2\)"):
        chips.parse_tasks("mood: [sad, happy]\nmood: [low, high]\n", source="tasks.yaml")


def test_labels_with_surrounding_spaces_are_refused():
    with pytest.raises(chips.TaskError, match="has spaces around it"):
        chips.parse_tasks("mood: [' sad', happy]\n", source="tasks.yaml")


# --- chips left in train mode; the command line's errors -------------------------------------


def test_chips_are_back_in_eval_mode_when_training_fails():
    chip_set = chips.ChipSet(2, 8, 3, seed=0)

    def broken_states(indices):
        raise RuntimeError("the forward pass failed")

    with pytest.raises(RuntimeError, match="forward pass failed"):
        chips.train_chips(chip_set, broken_states, torch.tensor([0, 1, 2]), epochs=1, lr=1e-3, batch_size=2,
                          weight_decay=0.0, seed=0, progress=False)
    assert not chip_set.training


def test_command_line_uses_the_course_error_convention(tmp_path, capsys):
    argv = ["evaluate", "--chips", str(tmp_path / "nothing")]
    assert cli.run(chips.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not hold saved chips" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        cli.run(chips.main, argv + ["--debug"])
    assert cli.run(chips.main, ["train", "--task", "sentiment"]) == 2  # argparse usage error, one line
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_saved_meta_keeps_the_backbone(saved_opt_chips):
    meta = json.loads((saved_opt_chips / "chips.json").read_text())
    assert meta["backbone"]["name"] == "tiny-opt" and meta["backbone"]["num_layers"] == 4
