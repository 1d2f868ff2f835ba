"""Long prompts, run configs and the resumable batch runner of chapter 4."""

import json
import subprocess
import sys

import matplotlib
import pytest
import torch

import companion.kv as kv
from companion.config import REPO_ROOT, seed_everything
from companion.kv import (
    KVConfigError, book_prompts, load_run_config, load_run_configs, mmlu_prompts, plot_fidelity,
    read_results, run_config_from_dict, run_configs,
)
from companion.models import gpt2_tokenizer

matplotlib.use("Agg")


@pytest.fixture(scope="module", autouse=True)
def _settings():
    seed_everything()  # the course's seed and COURSE_THREADS


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def _mc_row(i, subject):
    return {"id": str(i), "question": f"Question {i} about {subject}: which option is right?",
            "choices": ["alpha", "beta", "gamma", "delta"], "label": i % 4, "subject": subject}


def test_book_prompts_are_exact_length_passages(tokenizer):
    rows = [{"id": "a", "title": "A", "text": "HEADER\n" + "To be or not to be, that is the question.\n" * 60},
            {"id": "b", "title": "B", "text": "too short"},
            {"id": "c", "title": "C", "text": "CAST\n" + "Friends, Romans, countrymen, lend me your ears.\n" * 60}]
    prompts = book_prompts(tokenizer, 2, 48, rows=rows)
    assert [len(p) for p in prompts] == [48, 48]
    assert tokenizer.decode(prompts[1].ids).startswith("Friends, Romans")  # starts at a line
    with pytest.raises(ValueError, match="only 2 of the texts have 48 tokens"):
        book_prompts(tokenizer, 3, 48, rows=rows)


def test_mmlu_prompts_are_many_shot_and_end_with_a_question(tokenizer):
    rows = [_mc_row(i, "anatomy") for i in range(30)] + [_mc_row(i, "law") for i in range(30, 40)]
    prompts = mmlu_prompts(tokenizer, 2, 120, rows=rows)
    assert [len(p) for p in prompts] == [120, 120]
    text = tokenizer.decode(prompts[0].ids)
    assert text.startswith("The following are multiple choice questions (with answers) about anatomy.")
    assert text.endswith("D. delta\nAnswer:") and text.count("Answer:") > 3
    with pytest.raises(ValueError, match="only 0 subjects have enough questions"):
        mmlu_prompts(tokenizer, 1, 2000, rows=rows)


def test_course_configs_load_and_cover_every_method():
    configs = load_run_configs(REPO_ROOT / "configs" / "kv")
    builtin = {"full", "random", "streaming_llm", "h2o", "snapkv", "tova", "key_norm", "topk", "quantize"}
    assert {c.method for c in configs} == builtin <= set(kv.available_methods())
    assert all(c.model == "smollm2-135m" and c.name.startswith("smollm2-135m-") for c in configs)
    retargeted = load_run_configs(REPO_ROOT / "configs" / "kv", model="tiny-llama")
    assert [c.label for c in retargeted] == [c.label for c in configs]
    assert all(c.model == "tiny-llama" and c.name == f"tiny-llama-{c.label}" for c in retargeted)


@pytest.mark.parametrize(
    "data, name, message",
    [
        ({"model": "m", "method": "h2o", "budgetz": [0.5]}, "m-h2o", r"unknown key 'budgetz'; allowed: model"),
        ({"method": "h2o"}, "m-h2o", r"missing required key 'model'"),
        ({"model": "m", "method": "h2o"}, "m-snapkv", r"file name must be m-h2o.json"),
        ({"model": "m", "method": "quantize", "budgets": [0.5]}, "m-quantize", r"takes no budget; remove 'budgets'"),
        ({"model": "m", "method": "h2o", "budgets": [0.5, 2.5]}, "m-h2o", r"'budget' must be a fraction of the prompt cache in \(0, 1\]"),
        ({"model": "m", "method": "h2o", "method_config": {"budget": 0.5}}, "m-h2o", r"in the 'budgets' list"),
        ({"model": "m", "method": "h2o", "dtype": "float16"}, "m-h2o", r"dtype must be one of float32"),
        ({"model": "m", "method": "h2o", "max_length": "512"}, "m-h2o", r"'max_length' must be an integer, got '512'"),
        ({"model": "m", "method": "h2o", "prompts": "wiki"}, "m-h2o", r"prompts must be one of suite, needle, book_qa"),
        ({"model": "m", "method": "nope"}, "m-nope", r"unknown method 'nope'"),
        ([1, 2], "m-h2o", r"expected a JSON object"),
    ],
)
def test_run_config_errors_are_clear(data, name, message):
    with pytest.raises(KVConfigError, match=message):
        run_config_from_dict(data, name)


