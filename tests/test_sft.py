"""Tests of companion.sft on tiny models: task rows, cache, mix, new token, LoRA SFT, scoring."""

import json
from collections import Counter

import pytest
import torch

from companion import sft
from companion.arch import unwrap
from companion.config import seed_everything
from companion.models import CHATML_TEMPLATE, load_lm

ARCHS = ["tiny-opt", "tiny-llama"]


def chat_model(name):
    """A tiny model with a chat template (the tiny OPT has none, so it borrows ChatML)."""
    seed_everything(0)
    model, tokenizer = load_lm(name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return model, tokenizer


QA_ROWS = [
    {"id": f"q{i}", "question": f"What is the capital of land {i}?", "answer": f"City{i}", "category": "geo"}
    for i in range(6)
] + [
    {"id": f"e{i}", "question": f"What is the symbol of element {i}?", "answer": f"X{i}", "category": "chem"}
    for i in range(6)
]


def queries(n, start=0):
    return [{"id": f"d{i}", "category": f"cat{i % 3}", "query": f"Tell me about topic {i}."}
            for i in range(start, start + n)]


# --- the judging task ---------------------------------------------------------------------


def test_judging_task_is_balanced_with_plausible_wrong_answers():
    rows = sft.judging_task(QA_ROWS, seed=0)
    assert Counter(r["label"] for r in rows) == {"yes": 6, "no": 6}
    for row, qa in zip(rows, QA_ROWS):
        verdict = sft.parse_verdict(row["completion"][0]["content"])
        assert verdict == {"thought": f"The right answer is {qa['answer']}.", "hallucination": row["label"]}
        if row["label"] == "yes":
            assert row["proposed"] != qa["answer"]
            assert row["proposed"][0] == qa["answer"][0]  # from the same category (City.. / X..)
        else:
            assert row["proposed"] == qa["answer"]
        assert sft.SEP_TOKEN in row["prompt"][0]["content"]
    assert sft.judging_task(QA_ROWS, seed=0) == rows  # seeded
    assert sft.judging_task(QA_ROWS, seed=1) != rows


def test_with_instruction_swaps_only_the_instruction():
    rows = sft.judging_task(QA_ROWS[:4])
    probes = sft.with_instruction(rows, sft.DO_NOT_FOLLOW_FORMAT)
    for row, probe in zip(rows, probes):
        assert probe["prompt"][0]["content"].endswith(sft.DO_NOT_FOLLOW_FORMAT)
        assert probe["prompt"][0]["content"].split("\n")[:2] == row["prompt"][0]["content"].split("\n")[:2]
        assert probe["label"] == row["label"]


@pytest.mark.parametrize("text, valid", [
    ('{"thought": "The right answer is Paris.", "hallucination": "no"}', True),
    ('  {"thought": "x", "hallucination": "yes"}\n', True),
    ('{"thought": "x", "hallucination": "maybe"}', False),
    ('{"thought": "x"}', False),
    ('{"thought": "x", "hallucination": "no", "extra": 1}', False),
    ('{"thought": "x", "hallucination": "no"} and more', False),
    ("No, the answer is wrong.", False),
    ('["thought", "hallucination"]', False),
])
def test_parse_verdict_is_strict(text, valid):
    assert (sft.parse_verdict(text) is not None) == valid


def test_judging_task_needs_question_and_answer():
    with pytest.raises(ValueError, match="lacks"):
        sft.judging_task([{"question": "q"}, {"question": "r", "answer": "a"}])


# --- diverse queries, cache and mix -------------------------------------------------------


def test_diverse_queries_spread_over_categories():
    pool = [{"id": f"big{i}", "category": "big", "query": "q"} for i in range(50)]
    pool += [{"id": f"small{i}", "category": f"small{i % 4}", "query": "q"} for i in range(8)]
    picked = sft.diverse_queries(10, pool=pool, seed=0)
    counts = Counter(q["category"] for q in picked)
    assert len(picked) == 10 and len({q["id"] for q in picked}) == 10
    assert set(counts) == {"big", "small0", "small1", "small2", "small3"}
    assert max(counts.values()) == 2  # round robin, not proportional to the pool
    assert sft.diverse_queries(10, pool=pool, seed=0) == picked
    with pytest.raises(ValueError, match="only 58"):
        sft.diverse_queries(100, pool=pool)


class CountingGenerate:
    """Wraps model.generate to count the rows it is asked for (and fail on demand)."""

    def __init__(self, model, fail_on_call=None):
        self.model, self.original = model, model.generate
        self.rows, self.calls, self.fail_on_call = 0, 0, fail_on_call

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt("simulated interruption")
        self.rows += kwargs["input_ids"].shape[0]
        return self.original(*args, **kwargs)


def test_resumed_cache_build_does_not_repeat_work(tmp_path):
    model, tokenizer = chat_model("tiny-llama")
    path = tmp_path / "cache.jsonl"
    counter = CountingGenerate(model)
    model.generate = counter
    first = sft.build_cache(model, tokenizer, queries(5), path, batch_size=2, max_new_tokens=4, progress=False)
    assert counter.rows == 5 and len(first) == 5
    more = sft.build_cache(model, tokenizer, queries(7), path, batch_size=2, max_new_tokens=4, progress=False)
    assert counter.rows == 7  # only the 2 new queries were sampled
    assert more[:5] == first
    assert [r["id"] for r in more] == [q["id"] for q in queries(7)]
    assert len(path.read_text().splitlines()) == 7
    again = sft.build_cache(model, tokenizer, queries(7), path, batch_size=2, max_new_tokens=4, progress=False)
    assert counter.rows == 7 and again == more


def test_interrupted_cache_build_resumes_where_it_stopped(tmp_path):
    model, tokenizer = chat_model("tiny-llama")
    path = tmp_path / "cache.jsonl"
    model.generate = CountingGenerate(model, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        sft.build_cache(model, tokenizer, queries(6), path, batch_size=2, max_new_tokens=4, progress=False)
    kept = sft.read_cache(path)
    assert [r["id"] for r in kept] == ["d0", "d1"]  # the finished batch was written
    counter = CountingGenerate(model)
    model.generate = counter
    rows = sft.build_cache(model, tokenizer, queries(6), path, batch_size=2, max_new_tokens=4, progress=False)
    assert counter.rows == 4 and rows[:2] == kept


def test_malformed_cache_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "cache.jsonl"
    good = {"id": "a", "category": "c", "query": "q", "response": "r", "model": "m"}
    path.write_text(json.dumps(good) + "\n" + '{"id": "b", "query": \n', encoding="utf-8")
    with pytest.raises(sft.CacheError, match=r"cache\.jsonl:2: not valid JSON"):
        sft.read_cache(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"id": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(sft.CacheError, match=r"cache\.jsonl:3: a cache row needs"):
        sft.read_cache(path)


def test_cache_of_another_model_is_refused(tmp_path):
    model, tokenizer = chat_model("tiny-llama")
    path = tmp_path / "cache.jsonl"
    row = {"id": "a", "category": "c", "query": "q", "response": "r", "model": "someone-else"}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(sft.CacheError, match="someone-else"):
        sft.build_cache(model, tokenizer, queries(1), path, progress=False)


def cache_rows(n):
    return [{"id": f"d{i}", "category": "c", "query": f"q{i}", "response": f"r{i}", "model": "m"} for i in range(n)]


@pytest.mark.parametrize("ratio, expected", [(0, 0), (1, 10), (2.5, 25), (0.35, 4)])
def test_mix_has_exactly_the_requested_counts(ratio, expected):
    task = sft.judging_task(QA_ROWS[:10])
    mixed = sft.mix(task, cache_rows(30), ratio, seed=0)
    counts = Counter(r["source"] for r in mixed)
    assert counts["task"] == 10 and counts["diverse"] == expected
    assert sorted(r["id"] for r in mixed if r["source"] == "task") == sorted(r["id"] for r in task)
    assert len({r["id"] for r in mixed}) == len(mixed)  # no row twice
    assert all("prompt" in r and "completion" in r for r in mixed)
    assert sft.mix(task, cache_rows(30), ratio, seed=0) == mixed


def test_mix_refuses_too_few_diverse_rows():
    task = sft.judging_task(QA_ROWS[:10])
    with pytest.raises(ValueError, match="needs 30 diverse rows but only 12"):
        sft.mix(task, cache_rows(12), 3)


# --- a new special token and LoRA SFT ------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_add_special_token_grows_vocab_and_initialises_row(name):
    model, tokenizer = chat_model(name)
    rows_before = model.get_input_embeddings().weight.shape[0]
    init_ids = tokenizer("JSON format", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[init_ids].mean(dim=0).detach().clone()
    token_id = sft.add_special_token(model, tokenizer, init_text="JSON format")
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == rows_before + 1 == len(tokenizer)
    assert torch.allclose(weight[token_id], expected)
    assert tokenizer.tokenize("follow the <sep> format").count(sft.SEP_TOKEN) == 1
    # Logits have a column for it (tied head) and a second call changes nothing.
    assert model.get_output_embeddings().weight.shape[0] == rows_before + 1
    assert sft.add_special_token(model, tokenizer, init_text="JSON format") == token_id
    assert model.get_input_embeddings().weight.shape[0] == rows_before + 1


@pytest.mark.parametrize("name", ARCHS)
def test_completion_only_labels_mask_every_prompt_token(name):
    model, tokenizer = chat_model(name)
    rows = sft.mix(sft.judging_task(QA_ROWS[:4]), cache_rows(4), 1, seed=0)
    trainer = sft.sft_trainer(model, tokenizer, rows, max_length=256, progress=False)
    assert len(trainer.train_dataset) == len(rows)
    for row, example in zip(rows, trainer.train_dataset):
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        cut = len(prompt_ids)
        ids, labels = example["input_ids"], example["labels"]
        assert ids[:cut] == prompt_ids
        assert all(label == -100 for label in labels[:cut])
        assert labels[cut:] == ids[cut:] and len(labels) > cut
        trained = tokenizer.decode(labels[cut:])
        assert trained.startswith(row["completion"][0]["content"])


@pytest.mark.parametrize("name", ARCHS)
def test_new_token_embedding_trains_while_frozen_weights_do_not(name):
    model, tokenizer = chat_model(name)
    sep = sft.add_special_token(model, tokenizer, init_text="JSON format")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    other_ids = tokenizer("Question: capital Proposed answer", add_special_tokens=False)["input_ids"] + [0, 5]
    rows = sft.judging_task(QA_ROWS, seed=0)
    run = sft.train_sft(model, tokenizer, rows, num_steps=3, lr=0.05, batch_size=4,
                        trainable_tokens=[sep], progress=False)
    tuned = run.model
    assert run.steps == 3 and len(run.losses) == 3 and run.tokens > 0

    # The new token's row moved; every other row of the embedding did not.
    assert not torch.allclose(sft.token_embedding(tuned, sep), before_row(before, model, sep))
    for token in other_ids:
        assert torch.equal(sft.token_embedding(tuned, token), before_row(before, model, token))

    # Only LoRA matrices and the token delta are trainable, and LoRA really trained.
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any("trainable_tokens_delta" in n for n in trainable)
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)

    # Every frozen backbone weight is bit for bit what it was.
    for name_, value in unwrap(tuned).state_dict().items():
        if "lora_" in name_ or "trainable_tokens" in name_:
            continue
        key = name_.replace(".base_layer", "").replace(".token_adapter", "")
        assert torch.equal(value, before[key]), key
    # And the model passed in was not touched at all.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def before_row(state, model, token_id):
    key = next(k for k in state if k.endswith("embed_tokens.weight"))
    return state[key][token_id]


def test_sft_rows_must_be_prompt_completion():
    model, tokenizer = chat_model("tiny-llama")
    with pytest.raises(ValueError, match="'prompt' and 'completion'"):
        sft.sft_trainer(model, tokenizer, [{"text": "hello"}], progress=False)


def test_sft_needs_a_chat_template():
    model, tokenizer = load_lm("tiny-opt")
    with pytest.raises(ValueError, match="chat template"):
        sft.sft_trainer(model, tokenizer, sft.judging_task(QA_ROWS[:2]), progress=False)


# --- scoring ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, reference, score", [
    ("The capital of France is Paris.", "Paris", 1.0),
    ("paris", "Paris", 1.0),
    ("Parisian food is good", "Paris", 0.0),
    ("It is Kuala Lumpur, I think", "Kuala Lumpur", 1.0),
])
def test_qa_score_containment(prediction, reference, score):
    assert sft.qa_score(prediction, reference) == score


def test_qa_score_falls_back_to_token_f1():
    score = sft.qa_score("plug it into another port", "Try plugging it into another USB port")
    assert 0 < score < 1


def test_mmlu_groups_cover_each_subject_once_and_unknown_subjects_fail():
    subjects = [s for group in sft.MMLU_GROUPS.values() for s in group]
    assert len(subjects) == len(set(subjects)) == 57
    assert sft.mmlu_group("high_school_physics") == "STEM"
    with pytest.raises(ValueError, match="MMLU_GROUPS"):
        sft.mmlu_group("astrology")


class MarkerModel(torch.nn.Module):
    """A fake LM that answers "C" for prompts containing a marker token and "A" otherwise."""

    def __init__(self, tokenizer):
        super().__init__()
        self.marker = tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
        self.a, self.c = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "AC")
        self.vocab = len(tokenizer)

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids):
            logits[row, -1, self.c if (ids == self.marker).any() else self.a] = 1.0
        return type("Out", (), {"logits": logits})()


