"""Chip-tuning on tiny models of both architectures: features, training, pruning, saving, CLI."""

import copy
import json

import pytest
import torch

from companion import chips
from companion.arch import (
    decoder_layers,
    hidden_states_at_last_token,
    lora_target_modules,
    num_layers,
)
from companion.chips import (
    ChippedModel,
    Features,
    Task,
    TaskError,
    choose_layer,
    extract_features,
    format_prompt,
    format_prompts,
    get_task,
    label_token_ids,
    load_tasks,
    parse_tasks,
    row_targets,
)
from companion.config import seed_everything
from companion.models import TinySpec, load_lm, parameter_count

SENTIMENT = Task("sentiment", ("negative", "neutral", "positive"))

# Prompts whose label is their last word: a tiny random model's last-token state then
# carries the label, so chips can learn it. Each label has several words.
WORDS = {"negative": ["awful", "bad", "sad"], "neutral": ["table", "chair", "paper"],
         "positive": ["great", "happy", "good"]}
ROWS = [
    {"text": f"Example {i}: it was {word}", "label": label}
    for i in range(2)
    for label, words in WORDS.items()
    for word in words
]
RAW_PROMPTS = [row["text"] for row in ROWS]  # ending with the label word


@pytest.fixture(autouse=True, scope="module")
def _threads():
    # Seeds, and sets torch's threads from COURSE_THREADS: small chip matmuls on an
    # oversubscribed CPU are many times slower with more threads than free cores.
    seed_everything()


@pytest.fixture(scope="module", params=["tiny-opt", "tiny-llama"])
def lm(request):
    """(model, tokenizer) per tiny architecture, built once for this module (never modified:
    pruning and PEFT work on copies)."""
    return load_lm(request.param)


def _chipped(lm, kind="linear", seed=0, **kwargs):
    model, tokenizer = lm
    return ChippedModel(model, tokenizer, SENTIMENT, kind=kind, seed=seed, **kwargs)


# --- tasks ----------------------------------------------------------------------------------


def test_course_tasks_file_has_the_chapter_tasks():
    tasks = load_tasks()
    assert tasks["MMLU"].labels == ("A", "B", "C", "D")
    assert tasks["sentiment"].labels == ("negative", "neutral", "positive")
    assert get_task("mmlu") is not None and get_task("mmlu").name == "MMLU"


def test_parse_tasks_reads_the_reference_format():
    tasks = parse_tasks("MMLU: [A, B, C, D]\nboolq: ['no', 'yes']\nrating: [1, 2, 3]\n")
    assert tasks["boolq"].labels == ("no", "yes")
    assert tasks["rating"].labels == ("1", "2", "3")
    assert tasks["MMLU"].encode(["C", "A", 3]).tolist() == [2, 0, 3]
    assert tasks["MMLU"].decode([1, 3]) == ["B", "D"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("MMLU: [A, B\n", "not valid YAML"),
        ("- A\n- B\n", "mapping of task names"),
        ("MMLU: A\n", "at least two labels"),
        ("MMLU: [A]\n", "at least two labels"),
        ("boolq: [no, yes]\n", "boolean"),
        ("MMLU: [A, B, A]\n", "more than once"),
        ("MMLU: [A, [B, C]]\n", "non-empty word"),
    ],
)
def test_bad_task_yaml_gives_a_clear_error(text, message):
    with pytest.raises(TaskError, match=message):
        parse_tasks(text, source="tasks.yaml")


def test_unknown_task_and_missing_file_name_the_fix(tmp_path):
    with pytest.raises(TaskError, match="unknown task .nope.; known: MMLU, sentiment, topic, truth"):
        get_task("nope")
    with pytest.raises(TaskError, match="does not exist"):
        load_tasks(tmp_path / "missing.yaml")


def test_labels_not_in_the_task_are_refused():
    with pytest.raises(TaskError, match="label 'joyful' is not in task 'sentiment'"):
        SENTIMENT.encode(["positive", "joyful"])
    with pytest.raises(TaskError, match="out of range"):
        SENTIMENT.encode([3])
    with pytest.raises(TaskError, match="not in task"):
        row_targets([{"text": "x", "label": "Positive"}], SENTIMENT)


# --- prompts --------------------------------------------------------------------------------


def test_prompts_for_both_row_kinds():
    mmlu = Task("MMLU", ("A", "B", "C", "D"))
    row = {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "label": 1, "subject": "math"}
    assert format_prompt(row, mmlu) == "Question: 2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert row_targets([row], mmlu).tolist() == [1]
    prompt = format_prompt({"text": " so good ", "label": "positive"}, SENTIMENT)
    assert prompt == (
        "Text: so good\nQuestion: What is the sentiment of this text: negative, neutral or positive?\nAnswer:"
    )
    with pytest.raises(TaskError, match="has 3 choices but task 'MMLU' has 4 labels"):
        format_prompt({**row, "choices": ["1", "2", "3"]}, mmlu)
    with pytest.raises(TaskError, match="cannot build a prompt"):
        format_prompt({"question": "q", "answer": "a"}, SENTIMENT)


