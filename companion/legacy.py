"""Makes OpenDelta 0.3.2 and OpenPrompt 1.0.1 (the original tutorial's libraries) run today.

Both libraries were written for transformers 4.1x. On transformers 5 they fail at import
(modules moved or removed) and at run time (fast tokenizers and ``GenerationMixin``
changed). This module patches exactly those places, each patch:

- applied only when its symptom is present (a missing name, a probe that fails), so the
  module is harmless on versions where the libraries work as published;
- commented with the reason, and listed by ``applied_patches()`` for the notebook to show;
- written here, never copied from either library.

Use ``openprompt_module(name)`` / ``opendelta_module(name)`` instead of importing the
libraries directly: they apply the patches first. ``plm_for(model, tokenizer)`` returns
what OpenPrompt's ``load_plm`` returns, through ``load_plm`` itself for the families it
knows (OPT) and assembled for causal LMs it has no entry for (Llama).
"""

from __future__ import annotations

import copy
import dis
import importlib
import importlib.util
import inspect
import logging
import sys
import types
from pathlib import Path

_applied: dict[str, str] = {}


def _note(name: str, reason: str) -> None:
    _applied[name] = reason


def applied_patches() -> dict[str, str]:
    """Patches applied so far in this process: name -> reason."""
    return dict(_applied)


def _missing(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is None
    except (ImportError, ValueError):
        return True


def _stub_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__course_stub__ = True
    sys.modules[name] = module
    return module


# --- at import ------------------------------------------------------------------------------


def apply_import_patches() -> dict[str, str]:
    """Patches needed before ``import opendelta`` / ``import openprompt``; idempotent."""
    import torch

    # Trap: in transformers 5 the first import of processing_utils re-executes the package
    # __init__ and replaces sys.modules["transformers"], dropping attributes set on the old
    # module object. Import it first so that the attributes set below stay.
    importlib.import_module("transformers.processing_utils")
    import transformers

    # opendelta imports a client for its online "delta center" at import time; it is only
    # used to push/pull deltas from that hub, which the course never does.
    if _missing("DeltaCenter"):
        _stub_module("DeltaCenter", OssClient=None)
        _note("DeltaCenter stub", "opendelta imports a delta-hub client it only needs for uploads")

    # opendelta imports `web` (web.py) for its optional interactive module picker
    # (interactive_modify=True), which the course never uses.
    if _missing("web"):
        def needs_web_py(*args, **kwargs):
            raise ImportError("opendelta's interactive_modify needs web.py: pip install web.py")

        class Application:
            """Stands for web.application: built at import by opendelta, never served."""

            def __init__(self, *args, **kwargs):
                pass

            run = wsgifunc = needs_web_py

        _stub_module(
            "web",
            application=Application,
            template=types.SimpleNamespace(render=lambda *args, **kwargs: None),
            httpserver=types.SimpleNamespace(runsimple=needs_web_py),
            input=needs_web_py,
        )
        _note("web stub", "opendelta's optional browser-based module picker needs web.py")

    # transformers.deepspeed moved to transformers.integrations.deepspeed.
    if _missing("transformers.deepspeed"):
        sys.modules["transformers.deepspeed"] = importlib.import_module("transformers.integrations.deepspeed")
        _note("transformers.deepspeed alias", "module moved to transformers.integrations.deepspeed")

    # DistilBERT's attention class was renamed; opendelta's prefix module names it.
    distilbert = importlib.import_module("transformers.models.distilbert.modeling_distilbert")
    if not hasattr(distilbert, "MultiHeadSelfAttention"):
        renamed = getattr(distilbert, "DistilBertSelfAttention", None)
        if renamed is not None:
            distilbert.MultiHeadSelfAttention = renamed
            _note("DistilBERT MultiHeadSelfAttention", "class renamed DistilBertSelfAttention")

    # transformers.generation_utils moved to transformers.generation.utils.
    if _missing("transformers.generation_utils"):
        sys.modules["transformers.generation_utils"] = importlib.import_module("transformers.generation.utils")
        _note("transformers.generation_utils alias", "module moved to transformers.generation.utils")

    # The SPECIAL_TOKENS_MAP_FILE constant was removed; openprompt only imports it.
    tokenization_utils = importlib.import_module("transformers.tokenization_utils")
    if not hasattr(tokenization_utils, "SPECIAL_TOKENS_MAP_FILE"):
        tokenization_utils.SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
        _note("SPECIAL_TOKENS_MAP_FILE", "constant removed from transformers.tokenization_utils")

    # transformers.data.processors (GLUE-era helpers) was removed; openprompt imports its
    # InputExample/InputFeatures for type annotations only.
    if _missing("transformers.data.processors"):
        class _RemovedInTransformers5:  # noqa: N801 - annotation placeholder only
            """Placeholder for a transformers class openprompt names only in annotations."""

        processors = _stub_module("transformers.data.processors")
        utils = _stub_module(
            "transformers.data.processors.utils",
            InputExample=_RemovedInTransformers5,
            InputFeatures=_RemovedInTransformers5,
        )
        processors.utils = utils
        _note("transformers.data.processors stub", "removed; openprompt uses its names as annotations")

    # transformers.AdamW was removed in favour of torch.optim.AdamW.
    if not hasattr(transformers, "AdamW"):
        transformers.AdamW = torch.optim.AdamW
        _note("transformers.AdamW", "removed; torch.optim.AdamW is the same optimiser")
    return applied_patches()


# --- at run time ------------------------------------------------------------------------------


def _affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text, as it is configured."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def patch_tokenizer(tokenizer):
    """Give a transformers-5 fast tokenizer the two methods OpenPrompt's wrappers call.

    ``build_inputs_with_special_tokens`` is gone from fast tokenizers and
    ``get_special_tokens_mask`` raises for raw ids; both are rebuilt from the affixes the
    tokenizer itself adds (e.g. OPT's leading ``</s>``; none for GPT-2 or SmolLM2).
    """
    needs_build = not callable(getattr(tokenizer, "build_inputs_with_special_tokens", None))
    try:
        tokenizer.get_special_tokens_mask([0])
        needs_mask = False
    except (NotImplementedError, AttributeError):
        needs_mask = True
    if not (needs_build or needs_mask):
        return tokenizer

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        prefix, suffix = _affixes(self)
        ids = prefix + list(token_ids_0) + suffix
        return ids if token_ids_1 is None else ids + prefix + list(token_ids_1) + suffix

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(int(t) in special) for t in token_ids_0]
        prefix, suffix = _affixes(self)
        mask = [1] * len(prefix) + [0] * len(token_ids_0) + [1] * len(suffix)
        if token_ids_1 is not None:
            mask += [1] * len(prefix) + [0] * len(token_ids_1) + [1] * len(suffix)
        return mask

    if needs_build:
        tokenizer.build_inputs_with_special_tokens = types.MethodType(build_inputs_with_special_tokens, tokenizer)
    if needs_mask:
        tokenizer.get_special_tokens_mask = types.MethodType(get_special_tokens_mask, tokenizer)
    _note("tokenizer special-token methods", "fast tokenizers in transformers 5 lack what PromptDataLoader calls")
    return tokenizer


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