def test_multiple_choice_accuracy_reads_the_letter_logits_of_each_row():
    _, tokenizer = chat_model("tiny-llama")
    # Rows of different lengths (so batching by length reorders them), label C with the marker.
    rows = [{"question": "word " * (7 - i) + ("the zebra" if i % 3 == 0 else "the horse"),
             "choices": ["a", "b", "c", "d"], "label": 2 if i % 3 == 0 else 0} for i in range(8)]
    model = MarkerModel(tokenizer)
    assert sft.multiple_choice_accuracy(model, tokenizer, rows, batch_size=3) == 1.0
    flipped = [{**row, "label": 2 - row["label"]} for row in rows]
    assert sft.multiple_choice_accuracy(model, tokenizer, flipped, batch_size=3) == 0.0
    assert tokenizer.padding_side == "left"


def test_scorecard_runs_end_to_end_on_a_tiny_model():
    model, tokenizer = chat_model("tiny-llama")
    task = sft.judging_task(QA_ROWS[:4])
    abilities = {
        "geo": sft.Ability("geo", "qa", QA_ROWS[:3]),
        "mc": sft.Ability("mc", "multiple_choice",
                          [{"question": "Q", "choices": ["a", "b", "c", "d"], "label": 0}]),
    }
    card = sft.scorecard(model, tokenizer, task, abilities,
                         probe_rows=sft.with_instruction(task, sft.DO_NOT_FOLLOW_FORMAT))
    assert list(card) == ["task accuracy", "format valid", "JSON despite DO NOT", "JSON on plain questions",
                          "geo", "mc"]
    assert all(0.0 <= v <= 1.0 for v in card.values())
    assert card["format valid"] == 0.0  # a random model writes no valid JSON
    table = sft.format_table({"base": card, "other": {"geo": 0.5}})
    assert "JSON despite DO NOT" in table.splitlines()[3] and table.count("-") >= 1
    with pytest.raises(ValueError, match="unknown kind"):
        sft.evaluate_abilities(model, tokenizer, {"x": sft.Ability("x", "essay", QA_ROWS[:1])})