def test_label_tokens_must_differ(lm):
    _, tokenizer = lm
    ids = label_token_ids(tokenizer, SENTIMENT)
    assert len(set(ids)) == 3
    with pytest.raises(TaskError, match="share a first token"):
        label_token_ids(tokenizer, Task("clash", ("A1", "A")))


# --- reading the layers ---------------------------------------------------------------------


def test_features_match_the_adapter_and_do_not_depend_on_batching(lm):
    model, tokenizer = lm
    prompts = format_prompts(ROWS[:5], SENTIMENT) + ["short"]
    batched = extract_features(model, tokenizer, prompts, label_ids=[11, 22, 33], batch_size=6, progress=False)
    single = extract_features(model, tokenizer, prompts, label_ids=[11, 22, 33], batch_size=1, progress=False)
    assert batched.states.shape == (num_layers(model), 6, model.config.hidden_size)
    torch.testing.assert_close(batched.states, single.states, rtol=1e-5, atol=1e-5)
    # The adapter's reference reading (hooks on the blocks, full forward) agrees.
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    reference = hidden_states_at_last_token(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(batched.states, reference, rtol=1e-5, atol=1e-5)
    # Label scores are the model's next-token logits at the last prompt token.
    with torch.no_grad():
        logits = model(**tokenizer(prompts[:1], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(single.label_scores[0], logits[[11, 22, 33]], rtol=1e-5, atol=1e-5)


def test_long_prompts_are_cut_from_the_left_with_a_warning(lm):
    model, tokenizer = lm
    long_prompt = "word " * 40 + "Answer:"
    with pytest.warns(UserWarning, match="cut from the left"):
        cut = extract_features(model, tokenizer, [long_prompt], max_length=8, progress=False)
    tail = tokenizer.decode(tokenizer(long_prompt)["input_ids"][-8:])
    whole = extract_features(model, tokenizer, [tail], max_length=8, progress=False)
    torch.testing.assert_close(cut.states, whole.states)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_chips_learn_a_task_the_last_token_reveals(lm, kind):
    chipped = _chipped(lm, kind=kind)
    features = chipped.features(RAW_PROMPTS, progress=False)
    targets = row_targets(ROWS, SENTIMENT)
    before = chipped.layer_accuracies(features, targets)
    losses = chipped.fit(features, targets, epochs=60, lr=3e-2, batch_size=6, progress=False)
    after = chipped.layer_accuracies(features, targets)
    assert losses[-1] < 0.5 * losses[0]
    assert max(after) == 1.0 and max(after) > max(before)


def test_cached_features_train_the_same_chips_as_a_forward_per_epoch(lm):
    targets = [row["label"] for row in ROWS]
    cached, fresh = _chipped(lm, seed=3), _chipped(lm, seed=3)
    initial = copy.deepcopy(cached.chips.state_dict())
    settings = {"epochs": 3, "lr": 1e-2, "batch_size": 4, "seed": 7, "progress": False}
    cached_losses = cached.fit(RAW_PROMPTS, targets, cache=True, **settings)
    fresh_losses = fresh.fit(RAW_PROMPTS, targets, cache=False, **settings)
    assert cached_losses == pytest.approx(fresh_losses, rel=1e-4)
    for name, value in cached.chips.state_dict().items():
        assert not torch.allclose(value, initial[name]), f"{name} did not train"
        torch.testing.assert_close(value, fresh.chips.state_dict()[name], rtol=1e-4, atol=1e-5)


def test_num_steps_counts_optimizer_steps(lm, monkeypatch):
    chipped = _chipped(lm)
    features = chipped.features(RAW_PROMPTS, progress=False)  # 18 examples
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    losses = chipped.fit(features, [row["label"] for row in ROWS], num_steps=7, batch_size=4, progress=False)
    assert len(steps) == 7 and len(losses) == 2  # 5 batches per epoch: 5 + 2 steps
    with pytest.raises(ValueError, match="either epochs or num_steps"):
        chips.train_chips(chipped.chips, lambda i: features.states[:, i], torch.zeros(18, dtype=torch.long),
                          epochs=2, num_steps=3, lr=1e-3, batch_size=4, weight_decay=0.0, seed=0)


def test_fresh_forward_training_needs_prompts(lm):
    chipped = _chipped(lm)
    features = chipped.features(RAW_PROMPTS[:3], progress=False)
    with pytest.raises(ValueError, match="pass prompts"):
        chipped.fit(features, ["negative"] * 3, cache=False, progress=False)


def test_choose_layer_prefers_the_lowest_of_the_best():
    assert choose_layer([0.5, 0.7, 0.7, 0.6]) == 1
    assert choose_layer([0.66, 0.70, 0.69], tolerance=0.05) == 0
    assert choose_layer([0.60, 0.70, 0.69], tolerance=0.05) == 1
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        choose_layer([0.5], tolerance=-0.1)


def test_one_standard_error_rule_picks_the_shallowest_indistinguishable_layer(monkeypatch, lm):
    assert chips.standard_error(0.5, 100) == pytest.approx(0.05)
    chipped = _chipped(lm)
    accuracies = [0.40, 0.62, 0.66, 0.70]
    monkeypatch.setattr(chipped, "layer_accuracies", lambda data, targets: accuracies)
    targets = [0] * 84  # standard error of 0.70 on 84 examples: 0.05
    assert chipped.choose_layer(None, targets) == 3
    assert chipped.choose_layer(None, targets, tolerance="1se") == 2
    with pytest.raises(ValueError, match="a number or '1se'"):
        chipped.choose_layer(None, targets, tolerance="2se")


def test_choose_chip_takes_the_shallowest_good_chip_of_any_kind(monkeypatch, lm):
    linear, mlp = _chipped(lm), _chipped(lm, kind="mlp")
    monkeypatch.setattr(linear, "layer_accuracies", lambda data, targets: [0.40, 0.55, 0.67, 0.66])
    monkeypatch.setattr(mlp, "layer_accuracies", lambda data, targets: [0.45, 0.50, 0.66, 0.70])
    targets = [0] * 84  # one standard error of 0.70: 0.05
    for candidate in (linear, mlp):
        candidate.choose_layer(None, targets)
    assert chips.choose_chip([linear, mlp]) is mlp and mlp.layer == 3
    winner = chips.choose_chip([linear, mlp], tolerance="1se")
    assert winner is linear and linear.layer == 2  # 0.67 beats the MLP's 0.66 at layer 2
    with pytest.raises(ValueError, match="call choose_layer"):
        chips.choose_chip([_chipped(lm)])


def test_layer_is_chosen_on_validation_data_only(lm):
    chipped = _chipped(lm)
    features = chipped.features(RAW_PROMPTS, progress=False)
    targets = row_targets(ROWS, SENTIMENT)
    chipped.fit(features, targets, epochs=5, lr=1e-2, progress=False)
    # Validation labels that only layer 2's chip gets right: that layer must be chosen.
    scores = chipped.layer_scores(features)
    validation = scores[2].argmax(-1)
    expected = [i for i in range(len(chipped.chips))
                if torch.equal(scores[i].argmax(-1), validation)]
    assert chipped.choose_layer(features, validation) == expected[0]
    assert chipped.validation_accuracy[2] == 1.0


# --- pruning, saving ------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
def test_pruned_model_is_smaller_and_keeps_the_same_hidden_states(lm, layer):
    model, tokenizer = lm
    chipped = _chipped(lm)
    pruned = chipped.prune(layer)
    assert pruned.num_layers == layer + 1 and num_layers(model) == 4  # the original is untouched
    per_block = parameter_count(decoder_layers(model)[0])
    assert parameter_count(pruned.model) == parameter_count(model) - (3 - layer) * per_block
    batch = tokenizer(RAW_PROMPTS[:6], return_tensors="pt", padding=True)
    full = hidden_states_at_last_token(model, batch["input_ids"], batch["attention_mask"])
    kept = hidden_states_at_last_token(pruned.model, batch["input_ids"], batch["attention_mask"])
    assert kept.shape[0] == layer + 1
    assert torch.equal(kept, full[: layer + 1])
    # So the pruned model's chip gives what the full model's chip at that layer gives.
    torch.testing.assert_close(pruned.scores(RAW_PROMPTS[:6]), chipped.layer_scores(RAW_PROMPTS[:6])[layer])


def test_saved_chips_reload_and_predict_the_same(lm, tmp_path):
    model, tokenizer = lm
    chipped = _chipped(lm, kind="mlp", hidden=16)
    features = chipped.features(RAW_PROMPTS, progress=False)
    chipped.fit(features, row_targets(ROWS, SENTIMENT), epochs=20, lr=1e-2, progress=False)
    chipped.choose_layer(features, row_targets(ROWS, SENTIMENT))
    chipped.save(tmp_path / "chips", model="tiny", dataset="toy")

    loaded = ChippedModel.load(tmp_path / "chips", model, tokenizer)
    assert (loaded.layer, loaded.task, loaded.chips.kind) == (chipped.layer, SENTIMENT, "mlp")
    assert loaded.validation_accuracy == chipped.validation_accuracy
    assert torch.equal(loaded.layer_scores(features), chipped.layer_scores(features))
    assert loaded.prune().predict(RAW_PROMPTS) == chipped.prune().predict(RAW_PROMPTS)
    assert json.loads((tmp_path / "chips" / "chips.json").read_text())["dataset"] == "toy"


def test_loading_chips_onto_another_model_is_refused(tmp_path):
    model, tokenizer = load_lm("tiny-llama")
    ChippedModel(model, tokenizer, SENTIMENT).save(tmp_path / "chips")
    other, other_tokenizer = load_lm("tiny-llama", tiny=TinySpec(num_layers=2))
    with pytest.raises(ValueError, match="trained on a model with 4 layers"):
        ChippedModel.load(tmp_path / "chips", other, other_tokenizer)
    with pytest.raises(FileNotFoundError, match="does not hold saved chips"):
        ChippedModel.load(tmp_path / "nothing", model, tokenizer)


def test_prune_needs_a_layer(lm):
    chipped = _chipped(lm)
    with pytest.raises(ValueError, match="no layer chosen yet"):
        chipped.prune()
    with pytest.raises(ValueError, match=r"layer must be in \[0, 4\)"):
        chipped.prune(4)


def test_chips_on_a_peft_model(lm):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = lm
    base_features = _chipped(lm).features(RAW_PROMPTS[:4], progress=False)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=lora_target_modules(model)))
    chipped = ChippedModel(lora, tokenizer, SENTIMENT, seed=0)
    features = chipped.features(RAW_PROMPTS[:4], progress=False)
    # A fresh LoRA adapter starts as the identity (B = 0), so the states are the base model's.
    torch.testing.assert_close(features.states, base_features.states)
    torch.testing.assert_close(features.label_scores, base_features.label_scores)
    pruned = chipped.prune(1)
    assert pruned.num_layers == 2 and len(pruned.predict(RAW_PROMPTS[:4])) == 4


# --- command line ---------------------------------------------------------------------------


def test_command_line_train_evaluate_predict(tmp_path, capsys):
    out = str(tmp_path / "chips")
    assert chips.main(["train", "--task", "sentiment", "--model", "tiny-opt", "--train-size", "12",
                       "--validation-size", "6", "--epochs", "2", "--tolerance", "1se", "--out", out]) == 0
    assert "chosen layer" in capsys.readouterr().out
    assert chips.main(["evaluate", "--chips", out, "--size", "6"]) == 0
    report = capsys.readouterr().out
    assert "test examples: 6 of sentiment" in report and "pruned model, chip at layer" in report
    assert chips.main(["predict", "--chips", out, "--text", "I love it", "--text", "meh"]) == 0
    predicted = capsys.readouterr().out.split()
    assert len(predicted) == 2 and set(predicted) <= set(SENTIMENT.labels)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "nope", "--out", "x"], "unknown task 'nope'"),
        (["evaluate", "--chips", "/nonexistent"], "does not hold saved chips"),
    ],
)
def test_command_line_errors_are_one_clear_line(argv, message, capsys):
    assert chips.run(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_features_subset_keeps_rows_together():
    features = Features(torch.arange(24.0).reshape(2, 4, 3), torch.arange(8.0).reshape(4, 2))
    part = features.subset([2, 0])
    assert len(part) == 2
    assert torch.equal(part.states[:, 0], features.states[:, 2])
    assert torch.equal(part.label_scores[1], features.label_scores[0])


def test_accuracy_helpers_agree_with_predictions(lm):
    chipped = _chipped(lm)
    features = chipped.features(RAW_PROMPTS, progress=False)
    gold = [row["label"] for row in ROWS]
    chipped.fit(features, gold, epochs=5, lr=1e-2, progress=False)
    chipped.layer = 1
    assert chipped.accuracy(features, gold) == pytest.approx(chips.accuracy(chipped.predict(features), gold))
    zero_shot = chipped.zero_shot_accuracy(features, gold)
    assert zero_shot == pytest.approx(chips.accuracy(chipped.zero_shot_predict(features), gold))


def test_timed_predictions_keep_the_order_and_time_each_prompt():
    calls = []

    def predict(prompts):
        calls.append(list(prompts))
        return [prompt.upper() for prompt in prompts]

    predictions, seconds = chips.timed_predictions(predict, ["a", "b", "c"], warmup=1)
    assert predictions == ["A", "B", "C"] and seconds >= 0
    assert calls == [["a"], ["a"], ["b"], ["c"]]  # one warm-up, then one prompt at a time


def test_plot_layer_accuracies_draws_each_curve():
    import matplotlib

    matplotlib.use("Agg")
    ax = chips.plot_layer_accuracies({"linear": [0.2, 0.5, 0.4], "mlp": [0.3, 0.6, 0.7]},
                                     baseline=0.33, chance=0.25, chosen={"mlp": 2}, title="t")
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"linear", "mlp", "zero-shot full model", "chance"} <= set(labels)
    assert ax.get_title() == "t"
