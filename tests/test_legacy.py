"""companion.legacy: the classic OpenPrompt + OpenDelta recipe runs on transformers 5 (tiny models)."""

from __future__ import annotations

import logging

import pytest
import torch

from companion import delta, legacy, prompting
from companion.models import gpt2_tokenizer, load_lm

ROWS = [
    {"id": "0", "question": "What is the capital of France?", "answer": "Paris"},
    {"id": "1", "question": "How many legs has a spider?", "answer": "eight"},
    {"id": "2", "question": "What gas do plants absorb?", "answer": "carbon dioxide"},
]
LORA = {"delta_type": "lora", "modified_modules": ["q_proj", "v_proj"], "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}

openprompt = legacy.openprompt_module("openprompt")
opendelta = legacy.opendelta_module("opendelta")
from openprompt import PromptDataLoader, PromptForClassification, PromptForGeneration  # noqa: E402
from openprompt.plms import load_plm  # noqa: E402
from openprompt.prompts import ManualTemplate  # noqa: E402
from opendelta import AutoDeltaConfig, AutoDeltaModel  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_opendelta():
    legacy.quiet_logs()
    assert logging.getLogger("opendelta.delta_configs").level == logging.ERROR


def _plm(name, tmp_path):
    """The classic loader for OPT (load_plm from a saved folder), plm_for for Llama."""
    model, tokenizer = load_lm(name)
    if name == "tiny-opt":
        folder = legacy.save_for_load_plm(model, tokenizer, tmp_path / "opt")
        return load_plm("opt", str(folder))
    return legacy.plm_for(model, tokenizer)


def _fresh_backbone(name, tmp_path):
    return load_plm("opt", str(tmp_path / "opt"))[0] if name == "tiny-opt" else load_lm(name)[0]


def _loader(template, tokenizer, wrapper, *, train, batch_size=3):
    return PromptDataLoader(
        dataset=prompting.input_examples(ROWS), template=template, tokenizer=tokenizer,
        tokenizer_wrapper_class=wrapper, max_seq_length=32, decoder_max_length=32,
        batch_size=batch_size, shuffle=False, teacher_forcing=train, predict_eos_token=True,
        truncate_method="head",
    )


def test_import_patches_are_recorded_with_reasons_and_idempotent():
    patches = legacy.applied_patches()
    for name in ("DeltaCenter stub", "transformers.generation_utils alias", "transformers.AdamW"):
        assert name in patches and patches[name]
    assert legacy.apply_import_patches() == legacy.apply_runtime_patches() == legacy.applied_patches()
    with pytest.raises(ValueError, match="not an openprompt module"):
        legacy.openprompt_module("opendelta")


def test_patched_tokenizer_adds_the_configured_affixes():
    plain = legacy.patch_tokenizer(gpt2_tokenizer())
    assert plain.build_inputs_with_special_tokens([11, 12]) == [11, 12]
    assert plain.get_special_tokens_mask([11, 12]) == [0, 0]
    with_bos = gpt2_tokenizer()
    with_bos.add_bos_token = True  # like OPT's tokenizer, which starts every text with </s>
    legacy.patch_tokenizer(with_bos)
    bos = with_bos.bos_token_id
    assert with_bos.build_inputs_with_special_tokens([11, 12]) == [bos, 11, 12]
    assert with_bos.get_special_tokens_mask([11, 12]) == [1, 0, 0]
    assert with_bos.get_special_tokens_mask([bos, 11], already_has_special_tokens=True) == [1, 0]


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_classic_recipe_trains_saves_reloads_with_identical_logits(name, tmp_path):
    torch.manual_seed(0)
    plm, tokenizer, _config, wrapper = _plm(name, tmp_path)
    template = ManualTemplate(tokenizer=tokenizer, text=prompting.OPENPROMPT_QA_TEMPLATE)
    delta_model = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(dict(LORA)), backbone_model=plm)
    delta_model.freeze_module(exclude=["deltas"], set_state_dict=True)
    trainable = {n: p.detach().clone() for n, p in plm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)

    model = PromptForGeneration(plm=plm, template=template, freeze_plm=False, tokenizer=tokenizer)
    result = prompting.train_prompt_model(model, _loader(template, tokenizer, wrapper, train=True), num_steps=4, lr=1e-2)
    assert len(result["losses"]) == 4 and result["tokens"] > 0
    assert any(not torch.equal(p, trainable[n]) for n, p in plm.named_parameters() if p.requires_grad)

    delta_model.save_finetuned(str(tmp_path / "delta"))
    saved = torch.load(tmp_path / "delta" / "pytorch_model.bin")
    assert set(saved) == set(trainable)  # only the delta is saved, not the backbone

    fresh = _fresh_backbone(name, tmp_path)
    AutoDeltaModel.from_finetuned(str(tmp_path / "delta"), backbone_model=fresh)
    reloaded = PromptForGeneration(plm=fresh, template=template, freeze_plm=True, tokenizer=tokenizer)
    batch = next(iter(_loader(template, tokenizer, wrapper, train=False)))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.prompt_model(batch).logits, reloaded.prompt_model(batch).logits)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_prompt_for_generation_matches_plain_generate(name, tmp_path, caplog):
    plm, tokenizer, _config, wrapper = _plm(name, tmp_path)
    template = ManualTemplate(tokenizer=tokenizer, text=prompting.OPENPROMPT_QA_TEMPLATE)
    model = PromptForGeneration(plm=plm, template=template, tokenizer=tokenizer).eval()
    batch = next(iter(_loader(template, tokenizer, wrapper, train=False, batch_size=1)))
    # min_new_tokens = max_new_tokens: 3 tokens exactly, so the options really reach generate()
    with caplog.at_level(logging.WARNING):
        sequences, _texts = model.generate(batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert not [r for r in caplog.records if "unexpected key words" in r.getMessage()]
    prompt = batch["input_ids"][:, : int(batch["input_ids_len"][0])]
    expected = plm.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, min_new_tokens=3,
        do_sample=False, pad_token_id=tokenizer.pad_token_id,
    )
    assert sequences == expected.tolist()
    beams, _ = model.generate(batch, max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False)
    assert len(beams[0]) == prompt.shape[1] + 3
    with pytest.raises(TypeError, match="unknown generation options"):
        model.generate(batch, max_new_tokens=2, beam_wdith=2)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_peft_and_opendelta_lora_are_the_same_function(name):
    backbone_a, tokenizer = load_lm(name)
    backbone_b, _ = load_lm(name)
    AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(dict(LORA)), backbone_model=backbone_a).freeze_module(
        exclude=["deltas"], set_state_dict=True
    )
    peft_model = delta.attach(backbone_b, "lora", r=8, lora_alpha=16)
    opendelta_count = sum(p.numel() for p in backbone_a.parameters() if p.requires_grad)
    assert opendelta_count == delta.trainable_parameters(peft_model) > 0

    # give both the same non-zero LoRA weights: the outputs must then agree
    peft_weights = dict(peft_model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for od_name, parameter in backbone_a.named_parameters():
            if ".lora.lora_" not in od_name:
                continue
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
            module, which = od_name.split(".lora.lora_")
            peft_weights[f"base_model.model.{module}.lora_{which}.default.weight"].copy_(parameter)
    inputs = tokenizer(["Question: What is the capital of France?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        a, b = backbone_a(**inputs).logits, peft_model(**inputs).logits
        untouched = load_lm(name)[0](**inputs).logits
    assert not torch.allclose(a, untouched, atol=1e-4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_prompt_for_classification_with_manual_verbalizer_learns(name, tmp_path):
    plm, tokenizer, _config, wrapper = _plm(name, tmp_path)
    labels = ["negative", "neutral", "positive"]
    rows = [
        {"text": "I hate this, awful service", "label": "negative"},
        {"text": "The flight leaves at noon", "label": "neutral"},
        {"text": "Love it, great crew", "label": "positive"},
    ] * 2
    template = ManualTemplate(tokenizer=tokenizer, text=prompting.OPENPROMPT_SENTIMENT_TEMPLATE)
    verbalizer = prompting.openprompt_sentiment_verbalizer(tokenizer, labels)
    AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(dict(LORA)), backbone_model=plm).freeze_module(
        exclude=["deltas"], set_state_dict=True
    )
    model = PromptForClassification(plm=plm, template=template, verbalizer=verbalizer, freeze_plm=False)
    loader = PromptDataLoader(
        dataset=prompting.input_examples(rows, labels), template=template, tokenizer=tokenizer,
        tokenizer_wrapper_class=wrapper, max_seq_length=32, batch_size=3, shuffle=False,
    )
    result = prompting.train_prompt_model(model, loader, num_steps=24, lr=3e-2)
    assert sum(result["losses"][-3:]) / 3 < result["losses"][0] - 0.3
    assert prompting.classify_accuracy(model, loader) == 1.0


def test_plm_for_uses_load_plm_for_opt_and_assembles_llama(tmp_path):
    model, tokenizer = load_lm("tiny-opt")
    plm, plm_tokenizer, config, wrapper = legacy.plm_for(model, tokenizer, tmp_path / "saved")
    assert plm is not model and (tmp_path / "saved" / "config.json").exists()  # went through load_plm
    assert wrapper.__name__ == "LMTokenizerWrapper" and config.model_type == "opt"
    inputs = tokenizer(["Question: Why?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(plm(**inputs).logits, model(**inputs).logits)
    llama, llama_tokenizer = load_lm("tiny-llama")
    assert legacy.plm_for(llama, llama_tokenizer)[0] is llama
    with pytest.raises(ValueError, match="decoder-only"):
        legacy.plm_for(torch.nn.Linear(2, 2), tokenizer)


def test_multi_token_label_words_are_refused():
    tokenizer = gpt2_tokenizer()
    with pytest.raises(ValueError, match="single tokens"):
        prompting.openprompt_sentiment_verbalizer(tokenizer, ["negative", "positive"], {"negative": ["zxqvbnm"], "positive": ["good"]})
    with pytest.raises(ValueError, match="no label words"):
        prompting.openprompt_sentiment_verbalizer(tokenizer, ["negative", "sarcastic"])
