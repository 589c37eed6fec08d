"""Text sources for the builders (and the training stages): read and tokenise them through the token cache, with the
arguments every source-reading builder takes."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ...config import ConfigError
from ..datasets import data_console
from ..readers import read_sources
from ..records import BadRecords, DataError
from ..tokenized import TokenizedCorpus
from .registry import BuilderArgs


class SourceArgs(BuilderArgs):
    """A builder that reads text sources."""

    srcs: list[str] = Field(default_factory=lambda: ["embedded"],
                            description="text/JSONL/Parquet/Arrow files, folders, saved datasets, 'embedded'")
    on_bad_record: str = Field("fail", description="fail: stop at the first bad record; skip: count it and go on")
    text_field: str = Field("text", description="the field/column holding the text (JSONL, Parquet, Arrow, datasets)")
    cache: bool = Field(True, description="reuse/keep tokenised sources in $CTXSTRETCH_CACHE/tokens")

    def corpus(self, tok) -> tuple[TokenizedCorpus, BadRecords]:
        """The sources tokenised (each document + EOS), and the bad records met on the way."""
        bad = BadRecords(self.on_bad_record)  # type: ignore[arg-type]
        return read_corpus(self.srcs, tok, self.text_field, bad, self.cache), bad


def read_corpus(srcs: list[str], tok, text_field: str, bad: BadRecords, cache: bool = True) -> TokenizedCorpus:
    """Read and tokenise `srcs` (each document + EOS), through the token cache (`data/tokcache.py`) unless
    `cache=False`. Raises DataError when no usable document is left."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from .. import tokcache

    if not srcs:
        raise ConfigError("give at least one source (files, folders, a saved dataset or 'embedded')")
    entry = None
    if cache:
        entry = tokcache.cache_root() / tokcache.cache_key(list(map(str, srcs)), tok, text_field, bad.policy,
                                                           tok.eos_token_id)
        corpus = tokcache.load(entry, bad)
        if corpus is not None:
            data_console().print(f"tokens from the cache: {entry}", highlight=False)
            return _nonempty(corpus, srcs, bad)
    sink = None
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            sink = tokcache.Writer(entry, bad)
        except OSError as e:  # a read-only or full cache never stops a build
            _cache_warning(entry, e)
    corpus = None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=data_console(), transient=True) as pr:
        task = pr.add_task("tokenising")

        def tokenise(sink) -> TokenizedCorpus:
            return TokenizedCorpus.build(
                tok, read_sources(srcs, text_field=text_field, bad=bad), eos_id=tok.eos_token_id, sink=sink,
                progress=lambda d, n: pr.update(task, description=f"tokenising: {d:,} documents, {n:,} tokens"))

        if sink is not None:  # streamed into the cache as it is tokenised, and read back memory-mapped
            before = (bad.count, bad.reasons.copy(), list(bad.examples))
            try:
                with sink:
                    corpus = tokenise(sink)
            except tokcache.CacheWriteError as e:  # e.g. the disk filled up: read everything again, uncached
                _cache_warning(entry, e)
                bad.count, bad.reasons, bad.examples = before
        if corpus is None:
            corpus = tokenise(None)
    return _nonempty(corpus, srcs, bad)


def _cache_warning(entry, e: OSError) -> None:
    data_console().print(f"[yellow]warning[/]: cannot write the token cache {entry} ({e.strerror or e})")


def _nonempty(corpus: TokenizedCorpus, srcs: list[str], bad: BadRecords) -> TokenizedCorpus:
    if not len(corpus):
        raise DataError(f"no usable documents in {' '.join(srcs)}"
                        + (f" ({bad.count} bad records skipped)" if bad.count else ""))
    return corpus


def sources_section(corpus: TokenizedCorpus, order: np.ndarray) -> str:
    """The card's table of sources: documents, tokens, and tokens used after weighting (`order`)."""
    lines = ["| source | documents | tokens | tokens used (after weighting) |", "|---|---:|---:|---:|"]
    lengths = corpus.lengths
    for s, name in enumerate(corpus.source_names):
        mine = corpus.sources == s
        used = int(lengths[order][corpus.sources[order] == s].sum())
        lines.append(f"| {name} | {int(mine.sum()):,} | {int(lengths[mine].sum()):,} | {used:,} |")
    return "\n".join(lines)
