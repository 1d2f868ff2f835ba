"""Minutes per notebook on this machine, full and fast mode; writes the README's table.

Full-mode times are read from the committed notebooks (``python -m companion.course run``
records each run's seconds, mode and model in the notebook's metadata). Fast-mode times
are measured now by executing each notebook in fast mode into a temporary folder
(``--skip-fast`` leaves them out). The table is printed, written to
``benchmarks/notebook_times.md`` and put between the markers in README.md and notebooks/README.md.

    python benchmarks/notebook_times.py            # measure fast mode, update the table
    python benchmarks/notebook_times.py --skip-fast
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

import nbformat

from companion.config import REPO_ROOT
from companion.course import course_notebooks, execute_notebook

START, END = "<!-- notebook-times:start -->", "<!-- notebook-times:end -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-fast", action="store_true", help="do not measure fast mode")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in course_notebooks() + sorted((REPO_ROOT / "notebooks" / "solutions").glob("*.ipynb")):
            meta = nbformat.read(path, as_version=4).metadata.get("course", {})
            full = meta.get("seconds") if meta.get("mode") == "full" and meta.get("completed", True) else None
            fast = None
            if not args.skip_fast:
                fast = execute_notebook(path, fast=True, output=Path(tmp) / path.name)
            rows.append((path.name, full, fast, meta.get("model", "?"), meta.get("threads", "?"),
                         f'{meta.get("load_before", "?")} / {meta.get("load_after", "?")}'))
            print(f"{path.name}: full {full} s, fast {fast and round(fast, 1)} s", flush=True)

    def minutes(seconds):
        return "not measured" if seconds is None else f"{seconds / 60:.1f}"

    threads = os.cpu_count()
    lines = [
        "| notebook | full mode (min) | threads, load before / after | fast mode (min) | model |",
        "|---|---|---|---|---|",
        *[f"| `{n}` | {minutes(f)} | {t}, {load} | {minutes(q)} | {m} |" for n, f, q, m, t, load in rows],
        "",
        f"Measured on a {threads}-core CPU. Full mode: the committed run of each notebook, with the torch "
        "threads it used and the machine's load average when it started and over its last 5 minutes "
        "(a load above the threads used means other jobs shared the CPU, so an idle machine is faster). "
        "Fast mode: `python benchmarks/notebook_times.py`, with the caches that earlier runs left (converted model, self-sampled answers, finished KV runs).",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    (REPO_ROOT / "benchmarks" / "notebook_times.md").write_text(table + "\n")
    for readme in (REPO_ROOT / "README.md", REPO_ROOT / "notebooks" / "README.md"):
        text = readme.read_text() if readme.exists() else ""
        if START in text and END in text:
            text = re.sub(re.escape(START) + ".*?" + re.escape(END),
                          lambda _: f"{START}\n{table}\n{END}", text, flags=re.S)
            readme.write_text(text)
            print(f"{readme.relative_to(REPO_ROOT)}: table updated")


if __name__ == "__main__":
    main()
