"""The builder registry: a `ctxstretch data` builder is a typed argument model and a function from those arguments
(and the tokenizer) to rows and a card. `run_builder` does what every builder shares, once: validate the arguments,
refuse an existing output, load the tokenizer, write the dataset folder with its card and `ctxstretch.json`."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from ...config import ConfigError, Strict, check_out_dir, parse
from ..datasets import Written, card_text, dataset_meta, length_histogram, load_tokenizer, write_dataset
from ..packing import ROW_FIELDS

PYTHON_API = "(Python API)"  # what a card's `command` says for a build not run from the command line


class BuilderArgs(Strict):
    """What every builder takes."""

    model: str = Field("embedded", description="local HF model directory (its tokenizer), or 'embedded'")
    seed: int = Field(0, description="random seed")

    @field_validator("*", mode="before")
    @classmethod
    def _paths_as_text(cls, v):  # the Python API takes Path objects where a setting is a path
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, list | tuple):
            return [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v]
        return v

    def check(self) -> None:
        """Refuse settings that cannot work (a ConfigError naming the argument), before anything is read."""

    def rng(self) -> np.random.Generator:
        """The builder's random generator: every draw of a build comes from `seed`."""
        return np.random.default_rng(self.seed)

    @classmethod
    def for_stage(cls, length: int) -> dict:
        """What a pipeline's build stage fills in from its row length when its `args` leave it out."""
        return {"length": length}


@dataclass
class Card:
    """What a dataset's `card.md` says beyond the seed and the command, and its length histogram."""

    facts: list[tuple[str, object]]
    sections: list[str]
    lengths: Iterable[int]  # the histogram's values, in tokens
    label: str  # the histogram's title
    alt: str  # the histogram's alt text in the card
    seed_label: str = "seed"


@dataclass
class Job:
    """A builder's output before it is written: batches of rows (`write_dataset`'s format), the card (called once
    every row is written), the row length `ctxstretch.json` records, and its other fields."""

    rows: Iterable[dict[str, object]]
    card: Callable[[Written], Card]
    length: int
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Builder:
    kind: str
    args: type[BuilderArgs]
    run: Callable[..., Job]  # (args, tokenizer) -> Job
    title: str  # the card's heading
    positional: tuple[str, ...]  # the arguments the Python API takes by position, before `out`


REGISTRY: dict[str, Builder] = {}


def builder(kind: str) -> Builder:
    if kind not in REGISTRY:
        raise ConfigError(f"unknown builder '{kind}'; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[kind]


def builder_args(kind: str, args: BuilderArgs | dict, where: str | None = None) -> BuilderArgs:
    """`args` validated into the builder's argument model and checked; `where` (e.g. a pipeline stage) starts
    every error message."""
    spec = builder(kind)
    a = args if isinstance(args, spec.args) else parse(spec.args, dict(args), where or f"{kind} builder")
    try:
        a.check()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return a


def run_builder(kind: str, args: BuilderArgs | dict, out: Path, *, force: bool = False,
                command: str = PYTHON_API) -> Written:
    """Build `kind` data with `args` into the dataset folder `out` (refused if it exists, unless `force`)."""
    spec, out = builder(kind), Path(out)
    a = builder_args(kind, args)
    check_out_dir(out, force)
    tok = load_tokenizer(a.model)
    job = spec.run(a, tok)

    def card(w: Written, folder: Path) -> str:
        c = job.card(w)
        length_histogram(np.asarray(c.lengths), folder / "lengths.png", c.label)
        facts = [*c.facts, (c.seed_label, a.seed), ("command", f"`{command}`")]
        return card_text(spec.title, facts, [*c.sections, "", f"![{c.alt}](lengths.png)"])

    return write_dataset(out, job.rows, card, force,
                         dataset_meta(kind, a.model, tok, job.length, **job.meta, seed=a.seed, command=command))


def register(kind: str, args: type[BuilderArgs], run: Callable[..., Job], title: str,
             positional: tuple[str, ...] = ()) -> Callable[..., Written]:
    """Add a builder; returns its Python API, `build_KIND(*positional, out, **args, force=False, command=...)`,
    whose signature (names, defaults) is the argument model's."""
    REGISTRY[kind] = Builder(kind, args, run, title, positional)
    P = inspect.Parameter
    fields = args.model_fields
    params = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=fields[n].annotation) for n in positional]
    params.append(P("out", P.POSITIONAL_OR_KEYWORD, annotation=Path))
    params += [P(n, P.KEYWORD_ONLY, annotation=f.annotation,
                 default=P.empty if f.is_required() else f.get_default(call_default_factory=True))
               for n, f in fields.items() if n not in positional]
    params += [P("force", P.KEYWORD_ONLY, default=False, annotation=bool),
               P("command", P.KEYWORD_ONLY, default=PYTHON_API, annotation=str)]
    signature = inspect.Signature(params, return_annotation=Written)

    def build(*a, **kw) -> Written:
        given = signature.bind(*a, **kw).arguments  # only what the caller passed: the model holds the defaults
        out, force, command = given.pop("out"), given.pop("force", False), given.pop("command", PYTHON_API)
        return run_builder(kind, given, out, force=force, command=command)

    build.__name__ = build.__qualname__ = f"build_{kind}"
    build.__doc__ = run.__doc__
    build.__signature__ = signature  # type: ignore[attr-defined]
    build.__module__ = run.__module__
    return build


def one_row(row: dict[str, np.ndarray], pad: np.ndarray | None = None, **extra) -> dict[str, object]:
    """A batch of one row for `write_dataset`: the row's fields, its padding mask (`pad`, default none) and `extra`
    columns."""
    cols: dict[str, object] = {k: np.asarray(row[k])[None] for k in ROW_FIELDS}
    cols["_pad"] = (np.zeros(len(row["input_ids"]), np.int8) if pad is None else pad.astype(np.int8))[None]
    return {**cols, **{k: [v] for k, v in extra.items()}}


def plain_row(ids: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """A row that is one segment at positions 0..n-1 (no padding). Fields (n,)."""
    n = len(ids)
    return {"input_ids": ids, "position_ids": np.arange(n, dtype=np.int64), "segment_ids": np.zeros(n, dtype=np.int64),
            "labels": labels}


def progress():
    """The progress bar of a builder's loop (on the data console)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..datasets import data_console

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=data_console(), transient=True)
