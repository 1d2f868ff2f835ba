"""Entry points: import OpenPrompt or OpenDelta (or a submodule) with every patch applied; quiet their logs."""

from __future__ import annotations

import importlib
import logging
import types

from .imports import apply_import_patches
from .runtime import apply_runtime_patches


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
