"""Text sources every Python install carries, so nothing is downloaded: the running interpreter's standard-library
sources and the `pydoc_data` help topics.

Two corpora read them: `embedded` (one document per file and per help topic: the embedded model's corpus) and
`stdlib` (one document per package: its files concatenated, each under a path header — repository-level code, the
long-document kind ProLong found best for long context — plus the help topics as one reference document). Both
hold out the same files and topics for evaluation (`HELDOUT_EVERY`)."""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .tokens import tokenize_batches

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELDOUT_EVERY = 20  # one document in 20 (by a hash of its name) is held out for evaluation


def _is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


def _stdlib_files() -> list[tuple[str, Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(stdlib).parts))
    return [(p.relative_to(stdlib).as_posix(), p) for p in files]


def _check_split(split: str) -> bool:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    return split == "heldout"


def _topics(want_heldout: bool) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(key, topics[key].strip()) for key in sorted(topics)
            if _is_heldout("pydoc:" + key) == want_heldout and topics[key].strip()]


def embedded_documents(split: str = "train") -> Iterator[str]:
    """Yield the embedded corpus' documents in a fixed order; `split` is "train" or "heldout"."""
    want_heldout = _check_split(split)
    for name, path in _stdlib_files():
        if _is_heldout(name) != want_heldout:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield text
    for _, text in _topics(want_heldout):
        yield text


def stdlib_documents(split: str = "train") -> Iterator[str]:
    """Package-level documents: every file of a top-level package (`email/…`, `asyncio/…`) in one document, each
    under a `# file: PATH` header; a top-level module is its own document; the help topics form one document.
    The files and topics of `split` are those of `embedded_documents(split)`."""
    want_heldout = _check_split(split)
    packages: dict[str, list[str]] = {}
    for name, path in _stdlib_files():
        if _is_heldout(name) != want_heldout:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            packages.setdefault(name.split("/")[0], []).append(f"# file: {name}\n{text}")
    for key in sorted(packages):
        yield "\n\n".join(packages[key])
    topics = _topics(want_heldout)
    if topics:
        yield "\n\n".join(f"{key}\n{'=' * len(key)}\n{text}" for key, text in topics)


EMBEDDED = "embedded"
CORPORA = {EMBEDDED: embedded_documents, "stdlib": stdlib_documents}


def tokenize_documents(tokenizer, docs: Iterable[str], eos_id: int, batch: int = 256) -> np.ndarray:
    """Tokenise documents in batches into one flat uint16/int32 array, each document followed by `eos_id`."""
    parts = list(tokenize_batches(tokenizer, docs, batch=batch, eos_id=eos_id))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return flat.astype(np.uint16) if flat.size and flat.max() < 2**16 else flat


def embedded_token_stream(tokenizer, split: str, cache_dir: Path | None = None, corpus: str = "embedded"
                          ) -> np.ndarray:
    """A shipped corpus (`CORPORA`) as one token array, cached as `.npy` (no pickles) keyed by corpus, tokenizer
    and split."""
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    key = zlib.crc32(tokenizer.backend_tokenizer.to_str().encode()) if hasattr(tokenizer, "backend_tokenizer") else 0
    if cache_dir is not None:
        path = Path(cache_dir) / f"{corpus}-{split}-{key:08x}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
    arr = tokenize_documents(tokenizer, CORPORA[corpus](split), eos_id)
    if cache_dir is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
        tmp.replace(path)
    return arr
