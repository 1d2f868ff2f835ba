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
    assert Counter(r["label"] for r in rows) == {"wrong": 6, "correct": 6}
    for row, qa in zip(rows, QA_ROWS):
        assert sft.parse_verdict(row["completion"][0]["content"]) == row["label"]
        prompt = row["prompt"][0]["content"]
        assert prompt.startswith(f"Context: Q: {qa['question']} A: {qa['answer']}\n")
        if row["label"] == "wrong":
            assert row["proposed"] != qa["answer"]
            assert row["proposed"][0] == qa["answer"][0]  # from the same category (City.. / X..)
        else:
            assert row["proposed"] == qa["answer"]
        assert f"Proposed answer: {row['proposed']}\n" in prompt and sft.SEP_TOKEN in prompt
    assert sft.judging_task(QA_ROWS, seed=0) == rows  # seeded
    assert sft.judging_task(QA_ROWS, seed=1) != rows


def test_with_instruction_swaps_only_the_instruction():
    rows = sft.judging_task(QA_ROWS[:4])
    probes = sft.with_instruction(rows, sft.DO_NOT_FOLLOW_FORMAT)
    for row, probe in zip(rows, probes):
        assert probe["prompt"][0]["content"].endswith(sft.DO_NOT_FOLLOW_FORMAT)
        assert probe["prompt"][0]["content"].split("\n")[:3] == row["prompt"][0]["content"].split("\n")[:3]
        assert probe["label"] == row["label"]


@pytest.mark.parametrize("text, valid", [
    ('{"verdict": "correct"}', True),
    ('  {"verdict": "wrong"}\n', True),
    ('{"verdict": "maybe"}', False),
    ('{"verdict": "wrong", "extra": 1}', False),
    ('{"verdict": "wrong"} and more', False),
    ("No, the answer is wrong.", False),
    ('["verdict", "wrong"]', False),
])
def test_parse_verdict_is_strict(text, valid):
    assert (sft.parse_verdict(text) is not None) == valid


def test_judging_task_needs_question_and_answer():
    with pytest.raises(ValueError, match="lacks"):
        sft.judging_task([{"question": "q"}, {"question": "r", "answer": "a"}])
    with pytest.raises(ValueError, match="verdict must be one of"):
        sft.verdict_json("maybe")


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


def test_torn_last_cache_line_is_set_aside_and_the_build_resumes(tmp_path):
    """Issue 15 item 7: a killed run leaves half a line; the next run warns, keeps the rest, resumes."""
    model, tokenizer = chat_model("tiny-llama")
    path = tmp_path / "cache.jsonl"
    sft.build_cache(model, tokenizer, queries(3), path, batch_size=3, max_new_tokens=4, progress=False)
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "d3", "category": "c", "que')  # torn mid-write
    counter = CountingGenerate(model)
    model.generate = counter
    with pytest.warns(RuntimeWarning, match=r"cache\.jsonl:4: the last line"):
        rows = sft.build_cache(model, tokenizer, queries(5), path, batch_size=2, max_new_tokens=4, progress=False)
    assert counter.rows == 2 and [r["id"] for r in rows] == [q["id"] for q in queries(5)]
    assert (tmp_path / "cache.jsonl.torn").read_text().startswith('{"id": "d3"')
    assert len(sft.read_cache(path)) == 5


def test_cache_row_after_a_line_without_newline_is_not_glued(tmp_path):
    """Issue 15 item 7: a cache whose last line lacks its newline gets the next row on a line of its own."""
    model, tokenizer = chat_model("tiny-llama")
    path = tmp_path / "cache.jsonl"
    good = {"id": "d0", "category": "c", "query": "q", "response": "r", "model": "tiny-llama"}
    path.write_text(json.dumps(good), encoding="utf-8")  # no final newline
    rows = sft.build_cache(model, tokenizer, queries(2), path, batch_size=2, max_new_tokens=4, progress=False)
    assert rows[0] == good and len(path.read_text().splitlines()) == 2
    assert [r["id"] for r in sft.read_cache(path)] == ["d0", "d1"]


def test_malformed_cache_rows_are_reported(tmp_path):
    path = tmp_path / "cache.jsonl"
    good = {"id": "a", "category": "c", "query": "q", "response": "r", "model": "m"}
    path.write_text('{"id": "b", "query": \n' + json.dumps(good) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cache\.jsonl:1: damaged line in the middle"):
        sft.read_cache(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"id": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(sft.CacheError, match=r"row 2 .*a cache row needs"):
        sft.read_cache(path)


def test_batch_seeds_differ_for_anagram_ids():
    """Issue 15: seeds were the sum of the id's character codes, so "ab" and "ba" sampled alike."""
    assert sft.batch_seed(0, "ab") != sft.batch_seed(0, "ba")
    assert sft.batch_seed(0, "chat-12") != sft.batch_seed(0, "chat-21")
    assert sft.batch_seed(0, "ab") == sft.batch_seed(0, "ab") and sft.batch_seed(1, "ab") != sft.batch_seed(0, "ab")


def test_anagram_ids_get_different_samples(tmp_path):
    model, tokenizer = chat_model("tiny-llama")
    same = [{"id": i, "category": "c", "query": "Tell me a story."} for i in ("ab", "ba")]
    one = sft.build_cache(model, tokenizer, same[:1], tmp_path / "a.jsonl", batch_size=1, max_new_tokens=12,
                          progress=False, seed=0)
    two = sft.build_cache(model, tokenizer, same[1:], tmp_path / "b.jsonl", batch_size=1, max_new_tokens=12,
                          progress=False, seed=0)
    assert one[0]["response"] != two[0]["response"]


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


# --- the query pool -----------------------------------------------------------------------


def test_mmlu_groups_cover_each_subject_once_and_unknown_subjects_fail():
    subjects = [s for group in sft.MMLU_GROUPS.values() for s in group]
    assert len(subjects) == len(set(subjects)) == 57
    assert sft.mmlu_group("high_school_physics") == "STEM"
    with pytest.raises(ValueError, match="MMLU_GROUPS"):
        sft.mmlu_group("astrology")


def test_query_pool_and_heldout_rows_come_from_disjoint_splits():
    from companion.data import load_data

    pool = sft.query_pool(max_chars=300)
    assert all(len(q["query"]) <= 300 for q in pool)
    short_qa = load_data("short_qa")
    held_out = set(short_qa["validation"]["id"]) | set(short_qa["test"]["id"])
    held_out |= {q["id"] for q in sft.kl_queries(40)} | {t["id"] for t in sft.heldout_texts(2, 10)}
    assert not {q["id"] for q in pool} & held_out
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
