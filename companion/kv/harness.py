"""The fidelity harness: after compressing its KV cache, does the model still say what it said?

For each prompt ``p`` (``prepare_prompts``), the full model greedily generates a continuation
``g`` token by token; that loop also records the full model's next-token distributions (the
teacher). Then, for a method (``evaluate``), the prompt cache is compressed and ``g`` is
teacher-forced through the compressed model, and we count:

- top-1 agreement: the compressed model's top token is ``g``'s next token;
- top-5 agreement: ``g``'s next token is among its 5 most likely;
- KL divergence from the full model's next-token distribution, KL(full || compressed);
- the position of the first top-1 disagreement.

Where the prompt is prefilled: ``p[:-1]`` fills the cache, which the method then compresses,
and the last prompt token plus ``g[:-1]`` are fed after it, so every one of the ``len(g)``
predictions is made from the compressed cache. The budget is a fraction of those
``len(p) - 1`` cached positions.

Two paths give the same numbers (a test checks it):

- the reference (``reference=True``), as the classic harness does it: prefill the prompt for
  every run, compress, then feed ``g`` one token per forward;
- the fast path: the prefill (and the queries and attention sums the scoring methods need)
  is computed once per prompt and shared by every method and budget, and, for a method that
  only compresses at the prefill or re-scores attention (``topk``), the whole continuation is
  scored in one forward pass. Methods that change the cache while decoding
  (``method.needs_stepping``) still go token by token.

The harness's attention hooks live in a context variable that ``companion_attention`` sets
and resets, so they apply only inside its ``with`` block.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..arch import num_layers, unwrap
from ..progress import progress as progress_bar
from .builtin import Full
from .methods import KVMethod, LayerKV
from .scores import DEGENERATE, FidelityResult, compare, repetition_rate

ATTENTION_NAME = "companion_kv"


# --- one attention function that can record queries or be replaced by a method ------------


@dataclass(frozen=True)
class _Hooks:
    capture: dict | None = None  # layer index -> (query, scaling), filled during a prefill
    attend: object = None  # a method's attention override while decoding


_HOOKS: ContextVar[_Hooks] = ContextVar("companion_kv_hooks", default=_Hooks())


def _companion_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, plus two hooks the harness switches on when needed."""
    hooks = _HOOKS.get()
    if hooks.capture is not None:
        hooks.capture[module.layer_idx] = (query, kwargs.get("scaling"))
    if hooks.attend is not None:
        output = hooks.attend(module, query, key, value, attention_mask, kwargs.get("scaling"))
        if output is not None:
            return output, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _companion_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # same masks as sdpa


@contextmanager
def companion_attention(model, capture: dict | None = None, attend=None):
    """Run ``model`` with the harness's attention function (sdpa + hooks), then restore it."""
    base = unwrap(model)
    previous = base.config._attn_implementation
    if previous != ATTENTION_NAME:
        base.set_attn_implementation(ATTENTION_NAME)
    token = _HOOKS.set(_Hooks(capture, attend))
    try:
        yield
    finally:
        _HOOKS.reset(token)
        if previous != ATTENTION_NAME:
            base.set_attn_implementation(previous)


# --- prefill, cache building, decoding ----------------------------------------------------


