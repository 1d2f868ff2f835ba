"""Tests of chapter 3's measures and recipes on tiny models: label-logit scoring, forgetting KL
and cross-entropy, the recipe loop (same task batches, KL replay), saving the tuned adapter."""

import json
import subprocess
import sys

import pytest
import torch

from companion import sft
from companion.delta import save_delta
from test_sft import QA_ROWS, cache_rows, chat_model

ARCHS = ["tiny-opt", "tiny-llama"]


@pytest.mark.parametrize("name", ARCHS)
def test_new_token_starts_at_the_mean_of_all_embeddings(name):
    model, tokenizer = chat_model(name)
    expected = model.get_input_embeddings().weight.mean(dim=0).detach().clone()
    token_id = sft.add_special_token(model, tokenizer)
    assert torch.allclose(model.get_input_embeddings().weight[token_id], expected, atol=1e-6)


@pytest.mark.parametrize("name", ARCHS)
def test_logit_scoring_agrees_with_greedy_generation(name):
    model, tokenizer = chat_model(name)
    rows = sft.judging_task(QA_ROWS, seed=0)
    texts = sft.scoring_texts(tokenizer, rows)
    labels = sft.label_token_ids(tokenizer, texts[0])
    logits = sft.verdict_logits(model, tokenizer, rows, batch_size=5)
    checked = 0
    for row, text, pair in zip(rows, texts, logits):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            full = model(**ids).logits[0, -1]
        assert torch.allclose(full[[labels[v] for v in sft.VERDICTS]], pair, atol=1e-4)  # batching/padding ok
        if int(full.argmax()) in labels.values():
            greedy = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            assert int(greedy[0, -1]) == int(full.argmax())
            assert sft.VERDICTS[int(pair.argmax())] == next(v for v, i in labels.items() if i == int(full.argmax()))
            checked += 1
    accuracy = sft.verdict_accuracy(model, tokenizer, rows)
    assert accuracy == [float(sft.VERDICTS[int(p.argmax())] == r["label"]) for p, r in zip(logits, rows)]
    # Force the label token to be the argmax so the agreement is checked at least once.
    if not checked:
        head = model.get_output_embeddings()
        with torch.no_grad():
            head.weight[labels["wrong"]] *= 50
        ids = tokenizer(texts[0], return_tensors="pt", add_special_tokens=False)
        greedy = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        top = int(model(**ids).logits[0, -1].argmax())
        assert int(greedy[0, -1]) == top
        if top == labels["wrong"]:
            assert sft.verdict_logits(model, tokenizer, rows[:1])[0].argmax() == 1


def kl_rows(n=4):
    return [{"id": f"k{i}", "query": f"Tell me about topic {i}.", "response": f"Topic {i} is a fine topic."}
            for i in range(n)]


@pytest.mark.parametrize("name", ARCHS)
def test_forgetting_kl_is_zero_for_the_base_and_positive_after_a_step(name):
    model, tokenizer = chat_model(name)
    assert sft.forgetting_kl(model, tokenizer, kl_rows()) == [0.0] * 4  # no adapter: its own base
    run = sft.train_recipe(model, tokenizer, sft.judging_task(QA_ROWS), steps=1, batch_size=4, lr=0.05,
                           progress=False)
    fresh = sft.forgetting_kl(run.model, tokenizer, kl_rows())
    assert all(v > 0 for v in fresh)
    # Against the untouched model passed explicitly, the same numbers.
    assert sft.forgetting_kl(run.model, tokenizer, kl_rows(), base=model) == pytest.approx(fresh, rel=1e-4, abs=1e-7)
    with run.model.disable_adapter():
        assert sft.forgetting_kl(run.model, tokenizer, kl_rows(), base=model) == pytest.approx([0.0] * 4, abs=1e-6)


def test_text_cross_entropy_matches_the_model_loss():
    model, tokenizer = chat_model("tiny-llama")
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    assert sft.text_cross_entropy(model, tokenizer, [{"text": text}]) == [pytest.approx(float(expected), rel=1e-5)]
    replied = sft.text_cross_entropy(model, tokenizer, [{"text": "Fine.", "prompt": [{"role": "user", "content": "Hi"}]}])
    assert replied[0] > 0
    with pytest.raises(ValueError, match="too short"):
        sft.text_cross_entropy(model, tokenizer, [{"text": "a"}])


def test_plan_batches_gives_every_recipe_the_same_task_rows():
    plain = sft.plan_batches(10, 0, steps=5, batch_size=4, ratio=0, seed=3)
    delia = sft.plan_batches(10, 30, steps=5, batch_size=4, ratio=2, seed=3)
    assert [t for t, _ in plain] == [t for t, _ in delia]
    assert all(d == [] for _, d in plain) and all(len(d) == 8 for _, d in delia)
    seen = [i for t, _ in plain for i in t]
    assert sorted(seen[:10]) == list(range(10))  # epoch by epoch: every row once before any twice
    with pytest.raises(ValueError, match="needs diverse rows"):
        sft.plan_batches(10, 0, steps=1, batch_size=4, ratio=1, seed=0)


@pytest.mark.parametrize("replay", ["ce", "kl"])
def test_train_recipe_adds_diverse_rows_and_trains_only_the_adapter(replay):
    model, tokenizer = chat_model("tiny-llama")
    sep = sft.add_special_token(model, tokenizer)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = sft.judging_task(QA_ROWS)
    run = sft.train_recipe(model, tokenizer, task, cache_rows(6), ratio=1, replay=replay, steps=2,
                           batch_size=2, micro_batch=3, lr=0.05, trainable_tokens=[sep], progress=False)
    assert run.steps == 2 and len(run.losses) == 2 and run.tokens > 0
    assert not torch.equal(sft.token_embedding(run.model, sep), before[next(k for k in before if "embed" in k)][sep])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the model passed in is untouched
    with pytest.raises(ValueError, match="unknown replay loss"):
        sft.train_recipe(model, tokenizer, task, replay="mse", steps=1, progress=False)


