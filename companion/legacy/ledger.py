"""The record of the patches applied in this process (name -> reason), for the notebook to show."""

from __future__ import annotations

_applied: dict[str, str] = {}


def _note(name: str, reason: str) -> None:
    _applied[name] = reason


def applied_patches() -> dict[str, str]:
    """Patches applied so far in this process: name -> reason."""
    return dict(_applied)
