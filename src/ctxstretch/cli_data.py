"""`ctxstretch data …`: build training data as an Arrow dataset (`datasets.load_from_disk(OUT)`) plus `card.md`.

- `pack`:  documents → fixed-length rows keeping document boundaries (long-document upsampling, source mixing);
- `cip`:   LongSkywork chunk-interleaved rows from short documents;
- `synl`:  LongSkywork synthetic lengthy-table SFT examples.

Each command is a thin face over a `build_*` function of the same module. Output is written to `OUT.tmp/` and
renamed into place only when complete, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from .config import ConfigError, check_out_dir
from .data.packing import ROW_FIELDS, Rows, TokenizedCorpus, iter_packed, plan_documents
from .data.readers import BadRecords, DataError, read_sources

data_app = typer.Typer(no_args_is_help=True, help="Build training data: packed rows, CIP rows, SynL tables.")
DATASET_NOTE = ("Load with `datasets.load_from_disk(DIR)`; build the attention mask with "
                "`ctxstretch.masking.attention_mask_for(segment_ids)` (documents never attend to each other).")


# ----------------------------------------------------------------------------------------------------- plumbing
def _console():
    from .cli import console  # imported late: cli.py imports this module

    return console


def load_tokenizer(model: str):
    """The fast tokenizer of a local model directory, or of the embedded model ("embedded")."""
    from transformers import AutoTokenizer

    from .models import ModelError, resolve

    path = resolve(model)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: cannot load a tokenizer ({first}); save the tokenizer next to the model") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{path}: the tokenizer is not a fast (Rust) tokenizer; save a tokenizer.json with it")
    return tok


def _pad_id(tok) -> int:
    for tid in (tok.pad_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _list_column(arr: np.ndarray):
    """(R, T) int array → an Arrow list<int32> column."""
    import pyarrow as pa

    r, t = arr.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, r * t + 1, t, dtype=np.int32)),
                                    pa.array(arr.reshape(-1).astype(np.int32, copy=False)))


def _batch(columns: dict[str, object]):
    import pyarrow as pa

    return pa.RecordBatch.from_pydict({
        k: _list_column(v) if isinstance(v, np.ndarray) and v.ndim == 2 else pa.array(v) for k, v in columns.items()
    })


@dataclass
class Written:
    rows: int = 0
    slots: int = 0
    real_tokens: int = 0
    extra: dict = field(default_factory=dict)


def write_dataset(out: Path, batches: Iterable[dict[str, object]], card: Callable[[Written, Path], str],
                  force: bool = False) -> Written:
    """Stream column batches into an Arrow file, save it as a `datasets` folder with `card.md`, then move it to
    `out` in one rename. `card(written, folder)` writes any plots into `folder` and returns the card's text."""
    import datasets
    import pyarrow as pa

    check_out_dir(out, force)
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    written = Written()
    try:
        writer = None
        with pa.OSFile(str(work / "rows.arrow"), "wb") as sink:
            for cols in batches:
                rb = _batch({k: v for k, v in cols.items() if k != "_pad"})
                if writer is None:
                    writer = pa.ipc.new_stream(sink, rb.schema)
                writer.write_batch(rb)
                written.rows += rb.num_rows
                ids = cols["input_ids"]
                written.slots += int(ids.size)
                written.real_tokens += int((cols["_pad"] == 0).sum()) if "_pad" in cols else int(ids.size)
            if writer is None:
                raise DataError("no rows were produced; give more (or longer) documents or a shorter --length")
            writer.close()
        ds = datasets.Dataset.from_file(str(work / "rows.arrow"))
        final = work / "dataset"
        ds.save_to_disk(str(final))
        del ds
        (final / "card.md").write_text(card(written, final))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not quiet:
            datasets.utils.enable_progress_bars()
    return written


def _rows_batches(blocks: Iterable[Rows]) -> Iterator[dict[str, object]]:
    for b in blocks:
        cols: dict[str, object] = b.as_dict()
        cols["_pad"] = b.pad.astype(np.int8)
        yield cols


