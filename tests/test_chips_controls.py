"""Chapter 2's second edition: the topic and true/false tasks, the shuffled-label control, several
seeds, the headline figures, Block Influence and pruning by a list of blocks (tiny models)."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from companion import chips
from companion.arch import decoder_layers
from companion.data import load_data
from companion.models import load_lm

SENTIMENT = chips.Task("sentiment", ("negative", "neutral", "positive"))
WORDS = {"negative": ["awful", "bad", "sad"], "neutral": ["table", "chair", "paper"],
         "positive": ["great", "happy", "good"]}
PROMPTS = [f"Example {i}: it was {word}" for i in range(4) for words in WORDS.values() for word in words]
LABELS = [label for _ in range(4) for label, words in WORDS.items() for _ in words]


@pytest.fixture(scope="module", params=["tiny-opt", "tiny-llama"])
def lm(request):
    return load_lm(request.param)


class IdentityBlock(nn.Module):
    """A decoder block that returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


# --- the new tasks ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, labels, sizes", [
    ("topic", ("ai", "coding", "emotion", "psychology", "trivia"), {"train": 120, "validation": 60, "test": 60}),
    ("truth", ("false", "true"), {"train": 246, "validation": 120, "test": 200}),
])
def test_new_tasks_are_balanced_and_do_not_leak(name, labels, sizes):
    task, data = chips.get_task(name), load_data(name)
    assert task.labels == labels
    texts = {}
    for split, size in sizes.items():
        rows = data[split]
        assert len(rows) == size
        counts = Counter(rows["label"])
        assert set(counts) == set(labels) and len(set(counts.values())) == 1, counts  # balanced
        texts[split] = set(rows["text"])
        chips.row_targets(rows.to_list(), task)  # every label is one of the task's
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not texts[a] & texts[b], f"{name}: the same text in {a} and {b}"
    if name == "truth":  # a question's true and false statements stay in one split
        questions = {split: {text.rsplit("?", 1)[0] for text in texts[split]} for split in sizes}
        assert not questions["train"] & questions["test"] and not questions["validation"] & questions["test"]


# --- the shuffled-label control ---------------------------------------------------------------


def test_shuffled_targets_keep_the_class_counts():
    targets = torch.tensor([0, 0, 0, 1, 1, 2] * 5)
    shuffled = chips.shuffled_targets(targets, seed=1)
    assert torch.equal(shuffled.bincount(), targets.bincount()) and not torch.equal(shuffled, targets)
    assert torch.equal(shuffled, chips.shuffled_targets(targets, seed=1))


def test_control_chips_train_on_shuffled_labels_and_reload_as_controls(lm, tmp_path):
    model, tokenizer = lm
    real = chips.ChippedModel(model, tokenizer, SENTIMENT, seed=0)
    control = chips.ChippedModel(model, tokenizer, SENTIMENT, seed=0)
    features = real.features(PROMPTS, progress=False)
    settings = {"epochs": 40, "lr": 3e-2, "batch_size": 12, "progress": False}
    real.fit(features, LABELS, **settings)
    control.fit(features, LABELS, shuffle_labels=True, **settings)
    assert control.control == chips.SHUFFLED_LABELS and real.control is None
    # The real chips learn the label the last word reveals; the control's best layer does worse.
    assert max(real.layer_accuracies(features, LABELS)) == 1.0
    assert max(control.layer_accuracies(features, LABELS)) < 1.0
    control.choose_layer(features, LABELS)
    control.save(tmp_path / "control")
    loaded = chips.ChippedModel.load(tmp_path / "control", model, tokenizer)
    assert loaded.control == chips.SHUFFLED_LABELS and loaded.layer == control.layer
    assert torch.equal(loaded.layer_scores(features), control.layer_scores(features))


def test_chip_knobs_are_saved_and_unknown_knobs_refused(lm, tmp_path):
    model, tokenizer = lm
    chipped = chips.ChippedModel(model, tokenizer, SENTIMENT, kind="mlp", hidden=8, seed=0)
    chipped.save(tmp_path / "mlp")
    loaded = chips.ChippedModel.load(tmp_path / "mlp", model, tokenizer)
    assert loaded.chips.knobs == {"hidden": 8} and loaded.chips.chips[0][0].out_features == 8
    with pytest.raises(ValueError, match="linear chips have no knob 'hidden'"):
        chips.ChippedModel(model, tokenizer, SENTIMENT, kind="linear", hidden=8)
    with pytest.raises(ValueError, match="unknown chip kind 'svm'; known: linear, mlp"):
        chips.make_chip("svm", 4, 2)


# --- seeds and the headline -------------------------------------------------------------------


