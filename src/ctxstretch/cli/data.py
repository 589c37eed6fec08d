"""`ctxstretch data …`: build training data as an Arrow dataset (`datasets.load_from_disk(OUT)`) plus `card.md`
and `ctxstretch.json` (tokenizer identity, row length).

- `pack`:         documents → fixed-length rows keeping document boundaries (long-document upsampling, mixing);
- `cip`:          LongSkywork chunk-interleaved rows from short documents;
- `synl`:         LongSkywork synthetic lengthy-table SFT examples;
- `selfinstruct`: Llama 2 Long self-instruct long QA written by a generator model;
- `impactful`:    LongRecipe rows of sentences rich in impactful tokens (scorer model or digit heuristic);
- `probes`:       passkey / needle / RULER retrieval probes as training rows (training seeds only).

Each command is a thin face over a `build_*` function of `ctxstretch.data.builders`.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError
from ..data.builders import (
    build_cip,
    build_impactful,
    build_pack,
    build_probes,
    build_selfinstruct,
    build_synl,
)
from ..data.datasets import Written, set_console
from .common import console, floats, guarded, ints, names

data_app = typer.Typer(no_args_is_help=True, help="Build training data: packed rows, CIP rows, SynL tables, "
                       "self-instruct QA, impactful-token rows, retrieval probes.")


def command_line(ctx: typer.Context) -> str:
    """The command as run, rebuilt from its parsed parameters (defaults included)."""
    parts = ["ctxstretch", *ctx.command_path.split()[1:]]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.param_type_name == "argument":
            parts += [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
        elif p.param_type_name == "option" and value is not None:
            if getattr(p, "is_flag", False):
                flag = p.opts[0] if value else (p.secondary_opts or [None])[0]
                parts += [flag] if flag else []
            else:
                parts += [p.opts[0], str(value)]
    return shlex.join(parts)


def _build(out: Path, build: Callable[..., Written], *args, **kwargs) -> None:
    """Run one builder, its progress on the CLI's console, and print what it wrote."""
    set_console(console)
    w = build(*args, **kwargs)
    console.print(f"[green]done[/]: {out} ({w.rows:,} rows, {w.real_tokens:,} tokens)", highlight=False)


Srcs = Annotated[list[str], typer.Argument(help="text/JSONL/Parquet/Arrow files, folders, saved datasets, 'embedded'")]
Model = Annotated[str, typer.Option(help="local HF model directory (its tokenizer), or 'embedded'")]
Out = Annotated[Path, typer.Option(help="dataset folder to create")]
Length = Annotated[int, typer.Option(help="tokens per row")]
OnBadRecord = Annotated[str, typer.Option(help="fail: stop at the first bad record; skip: count it and go on")]
TextField = Annotated[str, typer.Option(help="the field/column holding the text (JSONL, Parquet, Arrow, datasets)")]
Seed = Annotated[int, typer.Option(help="random seed")]
Force = Annotated[bool, typer.Option(help="overwrite an existing --out")]
Cache = Annotated[bool, typer.Option(help="reuse/keep tokenised sources in $CTXSTRETCH_CACHE/tokens")]
Device = Annotated[str, typer.Option(help="cpu or cuda (for the generator / scorer models)")]


def _policy(value: str) -> str:
    if value not in ("fail", "skip"):
        raise ConfigError(f"--on-bad-record must be fail or skip, not {value!r}")
    return value


@data_app.command("pack")
@guarded
def pack_cmd(
    ctx: typer.Context, srcs: Srcs, out: Out, model: Model = "embedded", length: Length = 4096,
    on_bad_record: OnBadRecord = "fail", text_field: TextField = "text",
    long_threshold: Annotated[int, typer.Option(help="documents of at least this many tokens are upsampled")] = 0,
    long_weight: Annotated[float, typer.Option(help="sampling weight of long documents (Llama 2 Long)")] = 1.0,
    mix: Annotated[str | None, typer.Option(help="per-source token shares, e.g. embedded=1,notes=3")] = None,
    split_short: Annotated[bool, typer.Option(help="fill every row (documents may cross row ends)")] = True,
    cache: Cache = True, seed: Seed = 0, force: Force = False,
) -> None:
    """Pack documents into rows of --length tokens that keep document boundaries."""
    _build(out, build_pack, srcs, out, model=model, length=length, seed=seed, on_bad_record=_policy(on_bad_record),
           text_field=text_field, long_threshold=long_threshold, long_weight=long_weight, mix=mix,
           split_short=split_short, cache=cache, force=force, command=command_line(ctx))


@data_app.command("cip")
@guarded
def cip_cmd(
    ctx: typer.Context, srcs: Srcs, out: Out, model: Model = "embedded", length: Length = 4096,
    k: Annotated[int, typer.Option("--k", help="documents per group (0: as many as fill a row)")] = 0,
    chunk_len: Annotated[int, typer.Option(help="tokens per chunk")] = 512,
    interleave: Annotated[str, typer.Option(help="round-robin or random")] = "round-robin",
    on_bad_record: OnBadRecord = "fail", text_field: TextField = "text", cache: Cache = True, seed: Seed = 0,
    force: Force = False,
) -> None:
    """LongSkywork chunk-interleaved pretraining rows from short documents."""
    _build(out, build_cip, srcs, out, model=model, length=length, k=k, chunk_len=chunk_len, interleave=interleave,
           seed=seed, on_bad_record=_policy(on_bad_record), text_field=text_field, cache=cache, force=force,
           command=command_line(ctx))


