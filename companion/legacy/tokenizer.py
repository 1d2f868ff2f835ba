"""Fast tokenizers of transformers 5 given the special-token methods OpenPrompt's wrappers call."""

from __future__ import annotations

import types

from .ledger import _note


def _affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a text, as it is configured."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def patch_tokenizer(tokenizer):
    """Give a transformers-5 fast tokenizer the two methods OpenPrompt's wrappers call.

    ``build_inputs_with_special_tokens`` is gone from fast tokenizers and
    ``get_special_tokens_mask`` raises for raw ids; both are rebuilt from the affixes the
    tokenizer itself adds (e.g. OPT's leading ``</s>``; none for GPT-2 or SmolLM2).
    """
    needs_build = not callable(getattr(tokenizer, "build_inputs_with_special_tokens", None))
    try:
        tokenizer.get_special_tokens_mask([0])
        needs_mask = False
    except (NotImplementedError, AttributeError):
        needs_mask = True
    if not (needs_build or needs_mask):
        return tokenizer

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        prefix, suffix = _affixes(self)
        ids = prefix + list(token_ids_0) + suffix
        return ids if token_ids_1 is None else ids + prefix + list(token_ids_1) + suffix

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(int(t) in special) for t in token_ids_0]
        prefix, suffix = _affixes(self)
        mask = [1] * len(prefix) + [0] * len(token_ids_0) + [1] * len(suffix)
        if token_ids_1 is not None:
            mask += [1] * len(prefix) + [0] * len(token_ids_1) + [1] * len(suffix)
        return mask

    if needs_build:
        tokenizer.build_inputs_with_special_tokens = types.MethodType(build_inputs_with_special_tokens, tokenizer)
    if needs_mask:
        tokenizer.get_special_tokens_mask = types.MethodType(get_special_tokens_mask, tokenizer)
    _note("tokenizer special-token methods", "fast tokenizers in transformers 5 lack what PromptDataLoader calls")
    return tokenizer
