"""Diverse-data instruction tuning (DELIA, arXiv 2408.10841): the chapter 3 toolkit.

- ``task``: a strict-format judging task asked for by a new ``<sep>`` token, scored from
  the label tokens' logits (``verdict_accuracy``) and its format by generation;
- ``sampling``: diverse queries, the resumable self-sampled cache (and the base model's
  greedy answers), ``mix``;
- ``training``: LoRA SFT through TRL's ``SFTTrainer`` (``train_sft``);
- ``recipes``: the experiment's loop (``train_recipe``): same task batches for every
  recipe, DELIA's self-samples on top, or KL replay to the adapter-free base;
- ``forgetting``: KL(base || tuned) along the base's own answers, cross-entropy on human
  text, QA and format leakage; ``scorecard``: estimates, table and plots.
"""

from .forgetting import (
    answer_contained,
    continuation_logits,
    forgetting_kl,
    heldout_texts,
    json_leakage,
    kl_queries,
    qa_correct,
    qa_replies,
    text_cross_entropy,
)
from .recipes import REPLAY_LOSSES, encode_row, plan_batches, token_losses, train_recipe
from .sampling import (
    CACHE_FIELDS,
    MMLU_GROUPS,
    CacheError,
    batch_seed,
    build_cache,
    cache_rows_to_sft,
    default_cache_file,
    diverse_queries,
    mix,
    mmlu_group,
    query_pool,
    read_cache,
)
from .scorecard import (
    IDENTITY_QUESTIONS,
    TABLE_METRICS,
    EvalSuite,
    evaluate,
    identity_name,
    identity_rate,
    plot_gain_vs_forgetting,
    plot_scaling,
    summarize,
    table_rows,
)
from .task import (
    DO_NOT_FOLLOW_FORMAT,
    FOLLOW_FORMAT,
    SEP_TOKEN,
    VERDICT_PREFIX,
    VERDICTS,
    add_special_token,
    format_replies,
    format_validity,
    judging_prompt,
    judging_task,
    label_token_ids,
    looks_like_json,
    parse_verdict,
    scoring_texts,
    token_embedding,
    verdict_accuracy,
    verdict_json,
    verdict_logits,
    with_instruction,
)
from .training import SFTRun, lora_config, sft_trainer, train_sft