def test_config_files_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(KVConfigError, match="broken.json: not valid JSON"):
        load_run_config(tmp_path / "broken.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.json run configs"):
        load_run_configs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run_config(tmp_path / "missing.json")


def _write(folder, label, **data):
    (folder / f"tiny-llama-{label}.json").write_text(json.dumps(
        {"model": "tiny-llama", "max_length": 64, "new_tokens": 4, "num_prompts": 2, "prompts": "mixed", **data}
    ))


def test_runner_writes_results_and_resumes(tmp_path, monkeypatch):
    configs_dir, results = tmp_path / "configs", tmp_path / "results"
    configs_dir.mkdir()
    _write(configs_dir, "full", method="full")
    _write(configs_dir, "h2o", method="h2o", budgets=[0.25, 0.5])
    _write(configs_dir, "quantize-4bit", method="quantize", method_config={"bits": 4, "group_size": 16})
    configs = load_run_configs(configs_dir)
    rows = run_configs(configs, results, progress=False)
    assert [(r["label"], r["budget"]) for r in rows] == [("full", None), ("h2o", 0.25), ("h2o", 0.5), ("quantize-4bit", None)]
    assert rows[0]["top1"] == 1.0 and rows[0]["kl"] == 0.0
    assert rows[1]["cache_fraction"] == pytest.approx(16 / 63) and rows[3]["cache_fraction"] == pytest.approx(6 / 32)
    assert all(r["tokens"] == 8 and r["prompt_tokens"] == 64 for r in rows)
    assert len(read_results(results)) == 4
    assert (results / "results.csv").read_text().count("\n") == 5

    # a second run does nothing new: no model is loaded, no method evaluated
    monkeypatch.setattr(kv.runs, "evaluate", lambda *a, **k: pytest.fail("a finished run was run again"))
    monkeypatch.setattr(kv.runs, "prepare_prompts", lambda *a, **k: pytest.fail("prompts were prepared again"))
    assert run_configs(configs, results, progress=False) == rows
    assert len(read_results(results)) == 4


