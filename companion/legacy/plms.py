"""``plm_for``: what OpenPrompt's ``load_plm`` returns (through ``load_plm`` for OPT and GPT-2, assembled for Llama)."""

from __future__ import annotations

from pathlib import Path

from .modules import openprompt_module
from .tokenizer import patch_tokenizer

# model_type -> the key openprompt's load_plm table uses for that family
_LOAD_PLM_FAMILIES = {"opt": "opt", "gpt2": "gpt2"}


def plm_for(model, tokenizer, folder: str | Path | None = None):
    """What ``openprompt.plms.load_plm`` returns (plm, tokenizer, config, wrapper class).

    For a family ``load_plm`` knows (OPT, GPT-2) the model is saved to ``folder`` (default:
    the course cache) and loaded back with ``load_plm`` itself, exactly as the tutorial
    did; note that this returns new objects. For other causal LMs (SmolLM2 is a Llama,
    which ``load_plm``'s table lacks) the four objects are assembled from the loaded model:
    every causal LM goes through the same ``LMTokenizerWrapper``.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError("plm_for is for decoder-only transformers causal LMs")
    plms = openprompt_module("openprompt.plms")
    family = _LOAD_PLM_FAMILIES.get(config.model_type)
    if family is not None:
        if folder is None:
            from ..config import cache_path

            from ..models import model_slug

            folder = cache_path("openprompt_plms", model_slug(str(config.name_or_path or family)))
        save_for_load_plm(model, tokenizer, folder)
        from ..models import quiet_loading

        with quiet_loading():
            plm, loaded_tokenizer, plm_config, wrapper = plms.load_plm(family, str(folder))
        plm.eval()
        return plm, patch_tokenizer(loaded_tokenizer), plm_config, wrapper
    return model, patch_tokenizer(tokenizer), config, plms.LMTokenizerWrapper


def save_for_load_plm(model, tokenizer, folder: str | Path) -> Path:
    """Save a model and tokenizer where ``load_plm(family, folder)`` can load them."""
    from ..models import quiet_loading

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
