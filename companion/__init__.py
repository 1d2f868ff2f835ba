"""Companion package of the course "Adapting and inspecting small language models on a CPU".

Shared modules, one per concept:
- ``config``: the one source of settings (model name, fast mode, seed, threads, cache and
  output paths), ``seed_everything``, ``delta_path``, ``shown_path``.
- ``models``: ``load_lm`` for the embedded default, Hub ids and tiny test models;
  ``arch``: the adapter that hides OPT vs Llama layer layouts.
- ``data``: the registry of named datasets with one schema per kind.
- ``stats``: intervals, standard errors and paired comparisons for every score shown.
- ``records``: JSON-lines results and caches (torn lines set aside, one writer at a time).
- ``progress``: text progress bars; ``cli``: one-line errors for every command line.
- ``course``: executes the notebooks (``python -m companion.course run``);
  ``claims``: finds figures in a notebook's prose that none of its outputs shows.

Chapters:
- 1: ``legacy`` (OpenDelta/OpenPrompt on transformers 5), ``prompting``, ``adapters``
  (PEFT configs), ``delta`` (training, answering, checkpoints, ``python -m companion.delta``).
- 2: ``chips`` (tasks, features, probes, the pruned model, analysis, command line).
- 3: ``sft`` (the task, self-sampling, training, recipes, forgetting, scorecard).
- 4: ``kv`` (compression methods in a registry, the harness, scores, prompts, the batch
  runner and plots, ``python -m companion.kv``).
- Workshops: ``chat`` (terminal and web chat over the base model or a saved delta).
"""

__version__ = "0.1.0"
