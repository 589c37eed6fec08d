"""A training stage's data: its text stream and its row mixer (the data-building stages run `ctxstretch data`
builders, see `stages.BuildStage`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.builders import read_corpus
from ..data.mix import DatasetRows, RowMixer
from ..data.records import BadRecords
from ..data.tokens import pad_id_of

if TYPE_CHECKING:
    from .config import StageConfig


def text_stream(sources: list[str], tokenizer, text_field: str = "text") -> np.ndarray:
    """The stage's text sources as one int32 token array, documents separated by EOS, through the token cache that
    `ctxstretch data` uses (`data/tokcache.py`: keyed by each source's files, sizes and mtimes and the tokenizer's
    hash; written atomically; a bad record fails with its file and line)."""
    corpus = read_corpus([str(s) for s in sources], tokenizer, text_field, BadRecords("fail"))
    return np.asarray(corpus.tokens)


def stage_rows(stage: StageConfig, tokenizer, seed: int, dataset_dir: Path | None) -> RowMixer:
    """The row function (`index → batch`) of a training stage."""
    d = stage.data
    dataset = None
    if dataset_dir:
        dataset = DatasetRows(str(dataset_dir), stage.train_length, pad_id_of(tokenizer), tokenizer)
    select = impactful_selector(tokenizer, d.scorer) if d.select == "impactful" else None
    return RowMixer(
        tokenizer, text_stream(d.text, tokenizer, d.text_field), name=stage.name, seed=seed,
        length=stage.train_length, batch=stage.train.batch_size, mix={k: v for k, v in d.mix.items() if v > 0},
        positions=stage.positions, target=stage.target, contiguous_share=stage.contiguous_share,
        long_threshold=d.long_threshold, long_weight=d.long_weight, cip_k=d.cip_k, cip_chunk=d.cip_chunk,
        dataset=dataset, select=select)


def impactful_selector(tokenizer, scorer: str | None, device: str = "cpu"):
    """LongRecipe §4.1: `select(rng, window, n)` keeps the sentences of `window` that hold impactful tokens and
    returns the first `n` tokens of what is left (positions are then computed on the kept text, §4.2). Tokens are
    scored by `scorer` (a model directory: full against truncated context) or, without one, by the digit
    heuristic."""
    from ..data.impactful import LogprobDelta, digit_vocab, impactful_rows
    from ..data.sentences import BoundaryVocab
    from ..models import load, resolve

    score = LogprobDelta(load(resolve(scorer), device)[0]) if scorer else None
    boundaries, digits = BoundaryVocab.from_tokenizer(tokenizer), digit_vocab(tokenizer)

    def select(rng: np.random.Generator, window: np.ndarray, n: int) -> np.ndarray:
        row = next(impactful_rows(tokenizer, [window], n, rng, scorer=score, boundaries=boundaries, digits=digits),
                   None)
        return row if row is not None else window[:n]  # too few impactful sentences: keep the text as it is

    return select