def test_runner_resumes_after_an_interruption(tmp_path, monkeypatch):
    configs_dir, results = tmp_path / "configs", tmp_path / "results"
    configs_dir.mkdir()
    _write(configs_dir, "random", method="random", budgets=[0.25, 0.5, 0.75], prompts="mmlu")
    configs = load_run_configs(configs_dir)
    real_evaluate, calls = kv.runs.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(args[2].budget)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(kv.runs, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_configs(configs, results, progress=False)
    assert [r["budget"] for r in read_results(results)] == [0.25]
    monkeypatch.setattr(kv.runs, "evaluate", lambda *a, **k: calls.append(a[2].budget) or real_evaluate(*a, **k))
    rows = run_configs(configs, results, progress=False)
    assert calls == [0.25, 0.5, 0.5, 0.75] and [r["budget"] for r in rows] == [0.25, 0.5, 0.75]


def test_runner_refuses_a_model_for_several_configs(tmp_path):
    configs = [run_config_from_dict({"model": "a", "method": "full"}, "a-full"),
               run_config_from_dict({"model": "b", "method": "full"}, "b-full")]
    with pytest.raises(KVConfigError, match="configs name several models"):
        run_configs(configs, tmp_path, model=object(), tokenizer=object())


def test_command_line_and_plot(tmp_path, capsys):
    configs_dir = tmp_path / "configs"
    configs_dir.mkdir()
    _write(configs_dir, "snapkv", method="snapkv", method_config={"window": 4}, budgets=[0.5], prompts="books")
    assert kv.main(["run", str(configs_dir), "--results", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "snapkv" in out and "0.50" in out and (tmp_path / "out" / "fidelity.png").exists()
    fig = plot_fidelity(read_results(tmp_path / "out"), x="cache_fraction")
    assert len(fig.axes) == 3 and fig.axes[0].get_lines()
    assert kv.main(["methods"]) == 0 and "snapkv: {'budget': 0.5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="x must be"):
        plot_fidelity([], x="tokens")


def test_prompts_from_the_offline_data_are_exact(tokenizer):
    prompts = kv.long_prompts(tokenizer, 3, 64, "mixed")
    assert [len(p) for p in prompts] == [64, 64, 64] and all(p.ids.dtype == torch.long for p in prompts)
    with pytest.raises(KVConfigError, match="unknown prompt source 'wiki'"):
        kv.long_prompts(tokenizer, 1, 64, "wiki")


def test_runner_reuses_prepared_prompts_only_if_they_match(tmp_path):
    from companion.models import load_lm

    model, tokenizer = load_lm("tiny-llama")
    config = run_config_from_dict({"model": "tiny-llama", "method": "tova", "budgets": [0.5], "max_length": 64,
                                   "new_tokens": 4, "num_prompts": 2, "prompts": "mmlu"}, "tiny-llama-tova")
    length, new_tokens, count = config.sizes()
    states = kv.prepare_prompts(model, kv.long_prompts(tokenizer, count, length, "mmlu"), new_tokens, progress=False)
    rows = run_configs([config], tmp_path / "a", model=model, tokenizer=tokenizer, states=states, progress=False)
    fresh = run_configs([config], tmp_path / "b", model=model, tokenizer=tokenizer, progress=False)
    assert [(r["top1"], r["kl"]) for r in rows] == [(r["top1"], r["kl"]) for r in fresh]
    with pytest.raises(KVConfigError, match="prepared states are not this config's 2 prompts of 64 tokens"):
        run_configs([config], tmp_path / "c", model=model, tokenizer=tokenizer, states=states[:1], progress=False)
    with pytest.raises(KVConfigError, match="need the model they were prepared with"):
        run_configs([config], tmp_path / "d", states=states, progress=False)


# --- bad input (issue 15): each of these was silent or a deep traceback before -----------------


def test_runner_refuses_a_model_the_configs_do_not_name(tmp_path):  # issue 15, item 1
    from companion.models import load_lm

    model, tokenizer = load_lm("tiny-llama")
    config = run_config_from_dict({"model": "tiny-opt", "method": "full"}, "tiny-opt-full")
    with pytest.raises(KVConfigError, match=r"the configs are for 'tiny-opt' but the model passed is 'tiny-llama'; "
                                            r"use load_run_configs\(folder, model='tiny-llama'\)"):
        run_configs([config], tmp_path, model=model, tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_retargeting_that_makes_two_configs_collide_is_an_error(tmp_path):  # issue 15, item 4
    (tmp_path / "a-h2o.json").write_text(json.dumps({"model": "a", "method": "h2o"}))
    (tmp_path / "b-h2o.json").write_text(json.dumps({"model": "b", "method": "h2o", "budgets": [0.1]}))
    assert len(load_run_configs(tmp_path)) == 2
    with pytest.raises(KVConfigError, match=r"a-h2o.json and .*b-h2o.json both become run 'c-h2o' on model 'c'"):
        load_run_configs(tmp_path, model="c")


def test_a_torn_results_line_is_set_aside_and_the_run_resumes(tmp_path):  # issue 15, item 7
    configs_dir, results = tmp_path / "configs", tmp_path / "results"
    configs_dir.mkdir()
    _write(configs_dir, "key_norm", method="key_norm", budgets=[0.25, 0.5], prompts="mmlu")
    configs = load_run_configs(configs_dir)
    rows = run_configs(configs, results, progress=False)
    path = results / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:40])  # killed while writing the second row
    with pytest.warns(RuntimeWarning, match=r"results.jsonl:2: the last line of the KV results file was cut off"):
        again = run_configs(configs, results, progress=False)
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]
    assert (results / "results.jsonl.torn").exists() and len(read_results(results)) == 2


def test_two_runners_on_one_results_folder_take_turns(tmp_path, capsys):  # issue 15, item 8
    import threading
    import time

    from companion.records import locked

    configs_dir, results = tmp_path / "configs", tmp_path / "results"
    configs_dir.mkdir()
    _write(configs_dir, "full", method="full", prompts="mmlu")
    holding, release = threading.Event(), threading.Event()

    def other_runner():
        with locked(results):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=other_runner)
    thread.start()
    holding.wait(10)
    threading.Timer(0.5, release.set).start()
    start = time.perf_counter()
    rows = run_configs(load_run_configs(configs_dir), results, progress=False)
    thread.join()
    assert time.perf_counter() - start >= 0.5 and len(rows) == 1
    assert "another run is writing to" in capsys.readouterr().err


