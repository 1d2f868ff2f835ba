"""companion.delta: PEFT configs by name, training on targets only, save/load, ask, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from companion import arch, cli, delta
from companion.models import TinySpec, load_lm

ARCHS = ["tiny-opt", "tiny-llama"]
PAIRS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: How many legs has a spider?\nAnswer:", " eight"),
    ("Question: What gas do plants absorb?\nAnswer:", " carbon dioxide"),
]


def _logits(model, tokenizer, texts):
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits


def test_unknown_method_lists_known_names():
    model, _ = load_lm("tiny-opt")
    with pytest.raises(ValueError, match="lora, prompt_tuning, prefix_tuning, ia3"):
        delta.peft_config("adapterdrop", model)
    with pytest.raises(ValueError, match="unknown delta method"):
        delta.attach(model, "bitfit")


def test_unknown_knob_is_named():
    model, _ = load_lm("tiny-opt")
    with pytest.raises(ValueError, match="rank"):
        delta.peft_config("lora", model, rank=4)


@pytest.mark.parametrize("name", ARCHS)
def test_configs_target_the_architecture(name):
    model, _ = load_lm(name)
    lora = delta.peft_config("lora", model, r=4)
    assert set(lora.target_modules) == set(arch.lora_target_modules(model)) and lora.r == 4
    ia3 = delta.peft_config("ia3", model)
    assert set(ia3.feedforward_modules) == set(arch.mlp_target_modules(model))
    assert set(arch.mlp_target_modules(model)) < set(ia3.target_modules)


@pytest.mark.parametrize("name", ARCHS)
def test_lora_trainable_count_matches_formula(name):
    model, _ = load_lm(name)
    d, kv = model.config.hidden_size, 64 // 4 * model.config.num_key_value_heads if name == "tiny-llama" else 64
    peft_model = delta.attach(model, "lora", r=8)
    # q_proj: d -> d, v_proj: d -> kv width; LoRA adds r * (in + out) per matrix
    expected = arch.num_layers(model) * 8 * ((d + d) + (d + kv))
    assert delta.trainable_parameters(peft_model) == expected


def test_encode_pair_labels_only_the_target_and_keeps_it_when_truncating():
    _, tokenizer = load_lm("tiny-opt")
    row = delta.encode_pair(tokenizer, "Question: the capital of Italy, please?\nAnswer:", " Rome", 64)
    target = tokenizer(" Rome", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(row["input_ids"]) - len(target)
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == target == row["input_ids"][n_prompt:]
    short = delta.encode_pair(tokenizer, "Question: the capital of Italy, please?\nAnswer:", " Rome", 5)
    assert len(short["input_ids"]) == 5 and short["input_ids"][-len(target):] == target
    with pytest.raises(ValueError, match="empty target"):
        delta.encode_pair(tokenizer, "Question?", "", 16)


def test_train_loss_is_the_target_tokens_cross_entropy():
    model, tokenizer = load_lm("tiny-llama")
    peft_model = delta.attach(model, "lora")
    prompt, target = PAIRS[0]
    row = delta.encode_pair(tokenizer, prompt, target, 64)
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits[0, :-1]
    labels = torch.tensor(row["labels"][1:])
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    # lr=0: the first step's loss is measured before any change
    losses = delta.train(peft_model, tokenizer, [PAIRS[0]], num_steps=1, lr=0.0, batch_size=1, max_length=64)
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", delta.METHODS)
def test_every_method_trains_only_its_delta(name, method):
    model, tokenizer = load_lm(name)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "embed" in k or "lm_head" in k}
    peft_model = delta.attach(model, method)
    trainable = delta.trainable_parameters(peft_model)
    assert 0 < trainable < 0.05 * sum(p.numel() for p in model.parameters())
    delta_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    losses = delta.train(peft_model, tokenizer, PAIRS, num_steps=3, lr=1e-2, batch_size=2, max_length=32)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, delta_before[n])]
    assert changed, "training changed no delta parameter"
    for key, value in frozen_before.items():
        assert torch.equal(model.state_dict()[key], value), f"backbone weight {key} changed"


@pytest.mark.parametrize("name", ARCHS)
def test_lora_learns_the_pairs(name):
    model, tokenizer = load_lm(name)
    peft_model = delta.attach(model, "lora", r=8)
    losses = delta.train(peft_model, tokenizer, PAIRS, num_steps=30, lr=3e-2, batch_size=3, max_length=32, seed=1)
    # A random tiny model's logits stay nearly uniform (loss ~ ln 50257), but the drop is
    # clear and greedy decoding already picks every trained answer.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3
    answers = delta.generate_answers(peft_model, tokenizer, [p for p, _ in PAIRS], max_new_tokens=4)
    for answer, (_, target) in zip(answers, PAIRS):
        assert answer.startswith(target.split()[0]), (answer, target)

@pytest.mark.parametrize("name", ARCHS)
def test_train_equals_the_plain_peft_recipe(name):
    """delta.attach + delta.train are LoraConfig + get_peft_model + an AdamW loop on right-padded
    batches with the prompt labelled -100, drawn from a seeded shuffle (chapter 1's "open the box")."""
    import random

    from peft import LoraConfig, get_peft_model

    steps, batch_size, lr, seed = 2, 2, 1e-2, 3
    base, tokenizer = load_lm(name)
    torch.manual_seed(seed)
    plain = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=arch.lora_target_modules(base)))
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)  # delta.train shuffles the pairs with it, again at each new pass
    first, second = list(range(len(PAIRS))), list(range(len(PAIRS)))
    rng.shuffle(first)
    rng.shuffle(second)
    order = first + second
    plain.train()
    torch.manual_seed(seed)
    plain_losses = []
    for step in range(steps):
        rows = [PAIRS[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        ids, labels = [], []
        for prompt, answer in rows:
            prompt_ids = tokenizer(prompt)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
        width = max(map(len, ids))
        batch = {
            "input_ids": torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]),
            "labels": torch.tensor([row + [-100] * (width - len(row)) for row in labels]),
        }
        loss = plain(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        plain_losses.append(loss.item())

    package_base, _ = load_lm(name)
    torch.manual_seed(seed)
    package = delta.attach(package_base, "lora")
    package_losses = delta.train(package, tokenizer, PAIRS, num_steps=steps, lr=lr, batch_size=batch_size,
                                 max_length=64, seed=seed)
    assert package_losses == plain_losses
    ours = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in package.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_save_and_reload_gives_identical_outputs(name, method, tmp_path):
    model, tokenizer = load_lm(name)
    peft_model = delta.attach(model, method)
    delta.train(peft_model, tokenizer, PAIRS, num_steps=4, lr=1e-2, batch_size=3, max_length=32)
    path = delta.save_delta(peft_model, tmp_path / "delta")
    assert delta.delta_info(path)["backbone"]["name"] == name
    assert 0 < delta.checkpoint_bytes(path) < delta.backbone_bytes(peft_model)
    fresh, _ = load_lm(name)
    reloaded = delta.load_delta(path, fresh)
    prompts = [p for p, _ in PAIRS]
    assert torch.equal(_logits(peft_model, tokenizer, prompts), _logits(reloaded, tokenizer, prompts))
    # without a base model, load_delta loads the backbone the delta names
    assert torch.equal(_logits(delta.load_delta(path), tokenizer, prompts), _logits(reloaded, tokenizer, prompts))


def test_delta_for_another_backbone_is_refused(tmp_path):
    model, _ = load_lm("tiny-opt")
    path = delta.save_delta(delta.attach(model, "lora"), tmp_path / "opt_delta")
    other_arch, _ = load_lm("tiny-llama")
    with pytest.raises(delta.DeltaMismatchError, match="model_type: checkpoint 'opt', model 'llama'"):
        delta.load_delta(path, other_arch)
    same_shape_other_weights, _ = load_lm("tiny-opt", tiny=TinySpec(seed=1))
    with pytest.raises(delta.DeltaMismatchError, match="embedding_sha256"):
        delta.load_delta(path, same_shape_other_weights)


def test_missing_or_foreign_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_delta"):
        delta.load_delta(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="course_delta.json"):
        delta.load_delta(tmp_path)
    with pytest.raises(TypeError, match="attach"):
        delta.save_delta(load_lm("tiny-opt")[0], tmp_path / "x")


def test_ask_interactive_and_command_line(tmp_path, capsys):
    model, tokenizer = load_lm("tiny-llama")
    peft_model = delta.attach(model, "lora")
    delta.train(peft_model, tokenizer, PAIRS, num_steps=30, lr=3e-2, batch_size=3, max_length=32, seed=1)
    assert delta.ask(peft_model, tokenizer, "What is the capital of France?").startswith("Paris")
    with pytest.raises(ValueError, match="empty question"):
        delta.ask(peft_model, tokenizer, "  ")

    typed = iter(["What is the capital of France?", "How many legs has a spider?", "quit", "never read"])
    shown: list[str] = []
    count = delta.interactive(peft_model, tokenizer, read=lambda _prompt: next(typed), write=shown.append)
    assert count == 2 and shown[1].startswith("answer: Paris") and shown[2].startswith("answer: eight")

    path = delta.save_delta(peft_model, tmp_path / "delta")
    assert delta.main(["ask", "--delta", str(path), "-q", "What is the capital of France?"]) == 0
    assert "A: Paris" in capsys.readouterr().out
    assert cli.run(delta.main, ["ask", "--delta", str(path), "--base", "tiny-opt", "-q", "x"]) == 2
    assert "made for backbone 'tiny-llama'" in capsys.readouterr().err


def _saved_delta(tmp_path, name="tiny-opt"):
    model, _ = load_lm(name)
    return delta.save_delta(delta.attach(model, "lora"), tmp_path / "delta")


def test_info_without_backbone_name_is_named_not_a_key_error(tmp_path):
    path = _saved_delta(tmp_path)
    info = json.loads((path / delta.DELTA_INFO_FILE).read_text())
    del info["backbone"]["name"]
    (path / delta.DELTA_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(delta.DeltaMismatchError, match="does not say which backbone.*missing name"):
        delta.load_delta(path)


def test_damaged_info_file_names_the_file(tmp_path):
    path = _saved_delta(tmp_path)
    (path / delta.DELTA_INFO_FILE).write_text('{"backbone": {"name": "tiny-')
    with pytest.raises(delta.DeltaMismatchError, match="course_delta.json is damaged"):
        delta.load_delta(path)


def test_missing_adapter_weights_are_named_not_a_hub_error(tmp_path):
    path = _saved_delta(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks adapter_model.safetensors.*incomplete"):
        delta.load_delta(path)


def test_a_file_instead_of_a_folder(tmp_path):
    text = tmp_path / "delta.txt"
    text.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        delta.load_delta(text)


def test_command_line_prints_one_error_line_and_exits_2(tmp_path, capsys):
    assert cli.run(delta.main, ["ask", "--delta", str(tmp_path / "nothing"), "-q", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no delta checkpoint folder") and err.count("\n") == 1
    with pytest.raises(FileNotFoundError):
        cli.run(delta.main, ["ask", "--delta", str(tmp_path / "nothing"), "-q", "x", "--debug"])


@pytest.mark.parametrize("name", ARCHS)
def test_a_delta_with_a_new_token_reloads_with_its_tokenizer(name, tmp_path):
    model, tokenizer = load_lm(name)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    model.resize_token_embeddings(len(tokenizer))
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    peft_model = delta.attach(model, "lora", trainable_token_indices=[sep])
    delta.train(peft_model, tokenizer, [(p + " <sep>", t) for p, t in PAIRS], num_steps=3, lr=1e-2,
                batch_size=3, max_length=32)
    path = delta.save_delta(peft_model, tmp_path / "delta", tokenizer=tokenizer)
    reloaded = delta.load_delta(path)  # a fresh backbone with the original vocabulary
    reloaded_tokenizer = delta.load_delta_tokenizer(path)
    assert reloaded_tokenizer.convert_tokens_to_ids("<sep>") == sep
    prompts = [p + " <sep>" for p, _ in PAIRS]
    assert torch.equal(_logits(peft_model, tokenizer, prompts), _logits(reloaded, reloaded_tokenizer, prompts))
