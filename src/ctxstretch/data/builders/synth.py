"""Synthetic builders: `synl` (LongSkywork synthetic lengthy tables, SFT) and `probes` (the evaluation's retrieval
probes as training rows, with training seeds)."""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import Field

from ...config import ConfigError
from ..datasets import Written, data_console
from ..records import BadRecords, DataError
from ..tokens import pad_id_of
from .corpus import read_corpus
from .registry import BuilderArgs, Card, Job, one_row, plain_row, progress, register


class SynlArgs(BuilderArgs):
    lengths: list[int] = Field(..., description="target lengths in tokens; each example is one row of its length")
    count: int = Field(8, description="examples per target length")
    fmt: str = Field("mixed", description="table format: markdown, csv, json or mixed")
    kinds: list[str] | None = Field(None, description="question kinds (None: all)")

    def check(self) -> None:
        from ..synl import KINDS

        bad_kinds = [kd for kd in self.kinds or KINDS if kd not in KINDS]
        if bad_kinds:
            raise ConfigError(f"kinds: {', '.join(bad_kinds)} unknown; choose from {', '.join(KINDS)}")
        if not self.lengths or self.count < 1:
            raise ConfigError("give lengths (e.g. [1024, 4096]) and count ≥ 1")

    @classmethod
    def for_stage(cls, length: int) -> dict:
        return {"lengths": [length]}


def synl(a: SynlArgs, tok) -> Job:
    """Write `count` SynL examples per target length; each example is one row of exactly its target length."""
    from rich.progress import Progress

    from ..synl import KINDS, synl_examples, synl_row

    kinds = a.kinds or list(KINDS)
    pad_id, eos_id = pad_id_of(tok), tok.eos_token_id
    examples = synl_examples(tok, a.lengths, a.count, a.seed, fmt=a.fmt, kinds=kinds)
    used: list[int] = []

    def batches() -> Iterator[dict[str, object]]:
        with Progress(console=data_console(), transient=True) as pr:
            task = pr.add_task("SynL tables", total=len(a.lengths) * a.count)
            for ex in examples:
                row = synl_row(tok, ex, ex.target, pad_id, eos_id)
                used.append(ex.n_tokens)
                pr.advance(task)
                yield one_row(row, row["segment_ids"] == 1, prompt=ex.prompt, answer=ex.answer,
                              kind=ex.question.kind, format=ex.format, table_rows=ex.n_rows, n_tokens=ex.n_tokens,
                              length=ex.target)

    def card(w: Written) -> Card:
        facts = [("examples", f"{w.rows:,}"), ("target lengths", ", ".join(f"{n:,}" for n in a.lengths)),
                 ("per length", a.count), ("question kinds", ", ".join(kinds)), ("format", a.fmt),
                 ("tokens (prompt + answer)", f"{sum(used):,} of {w.slots:,} slots")]
        return Card(facts, ["Loss is on the answer (and EOS) only; every answer is computed from the table."], used,
                    "example lengths (tokens, prompt + answer)", "example lengths")

    return Job(batches(), card, max(a.lengths), {"lengths": a.lengths})


PROBE_KINDS = ["passkey", "needle", "niah_multikey", "niah_multivalue"]  # the default kinds
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]  # the default depths


class ProbesArgs(BuilderArgs):
    kinds: list[str] | None = Field(None, description=f"probe kinds (None: {', '.join(PROBE_KINDS)})")
    lengths: list[int] = Field(..., description="probe lengths in tokens; each probe is one row of its length")
    depths: list[float] | None = Field(None, description="needle depths in [0, 1] (None: 0, 0.25, …, 1)")
    count: int = Field(4, description="probes per (kind, length, depth)")
    haystack: list[str] | None = Field(None, description="haystack sources (default: the embedded corpus' "
                                       "training split; evaluation uses the held-out split)")
    text_field: str = Field("text", description="the field/column holding the haystack's text")

    def check(self) -> None:
        from ..ruler import PROBE_KINDS as KNOWN

        unknown = [k for k in self.kinds or PROBE_KINDS if k not in KNOWN]
        if unknown:
            raise ConfigError(f"kinds: {', '.join(unknown)} unknown; choose from {', '.join(KNOWN)}")
        depths = self.depths if self.depths is not None else DEPTHS
        if not self.lengths or self.count < 1 or any(not 0 <= d <= 1 for d in depths) or not depths:
            raise ConfigError("give lengths (e.g. [1024, 4096]), count ≥ 1 and depths in [0, 1]")
        if not 0 <= self.seed < 2**40:
            raise ConfigError(f"seed {self.seed} must be in [0, 2**40) (larger seeds are evaluation seeds)")

    @classmethod
    def for_stage(cls, length: int) -> dict:
        return {"lengths": [length]}


def probes(a: ProbesArgs, tok) -> Job:
    """Retrieval probes as training rows (exactly their length, loss on the answer): `count` per (kind, length,
    depth), from the evaluation's generators with training seeds. Needle haystacks come from `haystack` sources
    (default: the embedded corpus' training split; evaluation uses the held-out split)."""
    from ..probes import ProbeBuilder
    from ..ruler import RulerBuilder, probe_examples

    kinds = a.kinds or list(PROBE_KINDS)
    depths = a.depths if a.depths is not None else DEPTHS
    hay = None
    if any(k != "passkey" for k in kinds):
        hay = read_corpus(a.haystack or ["embedded"], tok, a.text_field, BadRecords("skip")).tokens
        if len(hay) <= max(a.lengths):
            raise DataError(f"the haystack has {len(hay):,} tokens, not more than lengths {max(a.lengths):,}; "
                            "give more text as the haystack")
    builder = RulerBuilder(ProbeBuilder(tok, hay))
    cells = sum(len(a.lengths) * (len(depths) if k in ("passkey", "needle") else 1) for k in kinds)
    used: list[int] = []

    def batches() -> Iterator[dict[str, object]]:
        with progress() as pr:
            task = pr.add_task("probes", total=cells * a.count)
            examples = probe_examples(builder, kinds, a.lengths, depths, a.count, a.seed)
            while True:
                try:
                    kind, n, d, ex = next(examples)
                except StopIteration:
                    return
                except ValueError as e:  # e.g. a length too short for the needles
                    raise DataError(f"probes: {e}") from None
                answer = tok.decode(ex.input_ids[ex.labels != -100])
                pr.advance(task)
                used.append(n)
                yield one_row(plain_row(ex.input_ids, ex.labels), kind=kind, length=n, depth=d,
                              answer=answer.strip())

    def card(w: Written) -> Card:
        facts = [("kinds", ", ".join(kinds)), ("lengths", ", ".join(f"{n:,}" for n in a.lengths)),
                 ("depths (passkey, needle)", ", ".join(f"{d:g}" for d in depths)), ("per cell", a.count),
                 ("rows", f"{w.rows:,}"), ("haystack", " ".join(a.haystack or ["embedded (train split)"]))]
        return Card(facts, ["Same generators as `ctxstretch eval`, training seeds: no evaluation item is repeated. "
                            "Loss on the answer only; each row is exactly its length."], used, "probe lengths",
                    "probe lengths", seed_label="seed (training range)")

    return Job(batches(), card, max(a.lengths), {"lengths": a.lengths, "kinds": kinds})


build_synl = register("synl", SynlArgs, synl, "ctxstretch data synl (LongSkywork synthetic lengthy tables)")
build_probes = register("probes", ProbesArgs, probes, "ctxstretch data probes (retrieval probes as training data)")
