"""The `ctxstretch data …` builders: each `build_*` function reads sources, runs one transform (packing, CIP, SynL,
self-instruct, impactful tokens, probes) and writes a dataset folder through `datasets.write_dataset`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..config import ConfigError, check_out_dir
from .datasets import (
    Written,
    bad_section,
    card_text,
    data_console,
    dataset_meta,
    length_histogram,
    load_tokenizer,
    pad_id_of,
    rows_batches,
    write_dataset,
)
from .packing import ROW_FIELDS, TokenizedCorpus, iter_packed, plan_documents
from .readers import BadRecords, DataError, read_sources


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


def read_corpus(srcs: list[str], tok, text_field: str, bad: BadRecords, cache: bool = True) -> TokenizedCorpus:
    """Read and tokenise `srcs` (each document + EOS), through the token cache (`data/tokcache.py`) unless
    `cache=False`. Raises DataError when no usable document is left."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from . import tokcache

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
               cache: bool = True, force: bool = False, command: str = "(Python API)") -> Written:
    """Tokenise `srcs`, weight and shuffle documents (`plan_documents`), pack rows of `length` tokens, write `out`."""
    if length < 2:
        raise ConfigError(f"--length {length} must be at least 2")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    bad = BadRecords(on_bad_record)  # type: ignore[arg-type]
    corpus = read_corpus(srcs, tok, text_field, bad, cache)
    weights = _parse_mix(mix, corpus.source_names)
    order = plan_documents(corpus.lengths, corpus.sources, np.random.default_rng(seed), source_weights=weights,
                           long_threshold=long_threshold, long_weight=long_weight)
    blocks = iter_packed(corpus.docs(order), length, pad_id=pad_id_of(tok), split_short=split_short)

    def card(w: Written, folder: Path) -> str:
        length_histogram(corpus.lengths, folder / "lengths.png", "document lengths (tokens, incl. EOS)")
        facts = [("documents read", f"{len(corpus):,}"), ("documents packed (after weighting)", f"{len(order):,}"),
                 ("tokens read", f"{int(corpus.lengths.sum()):,}"), ("rows", f"{w.rows:,} × {length:,} tokens"),
                 ("real tokens / slots", f"{w.real_tokens:,} / {w.slots:,}"),
                 ("long-document upsampling", f"×{long_weight} at ≥ {long_threshold:,} tokens" if long_threshold
                  else "off"), ("split short documents", split_short),
                 ("bad records skipped", f"{bad.count:,}"), ("seed", seed), ("command", f"`{command}`")]
        return card_text("ctxstretch data pack", facts, [_sources_section(corpus, order), "", bad_section(bad), "",
                                                     "![document lengths](lengths.png)"])

    return write_dataset(out, rows_batches(blocks), card, force,
                         dataset_meta("pack", model, tok, length, seed=seed, command=command))


def build_cip(srcs: list[str], out: Path, *, model: str = "embedded", length: int = 4096, k: int = 0,
              chunk_len: int = 512, interleave: str = "round_robin", seed: int = 0, on_bad_record: str = "fail",
              text_field: str = "text", cache: bool = True, force: bool = False,
              command: str = "(Python API)") -> Written:
    """Tokenise `srcs`, shuffle documents, and write LongSkywork CIP rows of `length` tokens to `out`."""
    from .cip import INTERLEAVES, iter_cip_rows

    interleave = interleave.replace("-", "_")
    if interleave not in INTERLEAVES:
        raise ConfigError(f"--interleave must be round-robin or random, not {interleave!r}")
    if length < 2 or chunk_len < 1 or k < 0:
        raise ConfigError("--length must be ≥ 2, --chunk-len ≥ 1 and --k ≥ 0")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    bad = BadRecords(on_bad_record)  # type: ignore[arg-type]
    corpus = read_corpus(srcs, tok, text_field, bad, cache)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus))
    blocks = iter_cip_rows(corpus.docs(order), length, k=k, chunk_len=chunk_len, mode=interleave, rng=rng,
                           pad_id=pad_id_of(tok))

    def card(w: Written, folder: Path) -> str:
        length_histogram(corpus.lengths, folder / "lengths.png", "document lengths (tokens, incl. EOS)")
        facts = [("documents", f"{len(corpus):,}"), ("tokens", f"{int(corpus.lengths.sum()):,}"),
                 ("rows", f"{w.rows:,} × {length:,} tokens"),
                 ("real tokens / slots", f"{w.real_tokens:,} / {w.slots:,}"),
                 ("documents per group (k)", k or "fill a row"), ("chunk length", f"{chunk_len:,} tokens"),
                 ("interleave", interleave), ("bad records skipped", f"{bad.count:,}"), ("seed", seed),
                 ("command", f"`{command}`")]
        return card_text("ctxstretch data cip (LongSkywork chunk-interleaved pretraining)", facts,
                     [_sources_section(corpus, order), "", bad_section(bad), "", "![document lengths](lengths.png)"])

    return write_dataset(out, rows_batches(blocks), card, force,
                         dataset_meta("cip", model, tok, length, seed=seed, command=command))


