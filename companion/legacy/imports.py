"""Patches needed before ``import opendelta`` / ``import openprompt``: moved, renamed or removed names."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from .ledger import _note, applied_patches


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
