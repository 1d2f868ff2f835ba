"""Chapter 4: a KV-cache compression fidelity bench.

- ``methods``: the method interface (``KVMethod``, ``EvictionMethod``...), ``register_method``,
  ``make_method``; ``builtin``: the course's methods (full, random, streaming_llm, h2o,
  snapkv, tova, key_norm, topk, quantize); ``quantized``: transformers' real ``QuantizedCache``
  (optimum-quanto or HQQ backend, an optional extra);
- ``harness``: prefill once, the full model's continuation, the fast path and the reference
  loop (``prepare_prompts``, ``evaluate``);
- ``scores``: agreement, KL and its percentiles, intervals, needle accuracy, ``sequence_kl``;
- ``prompts``: needle, book QA and many-shot multiple-choice prompts, offline;
- ``runs``: JSON run configs and the resumable runner; ``plots``; ``command``: the CLI::

    python -m companion.kv run configs/kv/        # every config in the folder
    python -m companion.kv methods                # the registered methods and their knobs

Notebooks only import ``companion.kv``: everything public is re-exported here.
"""

from .methods import (  # noqa: F401
    METHODS, BudgetMethod, EvictionMethod, KVConfigError, KVMethod, LayerKV, available_methods, make_method,
    method_knobs, protect, register_method,
)
from .builtin import (  # noqa: F401  (registers the course's methods)
    H2O, TOVA, Full, KeyNorm, Quantize, RandomEviction, SnapKV, StreamingLLM, TopKAttention, fake_quantize,
)
from .quantized import INSTALL as KVQUANT_INSTALL, QuantizedCacheMethod, backend_available  # noqa: F401
from .scores import (  # noqa: F401
    FidelityResult, compare, kl_per_token, percentiles, repetition_rate, sequence_kl,
)
from .harness import (  # noqa: F401
    PromptState, build_cache, companion_attention, decode_one_pass, decode_steps, evaluate, head_dim,
    kv_bytes_per_token, prefill, prepare_prompt, prepare_prompts,
)
from .prompts import (  # noqa: F401
    PROMPT_SOURCES, Prompt, book_prompts, book_qa_prompts, long_prompts, mmlu_prompts, needle_prompts,
)
from .runs import (  # noqa: F401
    DEFAULT_BUDGETS, RunConfig, default_results_dir, load_run_config, load_run_configs, read_results,
    run_config_from_dict, run_configs,
)
from .plots import needle_by_depth, plot_fidelity  # noqa: F401
from .command import main, summary  # noqa: F401