def build_synl(out: Path, *, model: str = "embedded", lengths: list[int], count: int = 8, seed: int = 0,
               fmt: str = "mixed", kinds: list[str] | None = None, force: bool = False,
               command: str = "(Python API)") -> Written:
    """Write `count` SynL examples per target length; each example is one row of exactly its target length."""
    from rich.progress import Progress

    from .synl import KINDS, synl_examples, synl_row

    kinds = kinds or list(KINDS)
    bad_kinds = [kd for kd in kinds if kd not in KINDS]
    if bad_kinds:
        raise ConfigError(f"--kinds: {', '.join(bad_kinds)} unknown; choose from {', '.join(KINDS)}")
    if not lengths or count < 1:
        raise ConfigError("give --lengths (e.g. 1k,4k) and --count ≥ 1")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    pad_id, eos_id = pad_id_of(tok), tok.eos_token_id
    examples = synl_examples(tok, lengths, count, seed, fmt=fmt, kinds=kinds)
    used: list[int] = []

    def batches() -> Iterator[dict[str, object]]:
        with Progress(console=data_console(), transient=True) as pr:
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
        return card_text("ctxstretch data synl (LongSkywork synthetic lengthy tables)", facts,
                     ["Loss is on the answer (and EOS) only; every answer is computed from the table.", "",
                      "![example lengths](lengths.png)"])

    return write_dataset(out, batches(), card, force,
                         dataset_meta("synl", model, tok, max(lengths), lengths=lengths, seed=seed, command=command))




def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=data_console(), transient=True)


