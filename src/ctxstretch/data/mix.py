"""Training rows: a seeded mix of plain text, the papers' synthetic data and retrieval probes, each row given position
ids by a position-index transform. `RowMixer(index)` is a pure function of (name, seed, index), so resumed runs see
the same rows as uninterrupted ones.

Row kinds (all rows are `length` tokens):
- `text`: a window of the token stream; documents of ≥ `long_threshold` tokens drawn `long_weight`× as often
  (Llama 2 Long, Xiong et al. 2023, §4.2: long texts upsampled);
- `cip`: k windows of the stream chunk-interleaved into one row (LongSkywork CIP, see `data/cip.py`);
- `synl`: a synthetic lengthy table + question, loss on the answer (LongSkywork SynL, see `data/synl.py`);
- `passkey`, `needle`, `text_copy`, `random_copy`: retrieval probes with training seeds (see `data/probes.py`);
- `dataset`: a row of a `ctxstretch data` output directory (padded to the row length in its own segment).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..positions import transform
from .probes import IGNORE, ProbeBuilder, rng_for
from .sentences import BoundaryVocab
from .tokens import pad_id_of

ROW_KINDS = ("text", "passkey", "needle", "text_copy", "random_copy", "cip", "synl", "dataset")
Example = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]  # ids, labels, segments, positions


class TextSampler:
    """Windows of a flat token stream whose documents are separated by `eos_id`; a window starts inside a document
    chosen with probability ∝ its length, times `long_weight` when it has ≥ `long_threshold` tokens."""

    def __init__(self, stream: np.ndarray, eos_id: int | None, long_threshold: int = 0, long_weight: float = 1.0):
        self.stream = stream
        ends = np.flatnonzero(stream == eos_id) + 1 if eos_id is not None else np.zeros(0, dtype=np.int64)
        bounds = np.unique(np.concatenate([[0], ends, [len(stream)]]))
        self.starts, lengths = bounds[:-1], np.diff(bounds)
        weights = lengths * np.where((lengths >= long_threshold) & (long_threshold > 0), long_weight, 1.0)
        self.cum = np.cumsum(weights / weights.sum())
        self.lengths, self.uniform = lengths, long_threshold <= 0 or long_weight == 1.0

    def window(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.uniform:  # every token equally likely to start a window: documents weighted by length
            start = int(rng.integers(0, len(self.stream) - n))
            return np.asarray(self.stream[start : start + n], dtype=np.int64)
        doc = min(int(np.searchsorted(self.cum, rng.random(), side="right")), len(self.cum) - 1)
        start = int(self.starts[doc] + rng.integers(0, max(1, self.lengths[doc] - n // 2)))
        start = min(start, len(self.stream) - n)
        return np.asarray(self.stream[start : start + n], dtype=np.int64)


class DatasetRows:
    """Rows of a `ctxstretch data` output directory (an Arrow dataset with input_ids/labels/position_ids/
    segment_ids), memory-mapped; row lengths must not exceed the training row length."""

    def __init__(self, path: str, length: int, pad_id: int, tokenizer=None):
        import datasets

        from .datasets import check_dataset_tokenizer
        from .records import DataError

        if tokenizer is not None:  # refuses rows built by another tokenizer, or longer than the stage's rows
            check_dataset_tokenizer(Path(path), tokenizer, length)
        try:
            self.ds = datasets.load_from_disk(path).with_format("numpy")
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not a dataset written by `ctxstretch data` ({e}); build one with "
                            "`ctxstretch data pack|cip|synl|... --out DIR`") from None
        missing = {"input_ids", "labels"} - set(self.ds.column_names)
        if missing:
            raise DataError(f"{path}: the dataset lacks the columns {sorted(missing)}; build it with `ctxstretch data`")
        if len(self.ds) == 0:
            raise DataError(f"{path}: the dataset has no rows; rebuild it with more input")
        self.length, self.pad_id = length, pad_id

    def __len__(self) -> int:
        return len(self.ds)

    def example(self, rng: np.random.Generator) -> Example:
        row = self.ds[int(rng.integers(0, len(self.ds)))]
        ids, labels = np.asarray(row["input_ids"], np.int64), np.asarray(row["labels"], np.int64)
        seg = np.asarray(row.get("segment_ids", np.zeros_like(ids)), np.int64)
        pos = np.asarray(row.get("position_ids", np.arange(len(ids))), np.int64)
        pad = self.length - len(ids)
        if pad < 0:
            from .records import DataError

            raise DataError(f"a dataset row of {len(ids):,} tokens exceeds the stage's rows of {self.length:,}; "
                            "raise the stage's train_length or rebuild the dataset shorter")
        if pad:
            ids = np.concatenate([ids, np.full(pad, self.pad_id, np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE, np.int64)])
            seg = np.concatenate([seg, np.full(pad, seg.max() + 1, np.int64)])
            pos = np.concatenate([pos, np.arange(pad, dtype=np.int64)])
        return ids, labels, seg, pos


class RowMixer:
    """Rows of `length` tokens drawn from `stream` (a flat token array, documents separated by EOS) and synthetic
    kinds, `batch` per call.

    mix: weight per row kind (see ROW_KINDS). positions: a transform from `ctxstretch.positions`; with it, rows that
    are one attention segment carry positions spread over `[0, target)`, except a `contiguous_share` kept at
    0..length-1. Rows with several segments (padded SFT rows, dataset rows) keep their own positions.
    """

    def __init__(
        self, tokenizer, stream: np.ndarray, *, name: str, seed: int, length: int, batch: int,
        mix: dict[str, float], positions: str = "full", target: int | None = None, contiguous_share: float = 0.0,
        long_threshold: int = 0, long_weight: float = 1.0, cip_k: int = 4, cip_chunk: int = 0,
        dataset: DatasetRows | None = None, select: Callable[[np.random.Generator, np.ndarray, int], np.ndarray]
        | None = None,
    ):
        unknown = set(mix) - set(ROW_KINDS)
        if unknown:
            raise ValueError(f"unknown row kinds {sorted(unknown)}; choose from {', '.join(ROW_KINDS)}")
        if len(stream) <= length:
            raise ValueError(f"the text stream has {len(stream)} tokens, fewer than one row of {length}")
        if mix.get("dataset") and dataset is None:
            raise ValueError("the mix asks for dataset rows but no dataset was given")
        self.tokenizer, self.builder = tokenizer, ProbeBuilder(tokenizer, stream)
        self.text = TextSampler(stream, tokenizer.eos_token_id, long_threshold, long_weight)
        self.stream, self.length, self.batch, self.name, self.seed = stream, length, batch, name, seed
        self.kinds = list(mix)
        self.weights = np.array(list(mix.values()), dtype=float) / sum(mix.values())
        self.positions, self.target, self.contiguous_share = positions, target or length, contiguous_share
        self.cip_k, self.cip_chunk, self.dataset, self.select = cip_k, cip_chunk or max(1, length // 8), dataset, select
        self.pad_id = pad_id_of(tokenizer)
        self.boundaries = BoundaryVocab.from_tokenizer(tokenizer) if positions == "longrecipe" else None

    def example(self, rng: np.random.Generator, kind: str) -> Example:
        n, b = self.length, self.builder
        if kind == "text":
            ids = self.select(rng, self.text.window(rng, 3 * n), n) if self.select else self.text.window(rng, n)
            return ids, ids.copy(), None, None
        if kind == "cip":
            ids = self._cip(rng, n)
            return ids, ids.copy(), None, None
        if kind == "synl":
            return self._synl(rng, n)
        if kind == "dataset":
            return self.dataset.example(rng)
        if kind == "random_copy":
            ex = b.copy(rng, n, span=int(rng.integers(n // 4, n // 2 + 1)), random_tokens=True)
        elif kind == "text_copy":
            ex = b.copy(rng, n, span=int(rng.integers(8, n // 2 + 1)))
        elif kind == "passkey":
            ex = b.passkey(rng, n, float(rng.random()))
        else:
            ex = b.needle(rng, n, float(rng.random()))
        return ex.input_ids, ex.labels, None, None

    def _cip(self, rng: np.random.Generator, n: int) -> np.ndarray:
        from .cip import cip_sequence

        k = max(1, min(self.cip_k, n // self.cip_chunk))
        sizes = np.full(k, n // k)
        sizes[: n % k] += 1
        ids, _ = cip_sequence([self.text.window(rng, int(s)) for s in sizes], self.cip_chunk)
        return ids

    def _synl(self, rng: np.random.Generator, n: int) -> Example:
        from .synl import FORMATS, KINDS, synl_example, synl_row

        ex = synl_example(self.tokenizer, n, rng, fmt=FORMATS[int(rng.integers(len(FORMATS)))],
                          kind=KINDS[int(rng.integers(len(KINDS)))])
        row = synl_row(self.tokenizer, ex, n, self.pad_id, self.tokenizer.eos_token_id)
        return row["input_ids"], row["labels"], row["segment_ids"], row["position_ids"]

    def position_ids(self, rng: np.random.Generator, ids: np.ndarray) -> np.ndarray:
        if self.positions == "full" or rng.random() < self.contiguous_share:
            return np.arange(len(ids), dtype=np.int64)
        ends = self.boundaries.sentence_ends(ids) if self.boundaries is not None else None
        return transform(self.positions, rng, len(ids), self.target, ends)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = rng_for(f"{self.name}-{index}", self.seed, evaluation=False)
        rows: list[list[np.ndarray]] = [[], [], [], []]
        for _ in range(self.batch):
            kind = self.kinds[rng.choice(len(self.kinds), p=self.weights)]
            ids, labels, seg, pos = self.example(rng, kind)
            if pos is None:
                pos = self.position_ids(rng, ids)
            for column, value in zip(rows, (ids, labels, np.zeros_like(ids) if seg is None else seg, pos),
                                     strict=True):
                column.append(value)
        ids_t, labels_t, seg_t, pos_t = (torch.tensor(np.stack(c)) for c in rows)
        return {"input_ids": ids_t, "labels": labels_t, "position_ids": pos_t, "segment_ids": seg_t}