def test_plots_draw_one_series_per_recipe_and_category():
    import matplotlib

    matplotlib.use("Agg")
    results = {
        "base": {"task accuracy": 0.0, "format valid": 0.0, "geo": 0.5, "mc": 0.25},
        "plain": {"task accuracy": 0.6, "format valid": 1.0, "geo": 0.25, "mc": 0.25},
        "delia": {"task accuracy": 0.5, "format valid": 0.9, "geo": 0.5, "mc": 0.5},
    }
    fig = sft.plot_scorecards(results)
    left, right = fig.axes
    assert len(left.patches) == 3 * 2  # 3 recipes x 2 task metrics
    heights = [p.get_height() for p in right.patches]
    assert heights == pytest.approx([-0.25, 0.0, 0.0, 0.25])  # changes vs base, per tuned recipe
    with pytest.raises(ValueError, match="baseline"):
        sft.plot_scorecards(results, baseline="none")
    fig = sft.plot_scaling({0: results["base"], 8: results["plain"], 16: results["delia"]})
    assert len(fig.axes[0].lines) == 4
    assert list(fig.axes[0].lines[2].get_ydata()) == [0.5, 0.25, 0.5]


def test_judging_scores_count_wrong_and_invalid_replies():
    rows = [{"label": "yes"}, {"label": "no"}, {"label": "no"}, {"label": "yes"}]
    replies = [
        sft.verdict_json("t", "yes"),            # right
        sft.verdict_json("t", "yes"),            # valid, wrong verdict
        "no",                                     # prose: invalid, counts as wrong
        '{"thought": "t", "hallucination": "yes"',  # JSON-looking but broken
    ]
    scores = sft.judging_scores(rows, replies)
    assert scores == {"accuracy": 0.25, "format_valid": 0.5, "json_rate": 0.75}
    with pytest.raises(ValueError, match="3 replies for 4"):
        sft.judging_scores(rows, replies[:3])


