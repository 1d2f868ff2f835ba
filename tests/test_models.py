import pytest
import torch

from companion import arch
from companion.models import ModelNotAvailableError, load_lm, parameter_count


def test_tiny_models_are_deterministic_and_padded_left(tiny_lm):
    model, tokenizer = tiny_lm
    again, _ = load_lm(model.config.name_or_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer("Hello world").input_ids == [15496, 995]  # the real GPT-2 BPE


def test_tiny_models_have_their_architecture():
    opt, _ = load_lm("tiny-opt")
    llama, _ = load_lm("tiny-llama")
    assert opt.model.decoder.layers is arch.decoder_layers(opt)
    assert llama.model.layers is arch.decoder_layers(llama)
    assert arch.num_layers(opt) == arch.num_layers(llama) == 4


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelNotAvailableError, match="known: smollm2-135m, tiny-opt, tiny-llama"):
        load_lm("gpt-2-tiny")


def test_offline_hub_id_names_the_default(monkeypatch):
    monkeypatch.setattr("companion.models.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotAvailableError, match="COURSE_MODEL=smollm2-135m"):
        load_lm("facebook/opt-125m-not-cached-here")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="not a saved model"):
        load_lm(str(tmp_path))


def test_saved_tiny_model_reloads_from_a_folder(tmp_path):
    model, tokenizer = load_lm("tiny-opt")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, _ = load_lm(str(tmp_path))
    ids = tokenizer("a short test", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_parameter_count_counts_tied_weights_once():
    model, _ = load_lm("tiny-llama")  # ties input and output embeddings
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    assert parameter_count(model, trainable_only=True) == model.lm_head.weight.numel()
