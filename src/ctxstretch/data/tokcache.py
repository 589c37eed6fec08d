"""A cache of tokenised sources: a `TokenizedCorpus` stored as memory-mapped Arrow files, keyed by (source
fingerprint, tokenizer hash, reading options), so `ctxstretch data pack|cip` tokenise a corpus once.

Layout: `$CTXSTRETCH_CACHE/tokens/<key>/` (default `~/.cache/ctxstretch/tokens`) holding `tokens.arrow` (one int32
column, every token of every document), `docs.arrow` (per document: token offset and source index) and
`meta.json` (source names, the bad records skipped while reading). Both Arrow files are written a record batch at a
time while the corpus is tokenised (`Writer`), each batch holding whole documents, and read back memory-mapped, one
zero-copy array per batch: neither writing nor reading an entry holds the tokens in memory. A source's fingerprint
is its resolved path with the size and modification time of every file under it; the embedded corpus is
fingerprinted by the interpreter's standard-library path and version. Entries are written to a temporary folder and
renamed, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from .records import BadRecord, BadRecords
from .sources import CORPORA
from .tokenized import TokenizedCorpus, as_tokens

FORMAT = 1


def cache_root() -> Path:
    """`$CTXSTRETCH_CACHE/tokens`, or `~/.cache/ctxstretch/tokens`."""
    root = os.environ.get("CTXSTRETCH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ctxstretch") / "tokens"


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's `tokenizer.json` as `tokenizers` serialises it (stable across re-saves)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def source_fingerprint(src: str) -> str:
    """Path + size + mtime of every file under `src` (or the stdlib identity for a shipped corpus)."""
    h = hashlib.sha256()
    if str(src) in CORPORA:
        h.update(f"{src}|{sysconfig.get_paths()['stdlib']}|{sys.version}".encode())
        return h.hexdigest()
    path = Path(src).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h.update(str(path).encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p.relative_to(path) if p != path else ''}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(srcs: list[str], tokenizer, text_field: str, policy: str, eos_id: int | None) -> str:
    """The entry name for these sources read with these options and this tokenizer."""
    parts = [f"v{FORMAT}", tokenizer_hash(tokenizer), text_field, policy, str(eos_id)]
    parts += [source_fingerprint(s) for s in srcs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _mmap_chunks(path: Path, name: str) -> list[np.ndarray]:
    """Column `name` of an Arrow IPC file, one zero-copy memory-mapped array per record batch."""
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return [c.to_numpy(zero_copy_only=True) for c in table.column(name).chunks]


def _mmap_column(path: Path, name: str) -> np.ndarray:
    chunks = _mmap_chunks(path, name)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _read(entry: Path) -> tuple[TokenizedCorpus, dict] | None:
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        tokens = as_tokens(_mmap_chunks(entry / "tokens.arrow", "tokens"))
        starts = _mmap_column(entry / "docs.arrow", "start")
        sources = _mmap_column(entry / "docs.arrow", "source")
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is rebuilt
    offsets = np.append(starts, len(tokens)).astype(np.int64)
    return TokenizedCorpus(tokens, offsets, np.asarray(sources), list(meta["source_names"])), meta


def load(entry: Path, bad: BadRecords) -> TokenizedCorpus | None:
    """The cached corpus at `entry` (memory-mapped), or None if there is no complete entry. Restores the bad
    records skipped when the entry was made into `bad`."""
    got = _read(entry)
    if got is None:
        return None
    corpus, meta = got
    bad.count += int(meta["bad"]["count"])
    bad.reasons.update(Counter(meta["bad"]["reasons"]))
    bad.examples.extend(BadRecord(*r) for r in meta["bad"]["examples"])
    return corpus


class CacheWriteError(OSError):
    """The token cache could not be written (read-only or full disk); the corpus can still be built without it."""


class Writer:
    """Writes a cache entry while the corpus is tokenised (`TokenizedCorpus.build(..., sink=writer)`): each chunk of
    whole documents is appended to `tokens.arrow` and `docs.arrow` as one Arrow record batch, so nothing but the
    chunk being written is held in memory; `close` renames the entry into place and returns it memory-mapped.
    Use it as a context manager: an unfinished entry (an error, an interrupt) is removed. Failures to write raise
    `CacheWriteError`."""

    def __init__(self, entry: Path, bad: BadRecords):
        import pyarrow as pa

        self.entry, self.bad = entry, bad
        self.tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        self.tokens = self.documents = 0
        self._open: list = []  # (ipc writer, file), closed in order
        self._schemas = {"tokens.arrow": pa.schema([("tokens", pa.int32())]),
                         "docs.arrow": pa.schema([("start", pa.int64()), ("source", pa.int32())])}
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
            for name, schema in self._schemas.items():
                sink = pa.OSFile(str(self.tmp / name), "wb")
                self._open.append((pa.ipc.new_file(sink, schema), sink))
        except OSError as e:
            self.abort()
            raise CacheWriteError(e.errno, e.strerror or str(e)) from e

    def write(self, tokens: np.ndarray, lengths: np.ndarray, sources: np.ndarray) -> None:
        """Append documents: their tokens back to back, tokens per document, source index per document."""
        import pyarrow as pa

        starts = np.empty(len(lengths), dtype=np.int64)
        if len(lengths):
            starts[0] = 0
            np.cumsum(lengths[:-1], out=starts[1:])
        starts += self.tokens
        try:
            (tok_w, _), (doc_w, _) = self._open
            tok_w.write_batch(pa.record_batch([pa.array(np.asarray(tokens, dtype=np.int32))],
                                              schema=self._schemas["tokens.arrow"]))
            doc_w.write_batch(pa.record_batch([pa.array(starts), pa.array(np.asarray(sources, dtype=np.int32))],
                                              schema=self._schemas["docs.arrow"]))
        except OSError as e:
            raise CacheWriteError(e.errno, e.strerror or str(e)) from e
        self.tokens += len(tokens)
        self.documents += len(lengths)

    def close(self, source_names: list[str]) -> TokenizedCorpus:
        """Finish the entry and return it memory-mapped (an empty corpus leaves no entry)."""
        try:
            self._close_files()
            if not self.documents:
                self.abort()
                return TokenizedCorpus(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64),
                                       np.zeros(0, dtype=np.int32), list(source_names))
            bad = self.bad
            bad_meta = {"count": bad.count, "reasons": dict(bad.reasons),
                        "examples": [[r.path, r.line, r.reason] for r in bad.examples]}
            (self.tmp / "meta.json").write_text(json.dumps({
                "format": FORMAT, "source_names": list(source_names), "documents": self.documents,
                "tokens": self.tokens, "bad": bad_meta}))
            if self.entry.exists():
                shutil.rmtree(self.entry)
            os.replace(self.tmp, self.entry)
        except OSError as e:
            self.abort()
            raise CacheWriteError(e.errno, e.strerror or str(e)) from e
        got = _read(self.entry)
        if got is None:
            raise CacheWriteError(None, f"cannot read back the token cache entry {self.entry}")
        return got[0]

    def _close_files(self) -> None:
        opened, self._open = self._open, []
        for writer, sink in opened:
            try:
                writer.close()
            finally:
                sink.close()

    def abort(self) -> None:
        """Drop the unfinished entry."""
        try:
            self._close_files()
        except OSError:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # after close() this only finds nothing left to remove