def test_abilities_scored_in_one_pass_go_back_to_their_categories(monkeypatch):
    seen = []

    def fake_replies(model, tokenizer, conversations, **options):
        seen.append(len(conversations))
        # Right answers for the geography questions only.
        return [f"It is City{c[0]['content'].split()[-1].rstrip('?')}" if "capital" in c[0]["content"] else "?"
                for c in conversations]

    monkeypatch.setattr(sft, "generate_replies", fake_replies)
    abilities = {"geo": sft.Ability("geo", "qa", QA_ROWS[:6]), "chem": sft.Ability("chem", "qa", QA_ROWS[6:9])}
    scores = sft.evaluate_abilities(None, None, abilities)
    assert scores == {"geo": 1.0, "chem": 0.0}
    assert seen == [9]  # one batched pass over both categories


def test_model_name_is_short_for_folders_and_hub_ids():
    class Config:
        name_or_path = "/home/me/.cache/llm-cpu-course/models/smollm2-135m"

    class Model(torch.nn.Module):
        config = Config()

    assert sft.model_name(Model()) == "smollm2-135m"
    Config.name_or_path = "facebook/opt-125m"
    assert sft.model_name(Model()) == "opt-125m"


def test_ability_suite_and_query_pool_come_from_disjoint_splits():
    from companion.data import load_data

    suite = sft.ability_suite(3, seed=0, max_chars=300)
    assert list(suite) == list(sft.QA_ABILITIES) + [f"MMLU {g}" for g in sft.MMLU_GROUPS]
    assert all(len(a.rows) == 3 for a in suite.values())
    assert all(len(sft.multiple_choice_text(r)) <= 300 for a in suite.values() if a.kind == "multiple_choice"
               for r in a.rows)
    short_qa = load_data("short_qa")
    test_ids = set(short_qa["test"]["id"]) | set(load_data("mmlu")["test"]["id"])
    assert all(r["id"] in test_ids for a in suite.values() for r in a.rows)
    pool = sft.query_pool(max_chars=300)
    assert all(len(q["query"]) <= 300 for q in pool)
    assert not {q["id"] for q in pool} & (test_ids | set(short_qa["validation"]["id"]))
    assert len({q["category"] for q in pool}) >= 20