def length_histogram(lengths: np.ndarray, path: Path, title: str) -> Path:
    """A histogram of lengths in tokens (log-spaced bins) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = np.asarray(lengths)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if len(lengths):
        lo, hi = max(1, int(lengths.min())), max(2, int(lengths.max()))
        bins = np.unique(np.geomspace(lo, hi + 1, 40).astype(int)) if hi > lo * 4 else 30
        ax.hist(lengths, bins=bins, color="#3B75AF")
        if hi > lo * 4:
            ax.set_xscale("log")
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("count")
    ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


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


def _card(title: str, facts: list[tuple[str, object]], sections: list[str]) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts]
    return "\n".join([*lines, "", *sections, "", DATASET_NOTE, ""])


def _bad_section(bad: BadRecords) -> str:
    if not bad.count:
        return "Bad records skipped: none."
    lines = [f"Bad records skipped: {bad.count:,}", ""]
    lines += [f"- {reason}: {n:,}" for reason, n in bad.reasons.most_common()]
    lines += ["", "First ones:", ""] + [f"- `{r}`" for r in bad.examples[:20]]
    return "\n".join(lines)


def _parse_mix(text: str | None, names: list[str]) -> np.ndarray | None:
    """"name=w,name=w" → weights aligned with `names` (every source needs one)."""
    if not text:
        return None
    given: dict[str, float] = {}
    for part in text.split(","):
        name, _, w = part.partition("=")
        try:
            given[name.strip()] = float(w)
        except ValueError:
            raise ConfigError(f"--mix: '{part}' is not name=weight (e.g. embedded=1,notes=3)") from None
    unknown = set(given) - set(names)
    missing = set(names) - set(given)
    if unknown or missing:
        raise ConfigError(f"--mix names {', '.join(sorted(unknown or missing))} "
                          f"{'are not sources' if unknown else 'have no weight'}; sources: {', '.join(names)}")
    return np.array([given[n] for n in names])


def _read_corpus(srcs: list[str], tok, text_field: str, bad: BadRecords) -> TokenizedCorpus:
    from rich.progress import Progress, SpinnerColumn, TextColumn

    if not srcs:
        raise ConfigError("give at least one source (files, folders, a saved dataset or 'embedded')")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=_console(), transient=True) as pr:
        task = pr.add_task("tokenising")
        corpus = TokenizedCorpus.build(
            tok, read_sources(srcs, text_field=text_field, bad=bad), eos_id=tok.eos_token_id,
            progress=lambda d, n: pr.update(task, description=f"tokenising: {d:,} documents, {n:,} tokens"))
    if not len(corpus):
        raise DataError(f"no usable documents in {' '.join(srcs)}"
                        + (f" ({bad.count} bad records skipped)" if bad.count else ""))
    return corpus


def _sources_section(corpus: TokenizedCorpus, order: np.ndarray) -> str:
    lines = ["| source | documents | tokens | tokens used (after weighting) |", "|---|---:|---:|---:|"]
    lengths = corpus.lengths
    for s, name in enumerate(corpus.source_names):
        mine = corpus.sources == s
        used = int(lengths[order][corpus.sources[order] == s].sum())
        lines.append(f"| {name} | {int(mine.sum()):,} | {int(lengths[mine].sum()):,} | {used:,} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- builders
def build_pack(srcs: list[str], out: Path, *, model: str = "embedded", length: int = 4096, seed: int = 0,
               on_bad_record: str = "fail", text_field: str = "text", long_threshold: int = 0,
               long_weight: float = 1.0, mix: str | None = None, split_short: bool = True,
               force: bool = False, command: str = "(Python API)") -> Written:
    """Tokenise `srcs`, weight and shuffle documents (`plan_documents`), pack rows of `length` tokens, write `out`."""
    if length < 2:
        raise ConfigError(f"--length {length} must be at least 2")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    bad = BadRecords(on_bad_record)  # type: ignore[arg-type]
    corpus = _read_corpus(srcs, tok, text_field, bad)
    weights = _parse_mix(mix, corpus.source_names)
    order = plan_documents(corpus.lengths, corpus.sources, np.random.default_rng(seed), source_weights=weights,
                           long_threshold=long_threshold, long_weight=long_weight)
    blocks = iter_packed(corpus.docs(order), length, pad_id=_pad_id(tok), split_short=split_short)

    def card(w: Written, folder: Path) -> str:
        length_histogram(corpus.lengths, folder / "lengths.png", "document lengths (tokens, incl. EOS)")
        facts = [("documents read", f"{len(corpus):,}"), ("documents packed (after weighting)", f"{len(order):,}"),
                 ("tokens read", f"{int(corpus.lengths.sum()):,}"), ("rows", f"{w.rows:,} × {length:,} tokens"),
                 ("real tokens / slots", f"{w.real_tokens:,} / {w.slots:,}"),
                 ("long-document upsampling", f"×{long_weight} at ≥ {long_threshold:,} tokens" if long_threshold
                  else "off"), ("split short documents", split_short),
                 ("bad records skipped", f"{bad.count:,}"), ("seed", seed), ("command", f"`{command}`")]
        return _card("ctxstretch data pack", facts, [_sources_section(corpus, order), "", _bad_section(bad), "",
                                                     "![document lengths](lengths.png)"])

    return write_dataset(out, _rows_batches(blocks), card, force)


def build_cip(srcs: list[str], out: Path, *, model: str = "embedded", length: int = 4096, k: int = 0,
              chunk_len: int = 512, interleave: str = "round_robin", seed: int = 0, on_bad_record: str = "fail",
              text_field: str = "text", force: bool = False, command: str = "(Python API)") -> Written:
    """Tokenise `srcs`, shuffle documents, and write LongSkywork CIP rows of `length` tokens to `out`."""
    from .data.cip import INTERLEAVES, iter_cip_rows

    interleave = interleave.replace("-", "_")
    if interleave not in INTERLEAVES:
        raise ConfigError(f"--interleave must be round-robin or random, not {interleave!r}")
    if length < 2 or chunk_len < 1 or k < 0:
        raise ConfigError("--length must be ≥ 2, --chunk-len ≥ 1 and --k ≥ 0")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    bad = BadRecords(on_bad_record)  # type: ignore[arg-type]
    corpus = _read_corpus(srcs, tok, text_field, bad)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus))
    blocks = iter_cip_rows(corpus.docs(order), length, k=k, chunk_len=chunk_len, mode=interleave, rng=rng,
                           pad_id=_pad_id(tok))

    def card(w: Written, folder: Path) -> str:
        length_histogram(corpus.lengths, folder / "lengths.png", "document lengths (tokens, incl. EOS)")
        facts = [("documents", f"{len(corpus):,}"), ("tokens", f"{int(corpus.lengths.sum()):,}"),
                 ("rows", f"{w.rows:,} × {length:,} tokens"),
                 ("real tokens / slots", f"{w.real_tokens:,} / {w.slots:,}"),
                 ("documents per group (k)", k or "fill a row"), ("chunk length", f"{chunk_len:,} tokens"),
                 ("interleave", interleave), ("bad records skipped", f"{bad.count:,}"), ("seed", seed),
                 ("command", f"`{command}`")]
        return _card("ctxstretch data cip (LongSkywork chunk-interleaved pretraining)", facts,
                     [_sources_section(corpus, order), "", _bad_section(bad), "", "![document lengths](lengths.png)"])

    return write_dataset(out, _rows_batches(blocks), card, force)


def build_synl(out: Path, *, model: str = "embedded", lengths: list[int], count: int = 8, seed: int = 0,
               fmt: str = "mixed", kinds: list[str] | None = None, force: bool = False,
               command: str = "(Python API)") -> Written:
    """Write `count` SynL examples per target length; each example is one row of exactly its target length."""
    from rich.progress import Progress

    from .data.synl import KINDS, synl_examples, synl_row

    kinds = kinds or list(KINDS)
    bad_kinds = [kd for kd in kinds if kd not in KINDS]
    if bad_kinds:
        raise ConfigError(f"--kinds: {', '.join(bad_kinds)} unknown; choose from {', '.join(KINDS)}")
    if not lengths or count < 1:
        raise ConfigError("give --lengths (e.g. 1k,4k) and --count ≥ 1")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    pad_id, eos_id = _pad_id(tok), tok.eos_token_id
    examples = synl_examples(tok, lengths, count, seed, fmt=fmt, kinds=kinds)
    used: list[int] = []

    def batches() -> Iterator[dict[str, object]]:
        with Progress(console=_console(), transient=True) as pr:
            task = pr.add_task("SynL tables", total=len(lengths) * count)
            for ex in examples:
                row = synl_row(tok, ex, ex.target, pad_id, eos_id)
                used.append(ex.n_tokens)
                pr.advance(task)
                yield {**{k: row[k][None] for k in ROW_FIELDS}, "_pad": (row["segment_ids"] == 1)[None].astype(np.int8),
                       "prompt": [ex.prompt], "answer": [ex.answer], "kind": [ex.question.kind],
                       "format": [ex.format], "table_rows": [ex.n_rows], "n_tokens": [ex.n_tokens],
                       "length": [ex.target]}

    def card(w: Written, folder: Path) -> str:
        length_histogram(np.array(used), folder / "lengths.png", "example lengths (tokens, prompt + answer)")
        facts = [("examples", f"{w.rows:,}"), ("target lengths", ", ".join(f"{n:,}" for n in lengths)),
                 ("per length", count), ("question kinds", ", ".join(kinds)), ("format", fmt),
                 ("tokens (prompt + answer)", f"{sum(used):,} of {w.slots:,} slots"), ("seed", seed),
                 ("command", f"`{command}`")]
        return _card("ctxstretch data synl (LongSkywork synthetic lengthy tables)", facts,
                     ["Loss is on the answer (and EOS) only; every answer is computed from the table.", "",
                      "![example lengths](lengths.png)"])

    return write_dataset(out, batches(), card, force)


# ----------------------------------------------------------------------------------------------------- commands
def _run(fn: Callable[[], object]) -> None:
    """Run a data command through the CLI's error guard (one line, exit 2)."""
    from .cli import _guarded

    _guarded(fn)


