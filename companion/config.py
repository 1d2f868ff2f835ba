"""The course's settings, read in one place: model name, fast mode, seed, threads, cache dir.

Every notebook, test and benchmark reads its settings from here, never from its own
environment look-ups. Each setting can be changed with one environment variable:

| variable          | default          | meaning                                                |
|-------------------|------------------|--------------------------------------------------------|
| ``COURSE_MODEL``  | ``smollm2-135m`` | model every chapter loads (a short name, Hub id, path)  |
| ``COURSE_FAST``   | ``0``            | ``1`` shrinks data sizes and step counts (tests, CI)    |
| ``COURSE_SEED``   | ``0``            | seed for Python, NumPy and torch                       |
| ``COURSE_THREADS``| all cores        | torch CPU threads                                      |
| ``COURSE_CACHE``  | user cache dir   | converted models, extracted data, self-sampled caches   |

When ``COURSE_FAST`` is unset, ``CI=true`` turns fast mode on, so that CI never runs
full-size notebooks; an explicit ``COURSE_FAST=0`` wins over ``CI``.
"""

from __future__ import annotations

import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m"
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
MAX_SEED = 2**32 - 1  # NumPy's seed range; torch accepts it too


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in TRUE_WORDS


def _flag(name: str, text: str) -> bool:
    """A yes/no environment variable; an unrecognised value is an error, never silently "no"."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(
        f"{name}={text!r} is not understood; use {name}=1 (on) or {name}=0 (off)"
    )


def _default_cache_dir() -> Path:
    # XDG on Linux, ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows.
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "llm-cpu-course"
    if os.uname().sysname == "Darwin":
        return Path.home() / "Library" / "Caches" / "llm-cpu-course"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-cpu-course"


@dataclass(frozen=True)
class Settings:
    """A snapshot of the course settings (see the module docstring for the variables)."""

    model: str
    fast: bool
    seed: int
    threads: int
    cache_dir: Path

    def size(self, full: T, fast: T) -> T:
        """Pick a size (examples, steps, budgets...) for the current mode.

        Notebooks call ``settings.size(full=400, fast=16)`` instead of branching on the
        mode themselves, so there is one code path with two sizes.
        """
        return fast if self.fast else full

    @property
    def mode(self) -> str:
        return "fast" if self.fast else "full"


def get_settings() -> Settings:
    """Read the settings from the environment now (tests may change the environment)."""
    seed_text = os.environ.get("COURSE_SEED", "0")
    threads_text = os.environ.get("COURSE_THREADS", "")
    try:
        seed = int(seed_text)
    except ValueError:
        raise ValueError(f"COURSE_SEED must be an integer, got {seed_text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"COURSE_SEED must be between 0 and {MAX_SEED}, got {seed}")
    try:
        threads = int(threads_text) if threads_text else (os.cpu_count() or 1)
    except ValueError:
        raise ValueError(f"COURSE_THREADS must be an integer, got {threads_text!r}") from None
    cache = os.environ.get("COURSE_CACHE")
    fast_text = os.environ.get("COURSE_FAST", "")
    return Settings(
        model=os.environ.get("COURSE_MODEL", "").strip() or DEFAULT_MODEL,
        fast=_flag("COURSE_FAST", fast_text) if fast_text.strip() else _truthy(os.environ.get("CI")),
        seed=seed,
        threads=max(1, threads),
        cache_dir=Path(cache).expanduser() if cache else _default_cache_dir(),
    )


settings = get_settings()


def seed_everything(seed: int | None = None, threads: int | None = None) -> int:
    """Seed Python, NumPy and torch, and set torch's CPU thread count.

    Returns the seed used. The same seed gives the same numbers on the same machine.
    """
    current = get_settings()
    seed = current.seed if seed is None else int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(current.threads if threads is None else int(threads))
    return seed


def cache_path(*parts: str) -> Path:
    """A folder under the course cache dir, created on first use."""
    path = get_settings().cache_dir.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _outputs_folder(kind: str) -> Path:
    folder = REPO_ROOT / "outputs" / kind
    if get_settings().fast:
        folder = folder / "fast"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def delta_path(name: str) -> Path:
    """Where a chapter saves a tuned delta (adapter) that the chat can open: ``outputs/deltas/NAME``.

    Fast runs use ``outputs/deltas/fast/`` so tests never overwrite a full run's adapter;
    ``python -m companion.chat`` lists the deltas found in both.
    """
    return _outputs_folder("deltas") / name


def figure_path(name: str) -> Path:
    """Where a notebook saves a figure: ``outputs/figures/NAME`` (``outputs/figures/fast/``
    in fast mode, so that test runs never overwrite the figures of a full run)."""
    return _outputs_folder("figures") / name


def shown_path(path: str | Path) -> str:
    """A path as the course prints it: relative to the repository, or with ``~`` for the home
    folder, so that saved notebooks and logs carry no absolute paths of the machine."""
    path = Path(path).expanduser().resolve()
    for root, label in ((REPO_ROOT, ""), (Path.home().resolve(), "~")):
        try:
            relative = path.relative_to(root)
        except ValueError:
            continue
        return str(Path(label) / relative) if label else str(relative)
    return str(path)


def package_dir(package: str, pip_name: str, error: type[Exception] = ModuleNotFoundError) -> Path:
    """Folder of an installed package, found without importing it.

    Several packages the course reads files from (the embedded model, the data packages,
    the GPT-2 tokenizer) are installed with ``--no-deps`` and import things the course does
    not install, so they are located with ``find_spec`` only. ``error`` is raised, naming
    the install command, when the package is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(f"the package {pip_name} is not installed; run `make setup` "
                    f"(or `pip install --no-deps {pip_name}`)")
    return Path(list(spec.submodule_search_locations)[0])
