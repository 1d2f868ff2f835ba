import pytest
import torch

from companion.config import get_settings, seed_everything


def test_defaults_and_overrides(monkeypatch):
    for name in ["COURSE_MODEL", "COURSE_FAST", "COURSE_SEED", "COURSE_THREADS", "CI"]:
        monkeypatch.delenv(name, raising=False)
    settings = get_settings()
    assert settings.model == "smollm2-135m"
    assert settings.fast is False and settings.size(full=100, fast=5) == 100
    monkeypatch.setenv("COURSE_FAST", "1")
    monkeypatch.setenv("COURSE_MODEL", "tiny-opt")
    settings = get_settings()
    assert settings.fast is True and settings.size(full=100, fast=5) == 5
    assert settings.model == "tiny-opt"


def test_ci_turns_fast_mode_on_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("COURSE_FAST", raising=False)
    monkeypatch.setenv("CI", "true")
    assert get_settings().fast is True
    monkeypatch.setenv("COURSE_FAST", "0")
    assert get_settings().fast is False


def test_bad_numbers_are_named(monkeypatch):
    monkeypatch.setenv("COURSE_SEED", "abc")
    try:
        get_settings()
    except ValueError as error:
        assert "COURSE_SEED" in str(error)
    else:
        raise AssertionError("a non-integer seed was accepted")


def test_same_seed_same_numbers():
    seed_everything(7)
    first = torch.randn(5)
    seed_everything(7)
    assert torch.equal(first, torch.randn(5))
    seed_everything(8)
    assert not torch.equal(first, torch.randn(5))


def test_fast_runs_keep_their_figures_apart(monkeypatch):
    from companion.config import figure_path

    monkeypatch.setenv("COURSE_FAST", "0")
    full = figure_path("x.png")
    monkeypatch.setenv("COURSE_FAST", "1")
    assert figure_path("x.png") == full.parent / "fast" / "x.png"


@pytest.mark.parametrize("value", ["maybe", "fast", "2"])
def test_unrecognised_fast_mode_is_an_error_not_full_mode(monkeypatch, value):
    monkeypatch.setenv("COURSE_FAST", value)
    with pytest.raises(ValueError, match="COURSE_FAST=.*use COURSE_FAST=1"):
        get_settings()


@pytest.mark.parametrize("value, fast", [("yes", True), ("OFF", False), (" 1 ", True), ("false", False)])
def test_fast_mode_words(monkeypatch, value, fast):
    monkeypatch.setenv("COURSE_FAST", value)
    assert get_settings().fast is fast


@pytest.mark.parametrize("value", ["-1", str(2**64)])
def test_out_of_range_seed_is_named(monkeypatch, value):
    monkeypatch.setenv("COURSE_SEED", value)
    with pytest.raises(ValueError, match="COURSE_SEED must be between 0 and"):
        get_settings()


def test_shown_path_hides_the_machine(tmp_path):
    from pathlib import Path

    from companion.config import REPO_ROOT, shown_path

    assert shown_path(REPO_ROOT / "outputs" / "deltas") == "outputs/deltas"
    assert shown_path(Path.home() / ".cache" / "x") == "~/.cache/x"
