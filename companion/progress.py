"""Progress bars for the course's long work: plain text, on standard output.

Every loop that takes more than a few seconds shows a bar made here. We use tqdm's text
bar (``tqdm.std``) rather than ``tqdm.auto``: in Jupyter, ``tqdm.auto`` draws a widget,
which a saved notebook shows as ``0%| 0/30`` outside JupyterLab. The text bar is written to
standard output (not standard error, so an executed notebook has no red stderr blocks) and
a finished bar leaves one line, e.g. ``SFT: 100%|##########| 50/50 [01:10<00:00, loss=0.4]``.
"""

from __future__ import annotations

import sys

from tqdm.std import tqdm as _tqdm

BAR_WIDTH = 90


def progress(iterable=None, *, desc: str | None = None, total: int | None = None, disable: bool = False,
             leave: bool = True, **kwargs) -> _tqdm:
    """``tqdm(iterable, desc=..., total=...)`` as a text bar on stdout, ASCII, 90 columns."""
    kwargs.setdefault("mininterval", 1.0)
    return _tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave, file=sys.stdout,
                 ncols=BAR_WIDTH, ascii=True, dynamic_ncols=False, **kwargs)