def test_seed_runs_choose_the_layer_on_validation_and_report_intervals(lm):
    model, tokenizer = lm
    reader = chips.ChippedModel(model, tokenizer, SENTIMENT)
    features = reader.features(PROMPTS, progress=False)
    targets = SENTIMENT.encode(LABELS)
    splits = {"train": features, "validation": features, "test": features}
    split_targets = {split: targets for split in splits}
    runs = chips.seed_runs(model, tokenizer, SENTIMENT, splits, split_targets, seeds=(0, 1, 2),
                           epochs=30, lr=3e-2, batch_size=12)
    assert runs.correct["test"].shape == (3, 4, len(PROMPTS)) and runs.curve("test").shape == (3, 4)
    assert {run.chips.chips[0].weight.sum().item() for run in runs.runs}.__len__() == 3  # three seeds
    validation = runs.curve("validation").mean(dim=0)
    assert validation[runs.layer] >= validation.max() - chips.standard_error(validation.max().item(), len(PROMPTS))
    control = chips.seed_runs(model, tokenizer, SENTIMENT, splits, split_targets, seeds=(0, 1),
                              shuffle_labels=True, epochs=30, lr=3e-2, batch_size=12)
    result = chips.headline("sentiment", runs, control=control, targets=targets,
                            latency=([0.2] * len(PROMPTS), [0.1] * len(PROMPTS)))
    assert result.chosen.mean == pytest.approx(runs.curve("test").mean(dim=0)[runs.layer].item())
    assert result.best.mean >= result.chosen.mean
    assert result.retained.mean == pytest.approx(result.chosen.mean / result.best.mean)
    assert result.speedup.mean == pytest.approx(2.0)
    assert result.pruned_share == pytest.approx(1 - (runs.layer + 1) / 4)
    assert result.majority == pytest.approx(1 / 3)
    assert "best accuracy retained" in result.row()


def test_ratio_estimate_interval_holds_the_ratio():
    a, b = np.array([1, 1, 0, 1, 1, 0, 1, 1]), np.array([1, 1, 1, 1, 1, 0, 1, 1])
    ratio = chips.ratio_estimate(a, b)
    assert ratio.mean == pytest.approx(6 / 7) and ratio.low <= ratio.mean <= ratio.high <= 1.0
    with pytest.raises(ValueError, match="equal, non-empty"):
        chips.ratio_estimate([1, 0], [1])


# --- Block Influence and pruning by a list of blocks ------------------------------------------


def test_block_influence_of_an_identity_block_is_zero(lm):
    model, tokenizer = lm
    model = copy.deepcopy(model)
    influence = chips.block_influence(model, tokenizer, PROMPTS[:6])
    assert influence.shape == (4,) and (influence > 1e-4).all()
    decoder_layers(model)[2] = IdentityBlock()
    influence = chips.block_influence(model, tokenizer, PROMPTS[:6])
    assert influence[2].item() == pytest.approx(0.0, abs=1e-6)
    assert (influence[[0, 1, 3]] > 1e-4).all()


@pytest.mark.parametrize("kept", [[0, 2], [1, 3], [0, 1, 2, 3]])
def test_keeping_a_list_of_blocks_equals_running_only_those_blocks(lm, kept):
    model, tokenizer = lm
    pruned = chips.keep_blocks(model, kept)
    reference = copy.deepcopy(model)  # the skipped blocks replaced by blocks that do nothing
    for i in range(4):
        if i not in kept:
            decoder_layers(reference)[i] = IdentityBlock()
    batch = tokenizer(PROMPTS[:5], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = pruned(**batch, use_cache=False).logits
        expected = reference(**batch, use_cache=False).logits
    assert len(decoder_layers(pruned)) == len(kept) and len(decoder_layers(model)) == 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"indices in \[0, 4\)"):
        chips.keep_blocks(model, [0, 4])


def test_count_truncated_counts_prompts_over_the_limit(lm):
    _, tokenizer = lm
    prompts = ["one two", "one two three four five six seven eight nine ten"]
    assert chips.count_truncated(tokenizer, prompts, 5) == 1
    assert chips.count_truncated(tokenizer, prompts, 100) == 0


def test_features_without_label_scores_keep_the_same_states(lm):
    model, tokenizer = lm
    reader = chips.ChippedModel(model, tokenizer, SENTIMENT)
    with_scores = reader.features(PROMPTS[:5], progress=False)
    without = reader.features(PROMPTS[:5], progress=False, label_scores=False)
    assert without.label_scores is None and with_scores.label_scores.shape == (5, 3)
    torch.testing.assert_close(without.states, with_scores.states)


def test_measure_task_gives_the_headline_of_one_task():
    model, tokenizer = load_lm("tiny-llama")
    prompts = {split: PROMPTS for split in ("train", "validation", "test")}
    targets = {split: SENTIMENT.encode(LABELS) for split in prompts}
    result, runs, controls = chips.measure_task(model, tokenizer, SENTIMENT, prompts, targets, seeds=(0, 1),
                                                num_timed=3, epochs=20, lr=3e-2, batch_size=12)
    assert result.task == "sentiment" and result.layer == runs.layer and len(controls.runs) == 2
    assert result.speedup.n == 3 and result.speedup.mean > 0
    assert result.chosen.n == len(PROMPTS) and 0 <= result.control.mean <= 1
