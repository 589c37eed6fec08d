"""A cache of tokenised sources: a `TokenizedCorpus` stored as memory-mapped Arrow files, keyed by (source
fingerprint, tokenizer hash, reading options), so `ctxstretch data pack|cip` tokenise a corpus once.

Layout: `$CTXSTRETCH_CACHE/tokens/<key>/` (default `~/.cache/ctxstretch/tokens`) holding `tokens.arrow` (one int32
column, every token of every document), `docs.arrow` (per document: token offset and source index) and
`meta.json` (source names, the bad records skipped while reading). A source's fingerprint is its resolved path
with the size and modification time of every file under it; the embedded corpus is fingerprinted by the
interpreter's standard-library path and version. Entries are written to a temporary folder and renamed, so a
reader never sees half an entry.
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

from .packing import TokenizedCorpus
from .readers import EMBEDDED, BadRecord, BadRecords

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
    """Path + size + mtime of every file under `src` (or the stdlib identity for the embedded corpus)."""
    h = hashlib.sha256()
    if str(src) == EMBEDDED:
        h.update(f"embedded|{sysconfig.get_paths()['stdlib']}|{sys.version}".encode())
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


def _mmap_column(path: Path, name: str) -> np.ndarray:
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy(zero_copy_only=True)
    return col.to_numpy()


def load(entry: Path, bad: BadRecords) -> TokenizedCorpus | None:
    """The cached corpus at `entry` (memory-mapped), or None if there is no complete entry. Restores the bad
    records skipped when the entry was made into `bad`."""
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        tokens = _mmap_column(entry / "tokens.arrow", "tokens")
        starts = _mmap_column(entry / "docs.arrow", "start")
        sources = _mmap_column(entry / "docs.arrow", "source")
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is rebuilt
    offsets = np.append(starts, len(tokens)).astype(np.int64)
    bad.count += int(meta["bad"]["count"])
    bad.reasons.update(Counter(meta["bad"]["reasons"]))
    bad.examples.extend(BadRecord(*r) for r in meta["bad"]["examples"])
    return TokenizedCorpus(tokens, offsets, np.asarray(sources), list(meta["source_names"]))


def store(entry: Path, corpus: TokenizedCorpus, bad: BadRecords) -> None:
    """Write `corpus` as a cache entry (atomically: a temporary folder renamed into place)."""
    import pyarrow as pa

    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, table in (
            ("tokens.arrow", pa.table({"tokens": pa.array(np.asarray(corpus.tokens, dtype=np.int32))})),
            ("docs.arrow", pa.table({"start": pa.array(corpus.offsets[:-1].astype(np.int64)),
                                     "source": pa.array(np.asarray(corpus.sources, dtype=np.int32))})),
        ):
            with pa.OSFile(str(tmp / name), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
        bad_meta = {"count": bad.count, "reasons": dict(bad.reasons),
                    "examples": [[r.path, r.line, r.reason] for r in bad.examples]}
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "source_names": corpus.source_names,
                                                   "documents": len(corpus), "tokens": int(len(corpus.tokens)),
                                                   "bad": bad_meta}))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