@data_app.command("synl")
@guarded
def synl_cmd(
    ctx: typer.Context, out: Out, model: Model = "embedded",
    lengths: Annotated[str, typer.Option(help="target lengths in tokens, e.g. 1k,4k")] = "1k,4k",
    count: Annotated[int, typer.Option(help="examples per length")] = 8,
    fmt: Annotated[str, typer.Option("--format", help="markdown, csv or mixed")] = "mixed",
    kinds: Annotated[str, typer.Option(help="question kinds, cycled")] = "lookup,extremum,count,two_hop",
    seed: Seed = 0, force: Force = False,
) -> None:
    """LongSkywork synthetic lengthy-table SFT examples (answers computed from the table)."""
    _build(out, build_synl, out, model=model, lengths=ints(lengths), count=count, seed=seed, fmt=fmt,
           kinds=names(kinds), force=force, command=command_line(ctx))


@data_app.command("selfinstruct")
@guarded
def selfinstruct_cmd(
    ctx: typer.Context, srcs: Srcs, out: Out,
    model: Annotated[str, typer.Option(help="the model to train: its tokenizer builds the rows")] = "embedded",
    generator: Annotated[str, typer.Option(help="local HF model that writes the QA pairs, or 'embedded'")] = "embedded",
    length: Annotated[int, typer.Option(help="tokens per row (the document is truncated to fit)")] = 1024,
    count: Annotated[int, typer.Option(help="questions to ask")] = 16,
    chunk_len: Annotated[int | None, typer.Option(help="chunk length in generator tokens (default: what fits)")] = None,
    short_share: Annotated[float, typer.Option(help="share of 'a few words or a single phrase' prompts")] = 0.5,
    self_check: Annotated[bool, typer.Option(help="drop pairs the generator itself rejects")] = True,
    input_loss: Annotated[bool, typer.Option(help="LM loss on the document too (Llama 2 Long)")] = False,
    batch_size: Annotated[int, typer.Option(help="prompts generated at once")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per question and per answer, at most")] = 32,
    temperature: Annotated[float, typer.Option(help="sampling temperature (0: greedy)")] = 0.7,
    min_doc_tokens: Annotated[int, typer.Option(help="skip documents shorter than this")] = 64,
    on_bad_record: OnBadRecord = "fail", text_field: TextField = "text", device: Device = "auto", seed: Seed = 0,
    force: Force = False,
) -> None:
    """Llama 2 Long self-instruct long QA: document + generated question → answer."""
    _build(out, build_selfinstruct, srcs, out, model=model, generator=generator, length=length, count=count,
           chunk_len=chunk_len, short_share=short_share, self_check=self_check, input_loss=input_loss,
           batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
           min_doc_tokens=min_doc_tokens, seed=seed, on_bad_record=_policy(on_bad_record), text_field=text_field,
           device=device, force=force, command=command_line(ctx))


@data_app.command("impactful")
@guarded
def impactful_cmd(
    ctx: typer.Context, srcs: Srcs, out: Out, model: Model = "embedded", length: Length = 4096,
    scorer: Annotated[str | None, typer.Option(help="long model scoring tokens (none: digit heuristic)")] = None,
    base: Annotated[str | None, typer.Option(help="base model to compare --scorer with")] = None,
    short: Annotated[int | None, typer.Option(help="truncated context (tokens) when --scorer has no --base")] = None,
    window: Annotated[int | None, typer.Option(help="full context (tokens) for scoring")] = None,
    share: Annotated[float, typer.Option(help="share of tokens that are impactful")] = 0.2,
    other_share: Annotated[float, typer.Option(help="heuristic: share of digit-free sentences kept")] = 0.5,
    on_bad_record: OnBadRecord = "fail", text_field: TextField = "text", device: Device = "auto", seed: Seed = 0,
    force: Force = False,
) -> None:
    """LongRecipe impactful-token rows: keep the sentences that carry impactful tokens."""
    _build(out, build_impactful, srcs, out, model=model, length=length, scorer=scorer, base=base, short=short,
           window=window, share=share, other_share=other_share, seed=seed, on_bad_record=_policy(on_bad_record),
           text_field=text_field, device=device, force=force, command=command_line(ctx))


@data_app.command("probes")
@guarded
def probes_cmd(
    ctx: typer.Context, out: Out, model: Model = "embedded",
    kinds: Annotated[str, typer.Option(help="passkey, needle and RULER tasks (niah_multikey, niah_multivalue, …)")
                     ] = "passkey,needle,niah_multikey,niah_multivalue",
    lengths: Annotated[str, typer.Option(help="probe lengths in tokens, e.g. 256,1k")] = "1k,4k",
    depths: Annotated[str, typer.Option(help="needle depths for passkey/needle, fractions")] = "0,0.25,0.5,0.75,1",
    count: Annotated[int, typer.Option(help="probes per (kind, length, depth)")] = 4,
    haystack: Annotated[list[str] | None, typer.Option(help="haystack sources (default: embedded)")] = None,
    text_field: TextField = "text", seed: Seed = 0, force: Force = False,
) -> None:
    """Retrieval probes as training rows, from the evaluation's generators with training seeds."""
    _build(out, build_probes, out, model=model, kinds=names(kinds), lengths=ints(lengths),
           depths=floats(depths, "--depths"), count=count, seed=seed, haystack=haystack, text_field=text_field,
           force=force, command=command_line(ctx))