def _quiet_load(load, path: Path, device: str):
    """`models.load` without transformers' weight-loading progress bar (ours is the one that counts)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load(path, device=device)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _one_row(row: dict[str, np.ndarray], pad: np.ndarray | None = None, **extra) -> dict[str, object]:
    cols: dict[str, object] = {k: np.asarray(row[k])[None] for k in ROW_FIELDS}
    cols["_pad"] = (np.zeros(len(row["input_ids"]), np.int8) if pad is None else pad.astype(np.int8))[None]
    return {**cols, **{k: [v] for k, v in extra.items()}}


# --------------------------------------------------------------------------------------------- self-instruct
def build_selfinstruct(srcs: list[str], out: Path, *, model: str = "embedded", generator: str = "embedded",
                       length: int = 1024, count: int = 16, chunk_len: int | None = None, short_share: float = 0.5,
                       self_check: bool = True, input_loss: bool = False, batch_size: int = 8,
                       max_new_tokens: int = 32, temperature: float = 0.7, min_doc_tokens: int = 64,
                       seed: int = 0, on_bad_record: str = "fail", text_field: str = "text", device: str = "cpu",
                       force: bool = False, command: str = "(Python API)") -> Written:
    """Llama 2 Long self-instruct long QA: `count` questions about random chunks of the documents of `srcs`,
    written by `generator`; each kept pair becomes one row of `length` tokens (`model`'s tokenizer): document
    (truncated) + question → answer. Loss on the answer; with `input_loss` on the document too."""
    from ..models import load, resolve
    from . import selfinstruct as si
    from .tokcache import tokenizer_hash

    if length < 16 or count < 1 or not 0 <= short_share <= 1 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError("--length must be ≥ 16, --count, --batch-size and --max-new-tokens ≥ 1, "
                          "--short-share in [0, 1]")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    gen_model, gen_tok = _quiet_load(load, resolve(generator), device)
    bad = BadRecords(on_bad_record)  # type: ignore[arg-type]
    corpus = read_corpus(srcs, tok, text_field, bad)
    writer = si.QAWriter(gen_model, gen_tok, max_question_tokens=max_new_tokens, max_answer_tokens=max_new_tokens,
                         temperature=temperature, batch_size=batch_size)
    budget = writer.chunk_budget(chunk_len)
    before, after = si.row_template(tok, "")
    keep_tokens = length - len(before) - len(after) - 2 * (2 * max_new_tokens + 8)
    if keep_tokens < 16:
        raise ConfigError(f"--length {length} leaves no room for a document next to a question and an answer")
    eos = tok.eos_token_id
    row_docs = [d[:-1][:keep_tokens] if eos is not None else d[:keep_tokens] for d in corpus.docs(range(len(corpus)))]
    row_docs = [d for d in row_docs if len(d) >= min_doc_tokens]
    if not row_docs:
        raise DataError(f"no document has --min-doc-tokens {min_doc_tokens} tokens")
    same = tokenizer_hash(tok) == tokenizer_hash(gen_tok)
    gen_docs = row_docs if same else [np.asarray(gen_tok(tok.decode(d), add_special_tokens=False)["input_ids"])
                                      for d in row_docs]
    items = si.plan_questions([len(d) for d in gen_docs], count, budget, np.random.default_rng(seed), short_share)
    with _progress() as pr:
        task = pr.add_task(f"self-instruct ({'generate + self-check' if self_check else 'generate'})", total=count)
        si.generate_qas(writer, gen_docs, items, seed=seed, self_check=self_check,
                        progress=lambda n: pr.advance(task, n))
    kept = [it for it in items if it.ok]
    parsed = sum(bool(it.question and it.answer) for it in items)
    pad_id = pad_id_of(tok)
    used: list[int] = []

    def batches() -> Iterator[dict[str, object]]:
        for it in kept:
            row = si.selfinstruct_row(tok, row_docs[it.doc], it.question, it.answer, length, pad_id=pad_id,
                                      eos_id=eos, input_loss=input_loss)
            used.append(int((row["segment_ids"] == 0).sum()))
            yield _one_row(row, row["segment_ids"] == 1, question=it.question, answer=it.answer, kind=it.kind,
                           chunk_start=it.chunk[0], chunk_end=it.chunk[1], self_check=it.passed)

    def card(w: Written, folder: Path) -> str:
        length_histogram(np.array(used), folder / "lengths.png", "example lengths (tokens)")
        facts = [("generator", f"`{resolve(generator)}`"), ("questions asked", count),
                 ("pairs parsed", f"{parsed:,}"),
                 ("passed self-check", f"{sum(it.passed is True for it in items):,}" if self_check else "not run"),
                 ("examples written", f"{w.rows:,} × {length:,} tokens"),
                 ("kinds (normal / short)", f"{sum(it.kind == 'normal' for it in kept)} / "
                                            f"{sum(it.kind == 'short' for it in kept)}"),
                 ("chunk length (generator tokens)", f"{budget:,}"), ("loss", "answer + document" if input_loss
                                                                       else "answer only"),
                 ("documents usable", f"{len(row_docs):,}"), ("bad records skipped", f"{bad.count:,}"),
                 ("seed", seed), ("command", f"`{command}`")]
        sample = [f"- **Q** {it.question} — **A** {it.answer}" for it in kept[:5]]
        return card_text("ctxstretch data selfinstruct (Llama 2 Long self-instruct long QA)", facts,
                     ["First pairs:", "", *(sample or ["(none)"]), "", "![example lengths](lengths.png)"])

    if not kept:
        raise DataError(f"the generator wrote no usable pair in {count} tries ({parsed} parsed); ask for more "
                        "(--count), turn off --self-check, or use a stronger --generator")
    return write_dataset(out, batches(), card, force,
                         dataset_meta("selfinstruct", model, tok, length, generator=str(resolve(generator)),
                                      input_loss=input_loss, seed=seed, command=command))


# ---------------------------------------------------------------------------------------------- impactful
def build_impactful(srcs: list[str], out: Path, *, model: str = "embedded", length: int = 4096,
                    scorer: str | None = None, base: str | None = None, short: int | None = None,
                    window: int | None = None, share: float = 0.2, other_share: float = 0.5, seed: int = 0,
                    on_bad_record: str = "fail", text_field: str = "text", device: str = "cpu",
                    force: bool = False, command: str = "(Python API)") -> Written:
    """LongRecipe impactful-token rows of `length` tokens: sentences of `srcs` kept by a scorer model (`scorer`
    = the long model, `base` = the base model; without `base`, `scorer` with full vs `short`-token context) or,
    without `scorer`, by the digit heuristic. Positions are plain 0..length-1 here (the training stage applies
    its position transform)."""
    from ..models import load, resolve
    from .impactful import LogprobDelta, SelectionStats, impactful_rows

    if length < 2 or not 0 < share <= 1 or not 0 <= other_share <= 1:
        raise ConfigError("--length must be ≥ 2, --share in (0, 1] and --other-share in [0, 1]")
    if base and not scorer:
        raise ConfigError("--base needs --scorer (the long model whose log-probabilities it is compared with)")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    bad = BadRecords(on_bad_record)  # type: ignore[arg-type]
    corpus = read_corpus(srcs, tok, text_field, bad)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus))
    fn = None
    if scorer:
        long_model, score_tok = _quiet_load(load, resolve(scorer), device)
        base_model = _quiet_load(load, resolve(base), device)[0] if base else None
        from .tokcache import tokenizer_hash

        if tokenizer_hash(score_tok) != tokenizer_hash(tok):
            raise ConfigError(f"--scorer {scorer} has another tokenizer than --model {model}; score with a model "
                              "of the same family")
        fn = LogprobDelta(long_model, base_model, window=window, short=short)
    stats = SelectionStats()
    ignore_first = np.zeros(length, dtype=bool)
    ignore_first[0] = True

    def batches() -> Iterator[dict[str, object]]:
        with _progress() as pr:
            task = pr.add_task("impactful sentences", total=len(order))

            def docs() -> Iterator[np.ndarray]:
                for d in corpus.docs(order):
                    yield d
                    pr.advance(task)

            for ids in impactful_rows(tok, docs(), length, rng, fn, share=share, other_share=other_share,
                                      stats=stats):
                labels = np.where(ignore_first, -100, ids)
                row = {"input_ids": ids, "position_ids": np.arange(length, dtype=np.int64),
                       "segment_ids": np.zeros(length, dtype=np.int64), "labels": labels}
                yield _one_row(row)

    def card(w: Written, folder: Path) -> str:
        length_histogram(np.array(stats.kept_lengths), folder / "lengths.png", "kept tokens per document")
        how = (f"Δ = log p(`{scorer}`) − log p(`{base}`)" if base else
               f"Δ = log p(`{scorer}`, full context) − log p(short context)" if scorer else
               f"heuristic: digit sentences + {other_share:.0%} of the others")
        facts = [("selection", how), ("impactful share", f"{share:.0%}" if scorer else "—"),
                 ("documents", f"{stats.documents:,}"),
                 ("sentences kept", f"{stats.kept_sentences:,} of {stats.sentences:,}"),
                 ("tokens kept", f"{stats.kept_tokens:,} of {stats.tokens:,}"),
                 ("rows", f"{w.rows:,} × {length:,} tokens"), ("bad records skipped", f"{bad.count:,}"),
                 ("seed", seed), ("command", f"`{command}`")]
        return card_text("ctxstretch data impactful (LongRecipe impactful tokens)", facts,
                     ["Rows are kept sentences, concatenated (documents separated by EOS); positions are "
                      "0..length-1, for the training stage's position transform to replace.", "",
                      "![kept tokens per document](lengths.png)"])

    return write_dataset(out, batches(), card, force,
                         dataset_meta("impactful", model, tok, length, scorer=scorer, base=base, seed=seed,
                                      command=command))


# ------------------------------------------------------------------------------------------------- probes
def build_probes(out: Path, *, model: str = "embedded", kinds: list[str] | None = None, lengths: list[int],
                 depths: list[float] | None = None, count: int = 4, seed: int = 0, haystack: list[str] | None = None,
                 text_field: str = "text", force: bool = False, command: str = "(Python API)") -> Written:
    """Retrieval probes as training rows (exactly their length, loss on the answer): `count` per (kind, length,
    depth), from the evaluation's generators with training seeds. Needle haystacks come from `haystack` sources
    (default: the embedded corpus' training split; evaluation uses the held-out split)."""
    from .probes import ProbeBuilder
    from .ruler import PROBE_KINDS, RulerBuilder, probe_examples

    kinds = kinds or ["passkey", "needle", "niah_multikey", "niah_multivalue"]
    depths = depths if depths is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
    unknown = [k for k in kinds if k not in PROBE_KINDS]
    if unknown:
        raise ConfigError(f"--kinds: {', '.join(unknown)} unknown; choose from {', '.join(PROBE_KINDS)}")
    if not lengths or count < 1 or any(not 0 <= d <= 1 for d in depths) or not depths:
        raise ConfigError("give --lengths (e.g. 1k,4k), --count ≥ 1 and --depths in [0, 1]")
    if not 0 <= seed < 2**40:
        raise ConfigError(f"--seed {seed} must be in [0, 2**40) (larger seeds are evaluation seeds)")
    check_out_dir(out, force)
    tok = load_tokenizer(model)
    hay = None
    if any(k != "passkey" for k in kinds):
        bad = BadRecords("skip")
        hay = read_corpus(haystack or ["embedded"], tok, text_field, bad).tokens
        if len(hay) <= max(lengths):
            raise DataError(f"the haystack has {len(hay):,} tokens, not more than --lengths {max(lengths):,}; "
                            "give more text with --haystack")
    builder = RulerBuilder(ProbeBuilder(tok, hay))
    cells = sum(len(lengths) * (len(depths) if k in ("passkey", "needle") else 1) for k in kinds)
    used: list[int] = []

    def batches() -> Iterator[dict[str, object]]:
        with _progress() as pr:
            task = pr.add_task("probes", total=cells * count)
            examples = probe_examples(builder, kinds, lengths, depths, count, seed)
            while True:
                try:
                    kind, n, d, ex = next(examples)
                except StopIteration:
                    return
                except ValueError as e:  # e.g. a length too short for the needles
                    raise DataError(f"probes: {e}") from None
                row = {"input_ids": ex.input_ids, "position_ids": np.arange(n, dtype=np.int64),
                       "segment_ids": np.zeros(n, dtype=np.int64), "labels": ex.labels}
                answer = tok.decode(ex.input_ids[ex.labels != -100])
                pr.advance(task)
                used.append(n)
                yield _one_row(row, kind=kind, length=n, depth=d, answer=answer.strip())

    def card(w: Written, folder: Path) -> str:
        length_histogram(np.array(used), folder / "lengths.png", "probe lengths")
        facts = [("kinds", ", ".join(kinds)), ("lengths", ", ".join(f"{n:,}" for n in lengths)),
                 ("depths (passkey, needle)", ", ".join(f"{d:g}" for d in depths)), ("per cell", count),
                 ("rows", f"{w.rows:,}"), ("haystack", " ".join(haystack or ["embedded (train split)"])),
                 ("seed (training range)", seed), ("command", f"`{command}`")]
        return card_text("ctxstretch data probes (retrieval probes as training data)", facts,
                     ["Same generators as `ctxstretch eval`, training seeds: no evaluation item is repeated. "
                      "Loss on the answer only; each row is exactly its length.", "",
                      "![probe lengths](lengths.png)"])

    return write_dataset(out, batches(), card, force,
                         dataset_meta("probes", model, tok, max(lengths), lengths=lengths, kinds=kinds, seed=seed,
                                      command=command))
