"""Document sources: local files and folders (any format of `formats.py`), `datasets` saved to disk, and the
shipped corpora. Everything streams, so a corpus is never read whole. Bad records are reported with file and line:
`on_bad_record="fail"` raises at the first one, `"skip"` counts it and goes on (`records.BadRecords`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .formats import READABLE_SUFFIXES, is_saved_dataset, read_file, read_saved_dataset
from .records import BadRecords, DataError, Document, OnBad
from .sources import CORPORA

_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", "node_modules"})


def _files_under(folder: Path) -> Iterator[Path]:
    """Readable files and saved-dataset folders under `folder`, sorted, skipping hidden, VCS and cache folders."""
    for root, dirs, files in os.walk(folder):
        keep = []
        for d in sorted(dirs):
            if d in _SKIP_DIRS or d.startswith("."):
                continue
            if is_saved_dataset(Path(root) / d):
                yield Path(root) / d  # read as a dataset, not as loose Arrow files
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            p = Path(root) / name
            if p.suffix.lower() in READABLE_SUFFIXES:
                yield p


def source_name(src: str | Path) -> str:
    """The name a source goes by in mixing weights and the data card: a shipped corpus's name, or the path's
    stem."""
    return str(src) if str(src) in CORPORA else (Path(src).stem or str(src))


def read_documents(src: str | Path, *, text_field: str = "text", bad: BadRecords | None = None,
                   on_bad_record: OnBad = "fail", split: str = "train") -> Iterator[Document]:
    """Stream the documents of one source: "embedded" or "stdlib" (the shipped corpora, `split` "train" or
    "heldout"), a saved `datasets` folder, a folder of files (walked recursively, sorted), or one file, dispatched
    by suffix (.jsonl/.ndjson, .parquet, .arrow/.feather, anything else read as text).

    Pass a shared `bad` collector to count bad records across sources; otherwise one is made from `on_bad_record`.
    """
    bad = bad if bad is not None else BadRecords(on_bad_record)
    name = source_name(src)
    if str(src) in CORPORA:
        for i, text in enumerate(CORPORA[str(src)](split)):
            yield Document(text, name, f"{src}:{i + 1}")
        return
    path = Path(src)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; pass text/JSONL/Parquet/Arrow files, a folder, a saved "
                        "dataset or 'embedded'")
    if path.is_dir():
        if is_saved_dataset(path):
            yield from read_saved_dataset(path, bad, name, text_field)
            return
        files = _files_under(path)
    else:
        files = iter([path])
    for p in files:
        if p.is_dir():
            yield from read_saved_dataset(p, bad, name, text_field)
        else:
            yield from read_file(p, bad, name, text_field)


def read_sources(srcs: Iterable[str | Path], *, text_field: str = "text", bad: BadRecords | None = None,
                 on_bad_record: OnBad = "fail") -> Iterator[Document]:
    """The documents of several sources, one after the other, sharing one bad-record collector."""
    bad = bad if bad is not None else BadRecords(on_bad_record)
    for src in srcs:
        yield from read_documents(src, text_field=text_field, bad=bad)
