"""Delta checkpoints: save a delta with a note of its backbone, reload it, refuse another backbone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from peft import PeftModel

from .. import arch
from ..adapters import _quiet_peft
from ..models import model_name
from ..prompting import DEFAULT_TEMPLATE

DELTA_INFO_FILE = "course_delta.json"


class DeltaMismatchError(ValueError):
    """A delta checkpoint was made for another backbone than the one it is loaded into."""


def backbone_bytes(model) -> int:
    """Bytes of the backbone's parameters as held in memory (shared tensors counted once)."""
    seen, total = set(), 0
    for name, parameter in arch.unwrap(model).named_parameters():
        if id(parameter) in seen or "lora_" in name or "ia3_" in name:
            continue
        seen.add(id(parameter))
        total += parameter.numel() * parameter.element_size()
    return total


def backbone_fingerprint(model) -> dict:
    """What identifies a backbone: its type, shapes, and a checksum of some embedding rows."""
    base = arch.unwrap(model)
    config = base.config
    embedding = base.get_input_embeddings().weight
    rows = embedding.detach()[:16].to(torch.float32).contiguous().numpy().tobytes()
    return {
        "name": model_name(base),
        "model_type": config.model_type,
        "hidden_size": arch.hidden_size(base),
        "num_layers": arch.num_layers(base),
        "vocab_size": int(embedding.shape[0]),
        "embedding_sha256": hashlib.sha256(rows).hexdigest()[:16],
    }


def save_delta(model: PeftModel, path: str | Path, *, template: str = DEFAULT_TEMPLATE, tokenizer=None) -> Path:
    """Write the delta (not the backbone) to ``path``, plus a note of the backbone it needs.

    Pass ``tokenizer`` when training added tokens (e.g. chapter 3's ``<sep>``): it is saved
    beside the delta, and ``load_delta`` grows a fresh backbone's embeddings to match.
    """
    if not isinstance(model, PeftModel):
        raise TypeError("save_delta expects a model returned by companion.delta.attach or load_delta")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: PEFT's "auto" looks the base model up on the Hub to see if
    # its vocabulary changed (a warning offline); new tokens' rows are saved by the delta itself
    # (trainable tokens), and the tokenizer beside it when one is given.
    model.save_pretrained(path, save_embedding_layers=False)
    method = model.peft_config[model.active_adapter].peft_type.value.lower()
    info = {"backbone": backbone_fingerprint(model), "method": method, "template": template,
            "tokenizer": tokenizer is not None}
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / DELTA_INFO_FILE).write_text(json.dumps(info, indent=2))
    return path


REQUIRED_BACKBONE_KEYS = ("name", "model_type", "hidden_size", "num_layers", "vocab_size", "embedding_sha256")
ADAPTER_FILES = ("adapter_config.json",)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def delta_info(path: str | Path) -> dict:
    """The note ``save_delta`` wrote: backbone fingerprint, method, template (checked)."""
    path = Path(path)
    info_file = path / DELTA_INFO_FILE
    if not path.exists():
        raise FileNotFoundError(f"no delta checkpoint folder at {path}; save one with companion.delta.save_delta")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; a delta checkpoint is the folder save_delta wrote")
    if not info_file.exists():
        raise FileNotFoundError(
            f"{path} has no {DELTA_INFO_FILE}; it was not written by companion.delta.save_delta"
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise DeltaMismatchError(
            f"{info_file} is damaged ({problem}); save the delta again with save_delta"
        ) from None
    backbone = info.get("backbone") if isinstance(info, dict) else None
    missing = [key for key in REQUIRED_BACKBONE_KEYS if not isinstance(backbone, dict) or key not in backbone]
    if missing:
        raise DeltaMismatchError(
            f"{info_file} does not say which backbone the delta needs (missing {', '.join(missing)}); "
            "save the delta again with save_delta"
        )
    return info


def _check_adapter_files(path: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (path / name).exists()]
    if not any((path / name).exists() for name in ADAPTER_WEIGHTS):
        missing.append(" or ".join(ADAPTER_WEIGHTS))
    if missing:
        raise FileNotFoundError(
            f"the delta folder {path} lacks {', '.join(missing)}; it is incomplete (copy the whole "
            "folder that save_delta wrote, or save the delta again)"
        )


def load_delta_tokenizer(path: str | Path):
    """The tokenizer to use with a saved delta: the one saved beside it, else its backbone's."""
    info = delta_info(path)
    if info.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.padding_side = "left"
        return tokenizer
    from ..models import load_lm

    return load_lm(info["backbone"]["name"])[1]


def load_delta(path: str | Path, base_model=None) -> PeftModel:
    """Load a delta saved by ``save_delta`` onto ``base_model`` (default: load its backbone).

    Raises ``DeltaMismatchError`` if ``base_model`` is not the backbone the delta was made
    for (another architecture, size, or weights). Like PEFT, this modifies ``base_model``
    in place; the returned model is in eval mode.
    """
    path = Path(path)
    info = delta_info(path)
    _check_adapter_files(path)
    expected = info["backbone"]
    if base_model is None:
        from ..models import load_lm

        base_model, _ = load_lm(expected["name"])
    base_vocab = int(arch.unwrap(base_model).get_input_embeddings().weight.shape[0])
    if info.get("tokenizer") and expected["vocab_size"] > base_vocab:
        # the delta was trained with new tokens: give the backbone their (still untrained) rows
        arch.unwrap(base_model).resize_token_embeddings(expected["vocab_size"])
    found = backbone_fingerprint(base_model)
    differences = [
        f"{key}: checkpoint {expected[key]!r}, model {found[key]!r}"
        for key in ("model_type", "hidden_size", "num_layers", "vocab_size", "embedding_sha256")
        if expected.get(key) != found[key]
    ]
    if differences:
        raise DeltaMismatchError(
            f"the delta at {path} was made for backbone {expected['name']!r}, not for "
            f"{found['name']!r} ({'; '.join(differences)}); load it onto the backbone it was "
            "trained on (load_delta(path) loads that one for you)"
        )
    with _quiet_peft():
        model = PeftModel.from_pretrained(base_model, str(path))
    model.eval()
    return model


def checkpoint_bytes(path: str | Path) -> int:
    """Total size of the files in a checkpoint folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