def test_config_errors_name_the_file(tmp_path):  # issue 15, item 11
    path = tmp_path / "tiny-llama-h2o.json"
    path.write_text(json.dumps({"model": "tiny-llama", "method": "h2o", "method_config": {"windw": 3}}))
    with pytest.raises(KVConfigError, match=r"tiny-llama-h2o.json: method 'h2o' has no knob 'windw'"):
        load_run_config(path)
    path.write_text(json.dumps({"model": "tiny-llama", "method": "h2o", "budgets": [0.5, 1.5]}))
    with pytest.raises(KVConfigError, match=r"tiny-llama-h2o.json: h2o: 'budget' must be a fraction"):
        load_run_config(path)


def test_a_group_size_that_does_not_divide_the_head_size_fails_before_any_row(tmp_path, monkeypatch):  # item 11
    configs_dir = tmp_path / "configs"
    configs_dir.mkdir()
    _write(configs_dir, "full", method="full")
    _write(configs_dir, "quantize-4bit", method="quantize", method_config={"bits": 4, "group_size": 12})
    configs = load_run_configs(configs_dir)  # the file alone is fine: the head size is the model's
    monkeypatch.setattr(kv.runs, "evaluate", lambda *a, **k: pytest.fail("a row was computed"))
    with pytest.raises(KVConfigError, match=r"tiny-llama-quantize-4bit.json: quantize: group_size 12 does not "
                                            r"divide the model's head size 16; use one of \[8, 16\]"):
        run_configs(configs, tmp_path / "results", progress=False)
    assert read_results(tmp_path / "results") == []


def test_command_line_errors_are_one_line(tmp_path, capsys):  # python -m companion.kv through companion.cli
    from companion import cli

    assert cli.run(kv.main, ["run", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run config ") and "missing.json does not exist" in err and err.count("\n") == 1
    (tmp_path / "a-h2o.json").write_text(json.dumps({"model": "a", "method": "h2o"}))
    (tmp_path / "b-h2o.json").write_text(json.dumps({"model": "b", "method": "h2o"}))
    assert cli.run(kv.main, ["run", str(tmp_path), "--model", "c"]) == 2
    assert "both become run 'c-h2o'" in capsys.readouterr().err
    with pytest.raises(KVConfigError):
        cli.run(kv.main, ["run", str(tmp_path), "--model", "c", "--debug"])
    done = subprocess.run([sys.executable, "-m", "companion.kv", "run", str(tmp_path / "missing.json")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
