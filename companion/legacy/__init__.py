"""Makes OpenDelta 0.3.2 and OpenPrompt 1.0.1 (the original tutorial's libraries) run today.

Both libraries were written for transformers 4.1x. On transformers 5 they fail at import
(modules moved or removed) and at run time (fast tokenizers and ``GenerationMixin``
changed). This package patches exactly those places, each patch:

- applied only when its symptom is present (a missing name, a probe that fails), so the
  package is harmless on versions where the libraries work as published;
- commented with the reason, and listed by ``applied_patches()`` for the notebook to show;
- written here, never copied from either library.

Use ``openprompt_module(name)`` / ``opendelta_module(name)`` instead of importing the
libraries directly: they apply the patches first. ``plm_for(model, tokenizer)`` returns
what OpenPrompt's ``load_plm`` returns, through ``load_plm`` itself for the families it
knows (OPT) and assembled for causal LMs it has no entry for (Llama).

- ``imports``: the patches needed before import; ``runtime``: those of OpenPrompt's classes;
  ``tokenizer``: ``patch_tokenizer``; ``ledger``: ``applied_patches``;
- ``modules``: ``openprompt_module``, ``opendelta_module``, ``quiet_logs``;
- ``plms``: ``plm_for`` and ``save_for_load_plm``.

Everything public is re-exported here: use ``companion.legacy``.
"""

from .ledger import applied_patches
from .imports import apply_import_patches
from .tokenizer import patch_tokenizer
from .runtime import apply_runtime_patches
from .modules import opendelta_module, openprompt_module, quiet_logs
from .plms import plm_for, save_for_load_plm

__all__ = [
    "applied_patches", "apply_import_patches", "apply_runtime_patches", "opendelta_module", "openprompt_module",
    "patch_tokenizer", "plm_for", "quiet_logs", "save_for_load_plm",
]
