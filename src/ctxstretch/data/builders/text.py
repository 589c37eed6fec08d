"""Builders over text sources: `pack` (documents packed into rows, keeping their boundaries) and `cip` (LongSkywork
chunk-interleaved pretraining rows)."""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from ...config import ConfigError
from ..datasets import Written, bad_section, rows_batches
from ..packing import iter_packed
from ..tokens import pad_id_of
from ..weighting import plan_documents
from .corpus import SourceArgs, sources_section
from .registry import Card, Job, register

DOC_LENGTHS = "document lengths (tokens, incl. EOS)"


class PackArgs(SourceArgs):
    length: int = Field(4096, description="tokens per row")
    long_threshold: int = Field(0, description="documents of at least this many tokens are upsampled (0: none)")
    long_weight: float = Field(1.0, description="sampling weight of long documents (Llama 2 Long)")
    mix: str | None = Field(None, description="per-source token shares, e.g. embedded=1,notes=3 (every source "
                            "needs one)")
    split_short: bool = Field(True, description="fill every row (documents may cross row ends)")

    def check(self) -> None:
        if self.length < 2:
            raise ConfigError(f"length {self.length} must be at least 2")


def pack(a: PackArgs, tok) -> Job:
    """Tokenise `srcs`, weight and shuffle documents (`plan_documents`), pack rows of `length` tokens, write `out`."""
    corpus, bad = a.corpus(tok)
    weights = parse_mix(a.mix, corpus.source_names)
    order = plan_documents(corpus.lengths, corpus.sources, a.rng(), source_weights=weights,
                           long_threshold=a.long_threshold, long_weight=a.long_weight)
    blocks = iter_packed(corpus.docs(order), a.length, pad_id=pad_id_of(tok), split_short=a.split_short)

    def card(w: Written) -> Card:
        facts = [("documents read", f"{len(corpus):,}"), ("documents packed (after weighting)", f"{len(order):,}"),
                 ("tokens read", f"{int(corpus.lengths.sum()):,}"), ("rows", f"{w.rows:,} × {a.length:,} tokens"),
                 ("real tokens / slots", f"{w.real_tokens:,} / {w.slots:,}"),
                 ("long-document upsampling", f"×{a.long_weight} at ≥ {a.long_threshold:,} tokens"
                  if a.long_threshold else "off"), ("split short documents", a.split_short),
                 ("bad records skipped", f"{bad.count:,}")]
        return Card(facts, [sources_section(corpus, order), "", bad_section(bad)], corpus.lengths, DOC_LENGTHS,
                    "document lengths")

    return Job(rows_batches(blocks), card, a.length)


def parse_mix(text: str | None, names: list[str]) -> np.ndarray | None:
    """"name=w,name=w" → weights aligned with `names` (every source needs one)."""
    if not text:
        return None
    given: dict[str, float] = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        try:
            given[name.strip()] = float(w)
        except ValueError:
            raise ConfigError(f"mix: '{part}' is not name=weight (e.g. embedded=1,notes=3)") from None
    unknown = set(given) - set(names)
    missing = set(names) - set(given)
    if unknown or missing:
        raise ConfigError(f"mix names {', '.join(sorted(unknown or missing))} "
                          f"{'are not sources' if unknown else 'have no weight'}; sources: {', '.join(names)}")
    return np.array([given[n] for n in names])


class CipArgs(SourceArgs):
    length: int = Field(4096, description="tokens per row")
    k: int = Field(0, description="documents per group (0: as many as fill a row)")
    chunk_len: int = Field(512, description="tokens per chunk")
    interleave: str = Field("round_robin", description="round_robin (also round-robin) or random")

    @field_validator("interleave")
    @classmethod
    def _underscores(cls, v: str) -> str:
        return v.replace("-", "_")

    def check(self) -> None:
        from ..cip import INTERLEAVES

        if self.interleave not in INTERLEAVES:
            raise ConfigError(f"interleave must be round-robin or random, not {self.interleave!r}")
        if self.length < 2 or self.chunk_len < 1 or self.k < 0:
            raise ConfigError("length must be ≥ 2, chunk_len ≥ 1 and k ≥ 0")


def cip(a: CipArgs, tok) -> Job:
    """Tokenise `srcs`, shuffle documents, and write LongSkywork CIP rows of `length` tokens to `out`."""
    from ..cip import iter_cip_rows

    corpus, bad = a.corpus(tok)
    rng = a.rng()
    order = rng.permutation(len(corpus))
    blocks = iter_cip_rows(corpus.docs(order), a.length, k=a.k, chunk_len=a.chunk_len, mode=a.interleave, rng=rng,
                           pad_id=pad_id_of(tok))

    def card(w: Written) -> Card:
        facts = [("documents", f"{len(corpus):,}"), ("tokens", f"{int(corpus.lengths.sum()):,}"),
                 ("rows", f"{w.rows:,} × {a.length:,} tokens"),
                 ("real tokens / slots", f"{w.real_tokens:,} / {w.slots:,}"),
                 ("documents per group (k)", a.k or "fill a row"), ("chunk length", f"{a.chunk_len:,} tokens"),
                 ("interleave", a.interleave), ("bad records skipped", f"{bad.count:,}")]
        return Card(facts, [sources_section(corpus, order), "", bad_section(bad)], corpus.lengths, DOC_LENGTHS,
                    "document lengths")

    return Job(rows_batches(blocks), card, a.length)


build_pack = register("pack", PackArgs, pack, "ctxstretch data pack", positional=("srcs",))
build_cip = register("cip", CipArgs, cip, "ctxstretch data cip (LongSkywork chunk-interleaved pretraining)",
                     positional=("srcs",))