def _done(out: Path, w: Written) -> None:
    _console().print(f"[green]done[/]: {out} ({w.rows:,} rows, {w.real_tokens:,} tokens)", highlight=False)


Srcs = Annotated[list[str], typer.Argument(help="text/JSONL/Parquet/Arrow files, folders, saved datasets, 'embedded'")]
Model = Annotated[str, typer.Option(help="local HF model directory (its tokenizer), or 'embedded'")]
Out = Annotated[Path, typer.Option(help="dataset folder to create")]
Length = Annotated[int, typer.Option(help="tokens per row")]
OnBadRecord = Annotated[str, typer.Option(help="fail: stop at the first bad record; skip: count it and go on")]
TextField = Annotated[str, typer.Option(help="the field/column holding the text (JSONL, Parquet, Arrow, datasets)")]
Seed = Annotated[int, typer.Option(help="random seed")]
Force = Annotated[bool, typer.Option(help="overwrite an existing --out")]


def _policy(value: str) -> str:
    if value not in ("fail", "skip"):
        raise ConfigError(f"--on-bad-record must be fail or skip, not {value!r}")
    return value


@data_app.command("pack")
def pack_cmd(
    ctx: typer.Context, srcs: Srcs, out: Out, model: Model = "embedded", length: Length = 4096,
    on_bad_record: OnBadRecord = "fail", text_field: TextField = "text",
    long_threshold: Annotated[int, typer.Option(help="documents of at least this many tokens are upsampled")] = 0,
    long_weight: Annotated[float, typer.Option(help="sampling weight of long documents (Llama 2 Long)")] = 1.0,
    mix: Annotated[str | None, typer.Option(help="per-source token shares, e.g. embedded=1,notes=3")] = None,
    split_short: Annotated[bool, typer.Option(help="fill every row (documents may cross row ends)")] = True,
    seed: Seed = 0, force: Force = False,
) -> None:
    """Pack documents into rows of --length tokens that keep document boundaries."""
    _run(lambda: _done(out, build_pack(srcs, out, model=model, length=length, seed=seed,
                                       on_bad_record=_policy(on_bad_record), text_field=text_field,
                                       long_threshold=long_threshold, long_weight=long_weight, mix=mix,
                                       split_short=split_short, force=force, command=command_line(ctx))))