def test_bad_inputs_get_clear_errors(tmp_path):
    model, tokenizer = chat_model("tiny-llama")
    with pytest.raises(ValueError, match="add_special_token first"):
        sft.lora_config(model, trainable_tokens=[len(tokenizer) + 5])
    with pytest.raises(ValueError, match="needs 'id' and 'query'"):
        sft.build_cache(model, tokenizer, [{"id": "a", "text": "q"}], tmp_path / "c.jsonl", progress=False)
    with pytest.raises(ValueError, match="duplicate ids"):
        sft.build_cache(model, tokenizer, queries(2) + queries(1), tmp_path / "c.jsonl", progress=False)
    with pytest.raises(ValueError, match="ratio must be >= 0"):
        sft.mix(sft.judging_task(QA_ROWS[:2]), cache_rows(2), -1)


def test_scorecard_counts_json_replies_to_plain_questions(monkeypatch):
    def fake_replies(model, tokenizer, conversations, **options):
        text = [c[0]["content"] for c in conversations]
        return [sft.verdict_json("t", "no") if "Proposed answer" in t
                else ('{"thought": "x"}' if "land" in t else "Plain prose.") for t in text]

    monkeypatch.setattr(sft, "generate_replies", fake_replies)
    task = sft.judging_task(QA_ROWS[:4])
    abilities = {"geo": sft.Ability("geo", "qa", QA_ROWS[:6]), "chem": sft.Ability("chem", "qa", QA_ROWS[6:8])}
    card = sft.scorecard(None, None, task, abilities, probe_rows=sft.with_instruction(task, sft.DO_NOT_FOLLOW_FORMAT))
    assert card["format valid"] == 1.0 and card["task accuracy"] == 0.5
    assert card["JSON despite DO NOT"] == 1.0
    assert card["JSON on plain questions"] == 6 / 8