# --- entry points -----------------------------------------------------------------------------


def openprompt_module(name: str = "openprompt") -> types.ModuleType:
    """Import ``name`` (``openprompt`` or a submodule) with every needed patch applied."""
    if not name.split(".")[0] == "openprompt":
        raise ValueError(f"{name!r} is not an openprompt module")
    apply_import_patches()
    module = importlib.import_module(name)
    apply_runtime_patches()
    return module


def opendelta_module(name: str = "opendelta") -> types.ModuleType:
    """Import ``name`` (``opendelta`` or a submodule) with every needed patch applied."""
    if not name.split(".")[0] == "opendelta":
        raise ValueError(f"{name!r} is not an opendelta module")
    apply_import_patches()
    return importlib.import_module(name)


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
            from .config import cache_path

            from .models import model_slug

            folder = cache_path("openprompt_plms", model_slug(str(config.name_or_path or family)))
        save_for_load_plm(model, tokenizer, folder)
        from .models import quiet_loading

        with quiet_loading():
            plm, loaded_tokenizer, plm_config, wrapper = plms.load_plm(family, str(folder))
        plm.eval()
        return plm, patch_tokenizer(loaded_tokenizer), plm_config, wrapper
    return model, patch_tokenizer(tokenizer), config, plms.LMTokenizerWrapper


def quiet_logs(level: int = logging.ERROR) -> None:
    """Silence OpenDelta's chatter and OpenPrompt's per-loader "tokenizing" bar.

    OpenDelta logs every config it builds at INFO level; its loggers are per module, each
    with its own level set at import, so every one of them is set here. OpenPrompt's
    ``PromptDataLoader`` draws a progress bar on stderr for every loader it builds (a
    fraction of a second of work each), which would fill a notebook with stderr blocks.
    """
    import functools

    opendelta_module()
    for name in list(logging.root.manager.loggerDict):
        if name == "opendelta" or name.startswith("opendelta."):
            logging.getLogger(name).setLevel(level)
    pipeline = openprompt_module("openprompt.pipeline_base")
    if not isinstance(pipeline.tqdm, functools.partial):
        pipeline.tqdm = functools.partial(pipeline.tqdm, disable=True)


def save_for_load_plm(model, tokenizer, folder: str | Path) -> Path:
    """Save a model and tokenizer where ``load_plm(family, folder)`` can load them."""
    from .models import quiet_loading

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_loading():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