@data_app.command("cip")
def cip_cmd(
    ctx: typer.Context, srcs: Srcs, out: Out, model: Model = "embedded", length: Length = 4096,
    k: Annotated[int, typer.Option("--k", help="documents per group (0: as many as fill a row)")] = 0,
    chunk_len: Annotated[int, typer.Option(help="tokens per chunk")] = 512,
    interleave: Annotated[str, typer.Option(help="round-robin or random")] = "round-robin",
    on_bad_record: OnBadRecord = "fail", text_field: TextField = "text", seed: Seed = 0, force: Force = False,
) -> None:
    """LongSkywork chunk-interleaved pretraining rows from short documents."""
    _run(lambda: _done(out, build_cip(srcs, out, model=model, length=length, k=k, chunk_len=chunk_len,
                                      interleave=interleave, seed=seed, on_bad_record=_policy(on_bad_record),
                                      text_field=text_field, force=force, command=command_line(ctx))))


@data_app.command("synl")
def synl_cmd(
    ctx: typer.Context, out: Out, model: Model = "embedded",
    lengths: Annotated[str, typer.Option(help="target lengths in tokens, e.g. 1k,4k")] = "1k,4k",
    count: Annotated[int, typer.Option(help="examples per length")] = 8,
    fmt: Annotated[str, typer.Option("--format", help="markdown, csv or mixed")] = "mixed",
    kinds: Annotated[str, typer.Option(help="question kinds, cycled")] = "lookup,extremum,count,two_hop",
    seed: Seed = 0, force: Force = False,
) -> None:
    """LongSkywork synthetic lengthy-table SFT examples (answers computed from the table)."""
    from .cli import _ints

    _run(lambda: _done(out, build_synl(out, model=model, lengths=_ints(lengths), count=count, seed=seed, fmt=fmt,
                                       kinds=[x.strip() for x in kinds.split(",") if x.strip()], force=force,
                                       command=command_line(ctx))))
