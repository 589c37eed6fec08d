"""Readers of one file each, by format: text (a file is one document), JSONL (line by line), Parquet, Arrow and
`datasets` saved to disk (in record batches), so a file is never read whole. Bad records go to a `BadRecords`
collector with file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from .records import BadRecords, DataError, Document

TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java",
                           ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".tex", ".html", ".xml", ".yaml", ".yml",
                           ".toml", ".cfg", ".ini", ".csv", ".tsv"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet"})
ARROW_SUFFIXES = frozenset({".arrow", ".feather"})
READABLE_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES | ARROW_SUFFIXES
_BATCH_ROWS = 1024  # records per Arrow batch read
# one document (a text file, a JSONL line) at most this big: ~8M tokens, 8x the longest context trained, and a
# bound on the memory one record takes (a 100 MB line would need gigabytes to tokenise)
MAX_DOCUMENT_BYTES = 32 << 20
_TOO_BIG_FIX = "split the document into smaller records"


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text_file(path: Path, bad: BadRecords, source: str) -> Iterator[Document]:
    """One document per file (UTF-8). Binary files (a NUL byte), undecodable bytes and empty files are bad records."""
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        bad.add(path, 1, f"file of {size >> 20} MiB is over the {MAX_DOCUMENT_BYTES >> 20} MiB limit per document",
                _TOO_BIG_FIX)
        return
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a byte-order mark: UTF-16/32 text, not binary
        bad.add(path, 1, "UTF-16 or UTF-32 text (byte-order mark)", "re-encode the file as UTF-8")
        return
    nul = data.find(b"\0")
    if nul >= 0:
        bad.add(path, _line_of(data, nul), "binary file (NUL byte)", "remove it from the sources")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.add(path, _line_of(data, e.start), f"undecodable bytes (not UTF-8 at byte {e.start})",
                "re-encode the file as UTF-8")
        return
    if not text.strip():
        bad.add(path, 1, "empty text", "remove the empty file")
        return
    yield Document(text, source, str(path))


def read_jsonl(path: Path, bad: BadRecords, source: str, text_field: str = "text") -> Iterator[Document]:
    """One document per line: the string in `text_field`. Blank lines are not records and are passed over."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_DOCUMENT_BYTES + 1), b""), 1):
            if len(raw) > MAX_DOCUMENT_BYTES and not raw.endswith(b"\n"):
                bad.add(path, lineno, f"line longer than {MAX_DOCUMENT_BYTES >> 20} MiB", _TOO_BIG_FIX)
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):  # skip the rest of it
                    pass
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.add(path, lineno, f"undecodable bytes (not UTF-8 at column {e.start + 1})",
                        "re-encode the file as UTF-8")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad.add(path, lineno, f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})",
                        "fix or remove the line")
                continue
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(sorted(record)[:8]) if isinstance(record, dict) else type(record).__name__
                bad.add(path, lineno, f"missing field '{text_field}' (has: {keys})",
                        "pass --text-field with the field holding the text")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                bad.add(path, lineno, f"field '{text_field}' is {type(text).__name__}, not a string",
                        "pass --text-field with the field holding the text")
                continue
            if not text.strip():
                bad.add(path, lineno, "empty text", "remove the record")
                continue
            yield Document(text, source, f"{path}:{lineno}")


def _read_batches(batches: Iterable, path: Path, bad: BadRecords, source: str, text_field: str,
                  columns: list[str]) -> Iterator[Document]:
    """Documents from Arrow record batches (or `datasets` dict batches); rows are numbered from 1."""
    if text_field not in columns:
        bad.add(path, 1, f"missing field '{text_field}' (has: {', '.join(columns[:8])})",
                "pass --text-field with the column holding the text")
        return
    row = 0
    for batch in batches:
        values = batch[text_field] if isinstance(batch, dict) else batch.column(text_field).to_pylist()
        for text in values:
            row += 1
            if not isinstance(text, str):
                reason = "missing text (null)" if text is None else f"column '{text_field}' is not text"
                bad.add(path, row, reason, "pass --text-field with the column holding the text")
            elif not text.strip():
                bad.add(path, row, "empty text", "remove the record")
            else:
                yield Document(text, source, f"{path}:{row}")


def read_parquet(path: Path, bad: BadRecords, source: str, text_field: str = "text") -> Iterator[Document]:
    """One document per row of `text_field`, read in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        bad.add(path, 1, f"not a readable Parquet file ({_first_line(e)})", "replace or remove the file")
        return
    columns = pf.schema_arrow.names
    batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=[text_field]) if text_field in columns else iter(())
    yield from _read_batches(batches, path, bad, source, text_field, columns)


def read_arrow(path: Path, bad: BadRecords, source: str, text_field: str = "text") -> Iterator[Document]:
    """One document per row of an Arrow IPC file (stream or file format, memory-mapped), read in batches."""
    import pyarrow as pa

    source_file = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(source_file)
        batches: Iterable = reader
    except pa.ArrowInvalid:
        source_file.seek(0)
        try:
            file_reader = pa.ipc.open_file(source_file)
        except pa.ArrowInvalid as e:
            bad.add(path, 1, f"not an Arrow IPC file ({_first_line(e)})", "replace or remove the file")
            return
        reader = file_reader
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    yield from _read_batches(batches, path, bad, source, text_field, reader.schema.names)


def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by `datasets.Dataset(Dict).save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def read_saved_dataset(path: Path, bad: BadRecords, source: str, text_field: str = "text") -> Iterator[Document]:
    """Rows of a `datasets` folder (memory-mapped; its "train" split, or its only split, for a DatasetDict)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    where = path
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if "train" in ds or len(splits) == 1:
            name = "train" if "train" in ds else splits[0]
            ds, where = ds[name], path / name
        else:
            raise DataError(f"{path}: a dataset with splits {', '.join(splits)} and no 'train'; pass one split's "
                            f"folder, e.g. {path / splits[0]}")
    batches = ds.select_columns([text_field]).iter(batch_size=_BATCH_ROWS) if text_field in ds.column_names else ()
    yield from _read_batches(batches, where, bad, source, text_field, list(ds.column_names))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_file(path: Path, bad: BadRecords, source: str, text_field: str = "text") -> Iterator[Document]:
    """Documents of one file, by suffix."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES or suffix == ".json":  # a .json named explicitly is read as JSON lines
        yield from read_jsonl(path, bad, source, text_field)
    elif suffix in PARQUET_SUFFIXES:
        yield from read_parquet(path, bad, source, text_field)
    elif suffix in ARROW_SUFFIXES:
        yield from read_arrow(path, bad, source, text_field)
    else:
        yield from read_text_file(path, bad, source)
