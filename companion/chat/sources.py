"""What the chat talks to: the base model, or a saved delta on its backbone with its tokenizer.

Chapters save their deltas with ``companion.delta.save_delta`` under ``outputs/deltas/``
(``config.delta_path``; fast runs under ``outputs/deltas/fast/``). ``find_deltas`` lists
every delta folder found there, at any depth, by the ``course_delta.json`` note that
``save_delta`` writes; ``open_model`` loads one, with the tokenizer saved beside it when
training added tokens (chapter 3's ``<sep>``), so the new token's trained row is used.
"""

from __future__ import annotations

from pathlib import Path

from ..config import REPO_ROOT, get_settings, shown_path
from ..delta.checkpoint import DELTA_INFO_FILE, delta_info, load_delta, load_delta_tokenizer

DELTAS_ROOT = REPO_ROOT / "outputs" / "deltas"
BASE_CHOICE = "base model"


def find_deltas(root: str | Path | None = None) -> dict[str, Path]:
    """Saved deltas under ``root`` (default ``outputs/deltas/``) by their name relative to it.

    A name is the folder path below ``root`` (``ch1/lora``, ``fast/ch3_delia``), sorted.
    """
    root = Path(DELTAS_ROOT if root is None else root)
    if not root.is_dir():
        return {}
    found = {info.parent.relative_to(root).as_posix(): info.parent for info in root.rglob(DELTA_INFO_FILE)}
    return dict(sorted(found.items()))


def resolve_delta(delta: str | Path, root: str | Path | None = None) -> Path:
    """The folder of ``delta``: a folder path, or a name that ``find_deltas(root)`` lists."""
    path = Path(delta).expanduser()
    if path.exists():
        return path
    known = find_deltas(root)
    if str(delta) in known:
        return known[str(delta)]
    where = Path(DELTAS_ROOT if root is None else root)
    listed = ", ".join(known) if known else f"none yet (run notebook 01 or 03 to save one under {shown_path(where)})"
    raise FileNotFoundError(f"no saved delta {str(delta)!r}: not a folder, and not a delta name under "
                            f"{shown_path(where)}; saved deltas: {listed}")


def open_model(delta: str | Path | None = None, model: str | None = None, root: str | Path | None = None):
    """``(model, tokenizer, label)`` to chat with.

    Without ``delta``: the model ``model`` (default: the course's ``COURSE_MODEL``). With
    ``delta``: its backbone (or ``model``, which must then be that backbone: a
    ``DeltaMismatchError`` names the difference) with the delta on it, and the delta's own
    tokenizer when one was saved beside it.
    """
    from ..models import load_lm

    if delta is None:
        base, tokenizer = load_lm(model)
        return base, tokenizer, model or get_settings().model
    path = resolve_delta(delta, root)
    info = delta_info(path)  # a clear error for a folder save_delta did not write
    base, tokenizer = load_lm(model or info["backbone"]["name"])
    if has_own_tokenizer(path, info):
        tokenizer = load_delta_tokenizer(path) if info.get("tokenizer") else _saved_tokenizer(path)
        rows = int(base.get_input_embeddings().weight.shape[0])
        wanted = int(info["backbone"]["vocab_size"])
        if wanted > rows and len(tokenizer) > rows:
            # Room for the new tokens' rows; the delta brings their trained values, so the
            # placeholder rows need no (slow, chatty) mean-and-covariance initialisation.
            base.resize_token_embeddings(wanted, mean_resizing=False)
    tuned = load_delta(path, base)
    return tuned, tokenizer, f"{info['backbone']['name']} + delta {shown_path(path)}"


TOKENIZER_FILE = "tokenizer_config.json"


def has_own_tokenizer(path: Path, info: dict) -> bool:
    """Whether a tokenizer was saved beside the delta (by ``save_delta(..., tokenizer=)`` or by hand)."""
    return bool(info.get("tokenizer")) or (Path(path) / TOKENIZER_FILE).exists()


def _saved_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
