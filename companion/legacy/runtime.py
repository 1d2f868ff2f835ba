"""Patches of OpenPrompt's classes (``PromptForGeneration``, its tokenizer wrapper), applied after import."""

from __future__ import annotations

import copy
import dis
import importlib
import inspect
import types

from .ledger import _note, applied_patches
from .tokenizer import patch_tokenizer


def _generation_needs_pretrained_model_methods(cls) -> bool:
    """Whether GenerationMixin calls methods that only PreTrainedModel has and ``cls`` lacks."""
    from torch import nn
    from transformers import PreTrainedModel
    from transformers.generation.utils import GenerationMixin

    called: set[str] = set()
    for value in vars(GenerationMixin).values():
        code = getattr(value, "__code__", None)
        if code is not None:
            called.update(i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_ATTR", "LOAD_METHOD"))
    only_in_pretrained = {
        name for name in called
        if hasattr(PreTrainedModel, name) and not hasattr(GenerationMixin, name) and not hasattr(nn.Module, name)
    }
    return any(not hasattr(cls, name) for name in only_in_pretrained)


def apply_runtime_patches() -> dict[str, str]:
    """Patches of OpenPrompt's classes, applied after it is imported; idempotent."""
    from torch import nn
    from transformers.generation.utils import GenerationMixin
    from transformers.utils import logging as hf_logging

    pipeline = importlib.import_module("openprompt.pipeline_base")
    data_utils = importlib.import_module("openprompt.data_utils")
    plm_utils = importlib.import_module("openprompt.plms.utils")
    PromptForGeneration = pipeline.PromptForGeneration

    # Fast tokenizers lack build_inputs_with_special_tokens: patch every tokenizer handed
    # to an OpenPrompt tokenizer wrapper (the PromptDataLoader path).
    wrapper_cls = plm_utils.TokenizerWrapper
    if not getattr(wrapper_cls.__init__, "__course_patched__", False):
        original_init = wrapper_cls.__init__

        def init_with_patched_tokenizer(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            patch_tokenizer(self.tokenizer)

        init_with_patched_tokenizer.__course_patched__ = True
        wrapper_cls.__init__ = init_with_patched_tokenizer

    if getattr(PromptForGeneration, "__course_patched__", False):
        return applied_patches()

    # generate() checks its kwargs against the model's forward/prepare signatures;
    # PromptForGeneration takes a whole batch (attention_mask, loss_ids, ...) through
    # **kwargs, which the newer check rejects. Probe the check with such a batch.
    validate = getattr(GenerationMixin, "_validate_model_kwargs", None)
    if validate is not None:
        probe = types.SimpleNamespace(
            config=types.SimpleNamespace(is_encoder_decoder=False),
            prepare_inputs_for_generation=PromptForGeneration.prepare_inputs_for_generation,
            forward=PromptForGeneration.forward,
        )
        try:
            validate(probe, {"attention_mask": 1, "loss_ids": 1})
        except ValueError:
            PromptForGeneration._validate_model_kwargs = lambda self, model_kwargs: None
            _note("skip generate kwargs check", "OpenPrompt passes its batch fields through generate()")

    # GenerationMixin now calls PreTrainedModel methods (e.g. get_experts_implementation)
    # that PromptForGeneration, a plain nn.Module, lacks: look them up on the wrapped plm.
    if _generation_needs_pretrained_model_methods(PromptForGeneration):
        def __getattr__(self, name):  # noqa: N807
            try:
                return nn.Module.__getattr__(self, name)
            except AttributeError:
                prompt_model = self.__dict__.get("_modules", {}).get("prompt_model")
                if prompt_model is None or name.startswith("__"):
                    raise
                return getattr(prompt_model.plm, name)

        PromptForGeneration.__getattr__ = __getattr__
        _note("fall back to plm attributes", "GenerationMixin now calls PreTrainedModel methods")

    # OpenPrompt calls GenerationMixin._update_model_kwargs_for_generation unbound, as when
    # it was a staticmethod; it is an instance method now. Same behaviour, bound call.
    static = inspect.getattr_static(GenerationMixin, "_update_model_kwargs_for_generation", None)
    if static is not None and not isinstance(static, staticmethod):
        def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, **kwargs):
            if self.generate_ith_token == 0:
                # the first step's inputs were rebuilt by the template: carry them on
                for key, value in self.last_model_inputs.items():
                    if key in model_kwargs:
                        model_kwargs[key] = value
            model_kwargs = GenerationMixin._update_model_kwargs_for_generation(
                self, outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, **kwargs
            )
            self.generate_ith_token += 1
            return model_kwargs

        PromptForGeneration._update_model_kwargs_for_generation = _update_model_kwargs_for_generation
        _note("bound _update_model_kwargs_for_generation", "no longer a staticmethod in GenerationMixin")

    # OpenPrompt forwards only kwargs named in GenerationMixin.generate's signature; options
    # such as max_new_tokens now live in **kwargs and would be dropped silently. Fold them
    # into a GenerationConfig, which generate() does name.
    named = _named_parameters(GenerationMixin.generate)
    if "max_new_tokens" not in named and "generation_config" in named:
        original_generate = PromptForGeneration.generate

        def generate(self, batch, verbose=False, **generation_kwargs):
            extra = {k: v for k, v in generation_kwargs.items() if k not in named}
            if not extra:
                return original_generate(self, batch, verbose, **generation_kwargs)
            base = generation_kwargs.pop("generation_config", None) or self.plm.generation_config
            config = copy.deepcopy(base)
            unused = config.update(**extra)
            if unused:
                raise TypeError(f"unknown generation options {sorted(unused)}")
            generation_kwargs = {k: v for k, v in generation_kwargs.items() if k in named}
            generation_kwargs["generation_config"] = config
            # OpenPrompt itself adds pad/eos ids next to our config, which transformers
            # reports as deprecated: a note about OpenPrompt's call, not the reader's.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                return original_generate(self, batch, verbose, **generation_kwargs)
            finally:
                hf_logging.set_verbosity(verbosity)

        PromptForGeneration.generate = generate
        _note("fold generate options into GenerationConfig", "options like max_new_tokens moved to **kwargs")

    # At the first generated token OpenPrompt packs every generate() kwarg into an
    # InputFeatures, then keeps only the plm's forward arguments. transformers 5 adds
    # bookkeeping kwargs (is_first_iteration, next_sequence_length) that InputFeatures does
    # not know and warns about, once per token and example; they would be dropped anyway,
    # so drop them first. Later tokens go through the plm's own preparation, untouched.
    # (The wrapper only acts, and is only listed as applied, when such kwargs show up.)
    known = _named_parameters(data_utils.InputFeatures.__init__)
    original_prepare = PromptForGeneration.prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, input_ids=None, **model_kwargs):
        if self.generate_ith_token == 0 and "encoder_outputs" not in model_kwargs:
            unknown = [key for key in model_kwargs if key not in known]
            for key in unknown:
                model_kwargs.pop(key)
            if unknown:
                _note("drop first-token kwargs InputFeatures ignores", f"generate() now passes {sorted(unknown)}")
        return original_prepare(self, input_ids, **model_kwargs)

    PromptForGeneration.prepare_inputs_for_generation = prepare_inputs_for_generation

    # Beam search reorders the cache through model._reorder_cache; OpenPrompt forwards to
    # the plm's, which transformers 5 models no longer have (Cache objects reorder themselves).
    def _reorder_cache(self, past, beam_idx):
        if hasattr(self.plm, "_reorder_cache"):
            return self.plm._reorder_cache(past, beam_idx)
        past.reorder_cache(beam_idx)
        return past

    if _plm_classes_lack("_reorder_cache"):
        PromptForGeneration._reorder_cache = _reorder_cache
        _note("_reorder_cache via Cache.reorder_cache", "moved from models onto Cache objects")

    PromptForGeneration.__course_patched__ = True
    return applied_patches()


def _named_parameters(function) -> set[str]:
    return {
        p.name for p in inspect.signature(function).parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    }


def _plm_classes_lack(name: str) -> bool:
    from transformers import LlamaForCausalLM, OPTForCausalLM

    return not (hasattr(OPTForCausalLM, name) and hasattr(LlamaForCausalLM, name))