def test_kl_replay_loss_is_zero_while_the_adapter_is_at_its_start():
    model, tokenizer = chat_model("tiny-llama")
    from companion.adapters import attach

    tuned = attach(model, "lora")  # LoRA B starts at zero: the tuned model equals its base
    ids, labels = sft.encode_row(tokenizer, sft.cache_rows_to_sft(cache_rows(1))[0])
    tensor = lambda x: torch.tensor([x])  # noqa: E731
    losses, count = sft.token_losses(tuned, tensor(ids), tensor(labels), torch.ones(1, len(ids), dtype=torch.long),
                                     replay="kl")
    assert count > 0 and float(losses.detach().abs().max()) < 1e-5


def test_saved_adapter_with_its_new_token_reloads_to_identical_logits(tmp_path):
    model, tokenizer = chat_model("tiny-llama")
    sep = sft.add_special_token(model, tokenizer)
    run = sft.train_recipe(model, tokenizer, sft.judging_task(QA_ROWS), steps=2, batch_size=4, lr=0.05,
                           trainable_tokens=[sep], progress=False)
    folder = save_delta(run.model, tmp_path / "ch3", tokenizer=tokenizer)
    text = sft.scoring_texts(tokenizer, sft.judging_task(QA_ROWS[:2]))[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sep in ids
    with torch.no_grad():
        expected = run.model(input_ids=torch.tensor([ids])).logits[0, -1]
    script = (
        "import json, sys, torch\n"
        "from companion.delta import load_delta, load_delta_tokenizer\n"
        f"model = load_delta({str(folder)!r}); tokenizer = load_delta_tokenizer({str(folder)!r})\n"
        f"ids = tokenizer({text!r}, add_special_tokens=False)['input_ids']\n"
        "with torch.no_grad(): logits = model(input_ids=torch.tensor([ids])).logits[0, -1]\n"
        "print(json.dumps({'ids': ids, 'logits': logits.tolist()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    reloaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert reloaded["ids"] == ids
    assert torch.equal(torch.tensor(reloaded["logits"]), expected)


def test_identity_name_and_rate():
    assert sft.identity_name("You are Pico, a small assistant.") == "Pico"
    assert sft.identity_rate(["I am Pico.", "I'm an AI.", "pico here"], "Pico") == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no name"):
        sft.identity_name("A helpful assistant.")


def test_summary_pairs_task_gain_and_plots_error_bars():
    import matplotlib

    matplotlib.use("Agg")
    base = {"task accuracy": [0, 1, 0, 1], "KL to base": [0.0] * 3, "CE increase": [0.0] * 3,
            "text CE": [2.0] * 3, "format valid": [0.0], "QA": [1, 0], "JSON on plain questions": [0, 0]}
    tuned = {**base, "task accuracy": [1, 1, 1, 1], "KL to base": [0.1, 0.2, 0.3], "CE increase": [0.1, 0.0, 0.2]}
    summary = sft.summarize({"base": base, "plain SFT": tuned})
    assert summary["plain SFT"]["task gain"].mean == pytest.approx(0.5)
    assert summary["plain SFT"]["KL to base"].mean == pytest.approx(0.2)
    rows = sft.table_rows(summary)
    assert rows[1]["recipe"] == "plain SFT" and rows[1]["n (task/KL/text)"] == "4/3/3"
    fig = sft.plot_gain_vs_forgetting(summary)
    assert len(fig.axes) == 2 and len(fig.axes[0].containers) == 1
    fig = sft.plot_scaling({0: summary["base"], 4: summary["plain SFT"]})
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="base"):
        sft.summarize({"plain SFT": tuned})


def test_evaluate_scores_every_measure_per_item_on_a_tiny_model():
    model, tokenizer = chat_model("tiny-llama")
    task = sft.judging_task(QA_ROWS)
    suite = sft.EvalSuite(task_rows=task, format_rows=task[:2], kl_rows=kl_rows(2),
                          texts=[{"text": "A short passage of plain text here."}], qa_rows=QA_ROWS[:3])
    with pytest.raises(ValueError, match="base model first"):
        sft.evaluate(model, tokenizer, suite)
    base = sft.evaluate(model, tokenizer, suite, is_base=True)
    assert {k: len(v) for k, v in base.items()} == {
        "task accuracy": 12, "KL to base": 2, "text CE": 1, "QA": 3, "JSON on plain questions": 3,
        "format valid": 2, "CE increase": 1}
    assert base["CE increase"] == [0.0] and base["format valid"] == [0.0, 0.0]


def test_how_a_step_is_split_into_micro_batches_does_not_change_training():
    """Rows are sorted by length and cut into micro-batches; the step's loss is the same sum either way."""
    model, tokenizer = chat_model("tiny-llama")
    task = sft.judging_task(QA_ROWS)
    runs = [sft.train_recipe(model, tokenizer, task, cache_rows(6), ratio=1, steps=3, batch_size=4, micro_batch=size,
                             lr=0.01, progress=False) for size in (1, 3, 16)]
    for run in runs[1:]:
        assert run.losses == pytest.approx(runs[0].losses, rel=1e-4)
    assert runs[0].losses[-1] < runs[0].losses[0]
