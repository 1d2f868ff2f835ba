"""Companion package of the course "Adapting and inspecting small language models on a CPU".

Modules, one per concept:
- ``config``: settings (model name, fast mode, seeds, cache dir), ``seed_everything``.
- ``models``: ``load_lm`` for the embedded default, Hub ids and tiny test models.
- ``arch``: the adapter that hides OPT vs Llama layer layouts.
- ``data``: the registry of named datasets with one schema per kind.
- ``course``: executes the notebooks (``python -m companion.course run``).
- chapter modules: ``legacy``, ``prompting``, ``delta`` (chapter 1), ``chips`` (chapter 2),
  ``sft`` and ``chat`` (chapter 3), ``kv_methods``, ``kv_fidelity`` and ``kv`` (chapter 4:
  compression methods, the fidelity harness, and the batch runner with its command line).
"""

__version__ = "0.1.0"