def build_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A transformers ``DynamicCache`` holding the given (keys, values) per layer."""
    return DynamicCache(ddp_cache_data=kv, config=unwrap(model).config)


@torch.no_grad()
def prefill(model, prompt_ids: torch.Tensor) -> list[LayerKV]:
    """Run ``prompt_ids[:-1]`` through the model; per layer, its cache and captured queries."""
    captured: dict = {}
    with companion_attention(model, capture=captured):
        out = model(input_ids=prompt_ids[None, :-1], use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise NotImplementedError(
            "the KV harness supports full-attention models only (this model has sliding-window layers)"
        )
    if len(captured) != len(cache.layers):
        raise NotImplementedError(
            f"{type(unwrap(model)).__name__} does not call transformers' AttentionInterface, "
            "so the harness cannot see its queries; use an OPT or Llama-style model"
        )
    return [
        LayerKV(i, layer.keys, layer.values, *captured[i]) for i, layer in enumerate(cache.layers)
    ]


# Decoding passes explicit position ids: after eviction the cache holds fewer entries than
# tokens seen, and transformers would otherwise take the cache length as the next position
# (wrong RoPE angles for Llama, wrong learned positions for OPT).


def _step(model, cache, token: torch.Tensor, position: int) -> torch.Tensor:
    out = model(input_ids=token.view(1, 1), position_ids=torch.tensor([[position]]),
                past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float()


@torch.no_grad()
def decode_steps(model, cache, inputs: torch.Tensor, start: int, method: KVMethod | None = None,
                 prompt_length: int = 0) -> torch.Tensor:
    """Logits after each of ``inputs``, one token per forward (the reference loop): ``(n, V)``."""
    logits = []
    for i, token in enumerate(inputs):
        logits.append(_step(model, cache, token, start + i))
        if method is not None:
            method.after_step(cache, prompt_length)
    return torch.stack(logits)


@torch.no_grad()
def decode_one_pass(model, cache, inputs: torch.Tensor, start: int) -> torch.Tensor:
    """Logits after each of ``inputs`` from a single forward pass: ``(n, V)``."""
    positions = torch.arange(start, start + len(inputs)).unsqueeze(0)
    out = model(input_ids=inputs[None], position_ids=positions, past_key_values=cache, use_cache=True)
    return out.logits[0].float()


# --- prompts: the full model's continuation and distributions -----------------------------


@dataclass
class PromptState:
    """Everything the harness needs about one prompt, computed once with the full model."""

    prompt_ids: torch.Tensor  # (L,)
    layers: list[LayerKV]  # the uncompressed cache of prompt_ids[:-1], with captured queries
    continuation: torch.Tensor  # (n,) the full model's greedy continuation g
    step_logits: torch.Tensor  # (n, V) full model, token by token (the reference teacher)
    pass_logits: torch.Tensor  # (n, V) full model, one forward pass (the fast path's teacher)
    kind: str = "tokens"  # the prompt's kind ("needle", "book_qa", "mmlu", ...)
    depth: float | None = None  # needle prompts: where the fact sits (0 = start, 1 = end)
    answer: str | None = None  # needle prompts: the text the answer must contain
    answer_end: int | None = None  # tokens of g needed to contain the answer (None: the full model missed it)

    @property
    def repetition(self) -> float:
        """Repetition rate of the full model's continuation (``scores.repetition_rate``)."""
        return repetition_rate(self.continuation)

    @property
    def inputs(self) -> torch.Tensor:
        """What is fed after the compressed cache: the last prompt token, then g[:-1]."""
        return torch.cat([self.prompt_ids[-1:], self.continuation[:-1]])

    @property
    def cached_length(self) -> int:
        return len(self.prompt_ids) - 1


def _check_lengths(model, prompt_ids: torch.Tensor, new_tokens: int) -> None:
    if prompt_ids.ndim != 1 or len(prompt_ids) < 2:
        raise ValueError(f"a prompt must be a 1-D tensor of at least 2 token ids, got shape {tuple(prompt_ids.shape)}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    limit = getattr(unwrap(model).config, "max_position_embeddings", None)
    if limit is not None and len(prompt_ids) + new_tokens > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + continuation ({new_tokens}) tokens exceed the model's "
            f"{limit} positions; use shorter prompts"
        )


@torch.no_grad()
def prepare_prompt(model, prompt, new_tokens: int, tokenizer=None) -> PromptState:
    """Prefill one prompt, let the full model greedily continue it, record its distributions.

    ``prompt`` is a ``companion.kv.Prompt`` or plain token ids. For a prompt with an
    ``answer`` (a needle), ``tokenizer`` finds how many continuation tokens contain it.
    """
    prompt_ids = torch.as_tensor(getattr(prompt, "ids", prompt), dtype=torch.long)
    _check_lengths(model, prompt_ids, new_tokens)
    start = len(prompt_ids) - 1
    with companion_attention(model):
        layers = prefill(model, prompt_ids)
        # Greedy decoding by hand rather than model.generate: the teacher's logits must come
        # from exactly the computation the reference loop repeats for every method (same
        # cache type, explicit positions, this attention function), so that `full` agrees 100%.
        cache = build_cache(model, [(layer.keys, layer.values) for layer in layers])
        token, generated, step_logits = prompt_ids[-1], [], []
        for i in range(new_tokens):
            logits = _step(model, cache, token, start + i)
            token = logits.argmax()
            generated.append(token)
            step_logits.append(logits)
        continuation = torch.stack(generated)
        inputs = torch.cat([prompt_ids[-1:], continuation[:-1]])
        cache = build_cache(model, [(layer.keys, layer.values) for layer in layers])
        pass_logits = decode_one_pass(model, cache, inputs, start)
    for layer in layers:  # H2O's score, shared by all its budgets (part of the shared prefill)
        layer.attention_received()
    answer = getattr(prompt, "answer", None)
    answer_end = None
    if answer is not None:
        if tokenizer is None:
            raise ValueError("a prompt with an answer (a needle) needs the tokenizer: prepare_prompts(..., tokenizer=)")
        answer_end = _answer_end(tokenizer, continuation, answer)
    return PromptState(prompt_ids, layers, continuation, torch.stack(step_logits), pass_logits,
                       kind=getattr(prompt, "kind", "tokens"), depth=getattr(prompt, "depth", None),
                       answer=answer, answer_end=answer_end)


