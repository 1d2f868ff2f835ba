"""Shared fixtures: tiny models of both architectures, and an isolated course cache."""

import pytest

from companion.models import load_lm


@pytest.fixture(params=["tiny-opt", "tiny-llama"])
def tiny_lm(request):
    """(model, tokenizer) for each tiny architecture; tests using it run once per architecture."""
    return load_lm(request.param)


@pytest.fixture
def course_cache(tmp_path, monkeypatch):
    """Point the course cache at a fresh temporary folder for one test."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
