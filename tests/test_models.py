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


def test_model_name_and_slug_are_one_rule(tiny_lm):
    from companion.models import model_name, model_slug

    model, _ = tiny_lm
    assert model_name(model) in ("tiny-opt", "tiny-llama")
    assert model_slug(model) == model_name(model)
    assert model_slug("facebook/opt-125m") == "facebook--opt-125m"
    assert model_slug("/home/me/models/my model/") == "my-model"


def test_padding_side_is_restored_even_after_an_error(tiny_lm):
    from companion.models import padding_side

    _, tokenizer = tiny_lm
    before = tokenizer.padding_side
    with pytest.raises(RuntimeError):
        with padding_side(tokenizer, "right"):
            assert tokenizer.padding_side == "right"
            raise RuntimeError("boom")
    assert tokenizer.padding_side == before
    with pytest.raises(ValueError, match="'left' or 'right'"):
        with padding_side(tokenizer, "middle"):
            pass


def test_bad_local_paths_say_what_is_wrong(tmp_path):
    from companion.models import ModelNotAvailableError, load_lm

    with pytest.raises(ModelNotAvailableError, match="looks like a local path but there is nothing there"):
        load_lm(str(tmp_path / "no-such-model"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelNotAvailableError, match="is a file, not a model folder"):
        load_lm(str(text))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelNotAvailableError, match="config.json is damaged"):
        load_lm(str(broken))


def test_the_gguf_conversion_bar_is_a_text_bar_on_stdout(capsys):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from companion.models import text_bar_for_gguf

    original = gguf_utils.tqdm
    with text_bar_for_gguf():
        assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert gguf_utils.tqdm is original
    captured = capsys.readouterr()
    assert "Converting and de-quantizing GGUF tensors: 100%|" in captured.out and "3/3" in captured.out
    assert captured.err == ""
