"""Dataset folders behind `ctxstretch data …` (the builders are in `data/builders.py`): an Arrow dataset folder
(`datasets.load_from_disk(OUT)`) with `card.md` (+ a length histogram PNG) and `ctxstretch.json` (builder, row
length, tokenizer identity: a training stage refuses a dataset built for another tokenizer with
`check_dataset_tokenizer`).

Output is written to `OUT.tmp/` and renamed into place only when complete, so a failed run leaves nothing
half-written. Every row has the fields of `ROW_FIELDS` (`input_ids`, `position_ids`, `segment_ids`, `labels`,
labels IGNORE where there is no loss); padding, where a row has any, is its own segment.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import disk_full
from ..config import check_out_dir
from .packing import ROW_FIELDS, Rows
from .records import BadRecords, DataError

DATASET_NOTE = ("Load with `datasets.load_from_disk(DIR)`; build the attention mask with "
                "`ctxstretch.masking.attention_mask_for(segment_ids)` (documents never attend to each other).")
META_FILE = "ctxstretch.json"


# ----------------------------------------------------------------------------------------------------- plumbing
_CONSOLE = None


def set_console(console) -> None:
    """Progress bars go to `console` (the CLI passes its stderr console)."""
    global _CONSOLE
    _CONSOLE = console


def data_console():
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def load_tokenizer(model: str):
    """The fast tokenizer of a local model directory, or of the embedded model ("embedded")."""
    from transformers import AutoTokenizer

    from ..models import ModelError, resolve

    path = resolve(model)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: cannot load a tokenizer ({first}); save the tokenizer next to the model") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{path}: the tokenizer is not a fast (Rust) tokenizer; save a tokenizer.json with it")
    return tok


def tokenizer_identity(model: str, tok) -> dict:
    """{"model": resolved directory, "tokenizer_sha256": hash of its tokenizer.json as `tokenizers` writes it}."""
    from ..models import resolve
    from .tokcache import tokenizer_hash

    return {"model": str(resolve(model)), "tokenizer_sha256": tokenizer_hash(tok)}


def dataset_meta(builder: str, model: str, tok, length: int | None, **extra) -> dict:
    """The `ctxstretch.json` record of a dataset: builder, row length (None: rows vary) and tokenizer identity."""
    return {"format": 1, "builder": builder, "length": length, "tokenizer": tokenizer_identity(model, tok),
            "fields": list(ROW_FIELDS), **extra}


def read_dataset_meta(path: Path) -> dict:
    """The `ctxstretch.json` of a dataset folder written by `ctxstretch data`."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise DataError(f"{path}: no {META_FILE}; build the dataset with `ctxstretch data …`")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def check_dataset_tokenizer(path: Path, tokenizer, length: int | None = None) -> dict:
    """Refuse a dataset built with another tokenizer (or, when `length` is given, longer rows than that);
    returns its metadata."""
    from .tokcache import tokenizer_hash

    meta = read_dataset_meta(path)
    want = meta.get("tokenizer", {}).get("tokenizer_sha256")
    if want != tokenizer_hash(tokenizer):
        raise DataError(f"{path} was built with the tokenizer of {meta.get('tokenizer', {}).get('model')}, not this "
                        "model's; rebuild it with --model pointing at the model you train")
    if length is not None and meta.get("length") and meta["length"] > length:
        raise DataError(f"{path} has rows of {meta['length']:,} tokens, longer than {length:,}; rebuild it with "
                        f"--length {length}")
    return meta


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
                  force: bool = False, meta: dict | None = None) -> Written:
    """Stream column batches into an Arrow file, save it as a `datasets` folder with `card.md` and
    `ctxstretch.json` (`meta` plus the row count), then move it to `out` in one rename. `card(written, folder)`
    writes any plots into `folder` and returns the card's text."""
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
        (final / META_FILE).write_text(json.dumps({**(meta or {}), "rows": written.rows,
                                                   "real_tokens": written.real_tokens}, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(final, out)
    except Exception as e:
        if (err := disk_full(e, out)) is not None:
            raise err from e
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not quiet:
            datasets.utils.enable_progress_bars()
    return written


def rows_batches(blocks: Iterable[Rows]) -> Iterator[dict[str, object]]:
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


def card_text(title: str, facts: list[tuple[str, object]], sections: list[str]) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts]
    return "\n".join([*lines, "", *sections, "", DATASET_NOTE, ""])


def bad_section(bad: BadRecords) -> str:
    if not bad.count:
        return "Bad records skipped: none."
    lines = [f"Bad records skipped: {bad.count:,}", ""]
    lines += [f"- {reason}: {n:,}" for reason, n in bad.reasons.most_common()]
    lines += ["", "First ones:", ""] + [f"- `{r}`" for r in bad.examples[:20]]
    return "\n".join(lines)
