"""JSON-lines files the course reads and appends to: data files, result files, caches.

One home for reading and writing JSON lines, so that every file behaves the same when it
is damaged:

- ``json_lines`` reads a file line by line; a bad line raises an error naming the file
  and the line (bytes that are not UTF-8 too), never a bare ``JSONDecodeError``.
- ``append_record`` appends one row as one whole line, flushed and fsynced, and first ends
  a last line that lacks its newline, so a new row is never glued to an old one.
- ``read_records`` reads a results file or cache that a killed process may have cut: a
  torn *last* line is reported with file and line, moved to ``<file>.torn`` (set aside,
  never deleted) and the rows before it are returned, so the run resumes. A bad line in
  the middle is not a torn write, so it is an error.
- ``locked`` holds an exclusive lock on a folder, so that two runners sharing a results
  folder do not compute the same rows twice: the second one waits, and says so.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX only; on Windows the lock is a no-op (the course targets Linux and macOS)
    import fcntl
except ImportError:  # pragma: no cover - not reached on Linux/macOS
    fcntl = None


class RecordsError(ValueError):
    """A JSON-lines file that cannot be read as it is; the message names the file and line."""


def json_lines(path: str | Path, error: type[Exception] = RecordsError, hint: str = "") -> Iterator[tuple[int, object]]:
    """Yield ``(line number, value)`` for each non-blank line of a JSON-lines file.

    A malformed line (or bytes that are not UTF-8) raises ``error`` naming the file and
    line, followed by ``hint``.
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{path} does not exist")
    if path.is_dir():
        raise error(f"{path} is a folder, not a JSON-lines file")
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as problem:
                raise error(f"{path}:{number}: not UTF-8 text (byte {problem.start}); "
                            f"save the file as UTF-8{hint}") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as problem:
                raise error(f"{path}:{number}: not valid JSON ({problem.msg}){hint}") from None


def read_records(path: str | Path, *, what: str = "results file") -> list[dict]:
    """Rows of a file written by ``append_record``, setting a torn last line aside.

    A missing file has no rows. A last line that is not valid JSON (a process killed
    mid-write, a full disk) is moved to ``<path>.torn`` and reported with a warning that
    names the file and line; the rows before it are kept and returned.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows: list[dict] = []
    for index, raw in enumerate(lines):
        number = index + 1
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as problem:
            if index < len(lines) - 1:
                raise RecordsError(
                    f"{path}:{number}: damaged line in the middle of the {what} ({problem}); "
                    "only a last line can be a torn write, so fix or delete this line by hand"
                ) from None
            _set_aside(path, raw, keep=b"".join(line + b"\n" for line in lines[:index]), number=number, what=what)
            break
        rows.append(value)
    return rows


def _set_aside(path: Path, raw: bytes, *, keep: bytes, number: int, what: str) -> None:
    aside = path.with_name(path.name + ".torn")
    with aside.open("ab") as handle:
        handle.write(raw + b"\n")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(keep)
    os.replace(temporary, path)
    warnings.warn(
        f"{path}:{number}: the last line of the {what} was cut off (an interrupted write?); "
        f"it was moved to {aside.name} and the run goes on from the rows before it",
        RuntimeWarning, stacklevel=3,
    )


def append_record(path: str | Path, row: Mapping) -> None:
    """Append ``row`` as one JSON line: written whole, flushed and fsynced.

    If the file's last line has no newline (a hand edit, a torn write), one is added first
    so the new row starts on a line of its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(row), ensure_ascii=False) + "\n").encode("utf-8")
    with path.open("ab+") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = b"\n" + line
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def locked(folder: str | Path, *, name: str = ".lock", wait: bool = True, stream=None):
    """Hold an exclusive lock on ``folder`` for the duration of the ``with`` block.

    A second holder waits (``wait=True``, printing one line saying so) or raises
    ``BlockingIOError`` (``wait=False``). The lock is released when the block ends or the
    process dies, so a killed run never leaves a stale lock behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / name
    with lock_path.open("a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise BlockingIOError(f"another run is writing to {folder} (it holds {lock_path}); "
                                          "wait for it to finish or use another results folder") from None
                print(f"another run is writing to {folder}; waiting for it to finish...",
                      file=stream or sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield lock_path
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)
