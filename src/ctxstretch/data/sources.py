"""Text sources. The embedded corpus is text every Python install carries: the running interpreter's
standard-library sources and the `pydoc_data` help topics, so nothing is downloaded."""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELDOUT_EVERY = 20  # one document in 20 (by a hash of its name) is held out for evaluation


def _is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % HELDOUT_EVERY == 0


def embedded_documents(split: str = "train") -> Iterator[str]:
    """Yield the embedded corpus' documents in a fixed order; `split` is "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    want_heldout = split == "heldout"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in stdlib.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(stdlib).parts)
    )
    for path in files:
        name = path.relative_to(stdlib).as_posix()
        if _is_heldout(name) != want_heldout:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            yield text
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if _is_heldout("pydoc:" + key) == want_heldout and topics[key].strip():
            yield topics[key].strip()


def tokenize_documents(tokenizer, docs: Iterable[str], eos_id: int, batch: int = 256) -> np.ndarray:
    """Tokenise documents in batches into one flat uint16/int32 array, each document followed by `eos_id`."""
    from .packing import tokenize_batches  # packing builds on sources; imported here to keep that direction

    parts = list(tokenize_batches(tokenizer, docs, batch=batch, eos_id=eos_id))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return flat.astype(np.uint16) if flat.size and flat.max() < 2**16 else flat


def embedded_token_stream(tokenizer, split: str, cache_dir: Path | None = None) -> np.ndarray:
    """The embedded corpus as one token array, cached as `.npy` (no pickles) keyed by tokenizer and split."""
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    key = zlib.crc32(tokenizer.backend_tokenizer.to_str().encode()) if hasattr(tokenizer, "backend_tokenizer") else 0
    if cache_dir is not None:
        path = Path(cache_dir) / f"embedded-{split}-{key:08x}.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
    arr = tokenize_documents(tokenizer, embedded_documents(split), eos_id)
    if cache_dir is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
        tmp.replace(path)
    return arr