def _answer_end(tokenizer, continuation: torch.Tensor, answer: str) -> int | None:
    """The fewest leading tokens of ``continuation`` whose text contains ``answer``, or None."""
    for end in range(1, len(continuation) + 1):
        if answer in tokenizer.decode(continuation[:end]):
            return end
    return None


def prepare_prompts(model, prompts, new_tokens: int, progress: bool = True, tokenizer=None) -> list[PromptState]:
    """``prepare_prompt`` for each prompt (``Prompt`` objects, lists or 1-D tensors of token ids)."""
    return [
        prepare_prompt(model, prompt, new_tokens, tokenizer)
        for prompt in progress_bar(prompts, desc="full-model continuations", disable=not progress)
    ]


def needle_correct(state: PromptState, first_disagreement: int | None) -> bool | None:
    """Whether a compressed model still gives a needle prompt's answer (None if not scored).

    Exact without generating again: teacher forcing feeds the full model's continuation, and a
    greedy model whose top token agrees at every step up to ``answer_end`` generates exactly
    those tokens, so it answers if and only if its first disagreement comes after them.
    """
    if state.answer is None or state.answer_end is None:
        return None
    return first_disagreement is None or first_disagreement >= state.answer_end


@torch.no_grad()
def evaluate(model, states: list[PromptState], method: KVMethod, reference: bool = False,
             progress: bool = False) -> FidelityResult:
    """Fidelity of ``method`` on prepared prompts; ``reference=True`` runs the slow loop."""
    if not states:
        raise ValueError("no prompts: pass the output of prepare_prompts(model, prompts, new_tokens)")
    stepping = reference or method.needs_stepping
    path = "reference" if reference else ("token by token" if stepping else "one pass")
    attend = method.attend if type(method).attend is not KVMethod.attend else None
    per_prompt, full_bytes, kept_bytes = [], [], []
    start_time = time.perf_counter()
    with companion_attention(model):
        for state in progress_bar(states, desc=method.name, disable=not progress, leave=False):
            layers = prefill(model, state.prompt_ids) if reference else state.layers
            method.check_tokens(len(state.inputs))
            compressed = method.compress(layers)
            full_bytes.append(Full().cache_bytes([(layer.keys, layer.values) for layer in layers]))
            cache = method.make_cache(model, compressed)
            if cache is None:
                cache = build_cache(model, compressed)
            stored = method.stored_bytes(cache)
            kept_bytes.append(method.cache_bytes(compressed) if stored is None else stored)
            with companion_attention(model, attend=attend):
                if stepping:
                    logits = decode_steps(model, cache, state.inputs, state.cached_length,
                                          method if method.needs_stepping else None, state.cached_length)
                else:
                    logits = decode_one_pass(model, cache, state.inputs, state.cached_length)
            teacher = state.step_logits if stepping else state.pass_logits
            scored = compare(logits, teacher, state.continuation)
            scored.update(kind=state.kind, depth=state.depth, degenerate=state.repetition > DEGENERATE,
                          needle_correct=needle_correct(state, scored["first_disagreement"]))
            per_prompt.append(scored)
    seconds = time.perf_counter() - start_time
    tokens = sum(p["tokens"] for p in per_prompt)
    firsts = [p["tokens"] if p["first_disagreement"] is None else p["first_disagreement"] for p in per_prompt]
    return FidelityResult(
        method=method.name,
        config=method.config(),
        top1=sum(p["top1_hits"] for p in per_prompt) / tokens,
        top5=sum(p["top5_hits"] for p in per_prompt) / tokens,
        kl=sum(p["kl_sum"] for p in per_prompt) / tokens,
        first_disagreement=sum(firsts) / len(firsts),
        tokens=tokens,
        cache_bytes=sum(kept_bytes) / len(kept_bytes),
        full_cache_bytes=sum(full_bytes) / len(full_bytes),
        seconds=seconds,
        path=path,
        per_prompt=per_prompt,
    )


def head_dim(model) -> int:
    """Channels per key/value head."""
    config = unwrap(model).config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(model) -> int:
    """Bytes one token adds to the (uncompressed) KV cache: 2 x layers x kv heads x head dim."""
    config = unwrap(model).config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = next(unwrap(model).parameters()).element_size()
    return 2 * num_layers(model) * heads * head_dim(model) * element
