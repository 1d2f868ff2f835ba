import pytest
import torch

from companion import arch


def test_pruned_model_keeps_hidden_states_of_kept_layers(tiny_lm):
    model, tokenizer = tiny_lm
    batch = tokenizer(["the cat sat on the mat", "hi"], return_tensors="pt", padding=True)
    full = arch.hidden_states_at_last_token(model, batch.input_ids, batch.attention_mask)
    pruned = arch.keep_first_layers(model, 2)
    kept = arch.hidden_states_at_last_token(pruned, batch.input_ids, batch.attention_mask)
    assert full.shape == (4, 2, arch.hidden_size(model)) and kept.shape[0] == 2
    assert torch.equal(full[:2], kept)
    assert arch.num_layers(model) == 4, "pruning must not change the original"
    assert pruned.config.num_hidden_layers == 2
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_last_token_hidden_state_ignores_padding(tiny_lm):
    model, tokenizer = tiny_lm
    alone = tokenizer(["hi"], return_tensors="pt")
    padded = tokenizer(["the cat sat on the mat", "hi"], return_tensors="pt", padding=True)
    a = arch.hidden_states_at_last_token(model, alone.input_ids, alone.attention_mask)[:, 0]
    b = arch.hidden_states_at_last_token(model, padded.input_ids, padded.attention_mask)[:, 1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_block_outputs_match_transformers_hidden_states_below_the_top(tiny_lm):
    model, tokenizer = tiny_lm
    batch = tokenizer(["one two three"], return_tensors="pt")
    ours = arch.hidden_states_at_last_token(model, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        theirs = model(**batch, output_hidden_states=True).hidden_states
    for i in range(arch.num_layers(model) - 1):  # the top entry of theirs is final-normed
        torch.testing.assert_close(ours[i, 0], theirs[i + 1][0, -1])


def test_targets_and_bad_depth(tiny_lm):
    model, _ = tiny_lm
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(arch.lora_target_modules(model)) <= names
    assert set(arch.mlp_target_modules(model)) <= names
    with pytest.raises(ValueError, match="between 1 and 4"):
        arch.keep_first_layers(model, 0)
