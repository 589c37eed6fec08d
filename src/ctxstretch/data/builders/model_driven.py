"""Builders that run a model over text sources: `selfinstruct` (Llama 2 Long self-instruct long QA, written by a
generator model) and `impactful` (LongRecipe impactful-token rows, scored by a model or by the digit heuristic)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from pydantic import Field

from ...config import ConfigError
from ..datasets import Written
from ..records import DataError
from ..tokens import pad_id_of
from .corpus import SourceArgs
from .registry import Card, Job, one_row, plain_row, progress, register


def _quiet_load(model: str, device: str):
    """`models.load` of `model` (a directory or 'embedded') without transformers' weight-loading progress bar (ours
    is the one that counts)."""
    from transformers.utils import logging as hf_logging

    from ...models import load, resolve
    from ...train.parallel import resolve_device

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load(resolve(model), device=resolve_device(device))
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _same_tokenizer(a, b) -> bool:
    from ..tokcache import tokenizer_hash

    return tokenizer_hash(a) == tokenizer_hash(b)


# --------------------------------------------------------------------------------------------- self-instruct
class SelfInstructArgs(SourceArgs):
    model: str = Field("embedded", description="the model to train: its tokenizer builds the rows")
    generator: str = Field("embedded", description="local HF model that writes the QA pairs, or 'embedded'")
    length: int = Field(1024, description="tokens per row (the document is truncated to fit)")
    count: int = Field(16, description="questions to ask")
    chunk_len: int | None = Field(None, description="chunk length in generator tokens (default: what fits)")
    short_share: float = Field(0.5, description="share of 'a few words or a single phrase' prompts")
    self_check: bool = Field(True, description="drop pairs the generator itself rejects")
    input_loss: bool = Field(False, description="LM loss on the document too (Llama 2 Long)")
    batch_size: int = Field(8, description="prompts generated at once")
    max_new_tokens: int = Field(32, description="tokens per question and per answer, at most")
    temperature: float = Field(0.7, description="sampling temperature (0: greedy)")
    min_doc_tokens: int = Field(64, description="skip documents shorter than this")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto, cpu or cuda (for the generator)")

    def check(self) -> None:
        if (self.length < 16 or self.count < 1 or not 0 <= self.short_share <= 1 or self.max_new_tokens < 1
                or self.batch_size < 1):
            raise ConfigError("length must be ≥ 16, count, batch_size and max_new_tokens ≥ 1, "
                              "short_share in [0, 1]")


def selfinstruct(a: SelfInstructArgs, tok) -> Job:
    """Llama 2 Long self-instruct long QA: `count` questions about random chunks of the documents of `srcs`,
    written by `generator`; each kept pair becomes one row of `length` tokens (`model`'s tokenizer): document
    (truncated) + question → answer. Loss on the answer; with `input_loss` on the document too."""
    from ...models import resolve
    from .. import selfinstruct as si

    gen_model, gen_tok = _quiet_load(a.generator, a.device)
    corpus, bad = a.corpus(tok)
    writer = si.QAWriter(gen_model, gen_tok, max_question_tokens=a.max_new_tokens,
                         max_answer_tokens=a.max_new_tokens, temperature=a.temperature, batch_size=a.batch_size)
    budget = writer.chunk_budget(a.chunk_len)
    before, after = si.row_template(tok, "")
    keep_tokens = a.length - len(before) - len(after) - 2 * (2 * a.max_new_tokens + 8)
    if keep_tokens < 16:
        raise ConfigError(f"length {a.length} leaves no room for a document next to a question and an answer")
    eos = tok.eos_token_id
    row_docs = [d[:-1][:keep_tokens] if eos is not None else d[:keep_tokens] for d in corpus.docs(range(len(corpus)))]
    row_docs = [d for d in row_docs if len(d) >= a.min_doc_tokens]
    if not row_docs:
        raise DataError(f"no document has min_doc_tokens {a.min_doc_tokens} tokens")
    gen_docs = row_docs if _same_tokenizer(tok, gen_tok) else [
        np.asarray(gen_tok(tok.decode(d), add_special_tokens=False)["input_ids"]) for d in row_docs]
    items = si.plan_questions([len(d) for d in gen_docs], a.count, budget, a.rng(), a.short_share)
    with progress() as pr:
        task = pr.add_task(f"self-instruct ({'generate + self-check' if a.self_check else 'generate'})",
                           total=a.count)
        si.generate_qas(writer, gen_docs, items, seed=a.seed, self_check=a.self_check,
                        progress=lambda n: pr.advance(task, n))
    kept = [it for it in items if it.ok]
    parsed = sum(bool(it.question and it.answer) for it in items)
    if not kept:
        raise DataError(f"the generator wrote no usable pair in {a.count} tries ({parsed} parsed); ask for more "
                        "(count), turn off self_check, or use a stronger generator")
    pad_id = pad_id_of(tok)
    used: list[int] = []

    def batches() -> Iterator[dict[str, object]]:
        for it in kept:
            row = si.selfinstruct_row(tok, row_docs[it.doc], it.question, it.answer, a.length, pad_id=pad_id,
                                      eos_id=eos, input_loss=a.input_loss)
            used.append(int((row["segment_ids"] == 0).sum()))
            yield one_row(row, row["segment_ids"] == 1, question=it.question, answer=it.answer, kind=it.kind,
                          chunk_start=it.chunk[0], chunk_end=it.chunk[1], self_check=it.passed)

    def card(w: Written) -> Card:
        facts = [("generator", f"`{resolve(a.generator)}`"), ("questions asked", a.count),
                 ("pairs parsed", f"{parsed:,}"),
                 ("passed self-check", f"{sum(it.passed is True for it in items):,}" if a.self_check else "not run"),
                 ("examples written", f"{w.rows:,} × {a.length:,} tokens"),
                 ("kinds (normal / short)", f"{sum(it.kind == 'normal' for it in kept)} / "
                                            f"{sum(it.kind == 'short' for it in kept)}"),
                 ("chunk length (generator tokens)", f"{budget:,}"), ("loss", "answer + document" if a.input_loss
                                                                       else "answer only"),
                 ("documents usable", f"{len(row_docs):,}"), ("bad records skipped", f"{bad.count:,}")]
        sample = [f"- **Q** {it.question} — **A** {it.answer}" for it in kept[:5]]
        return Card(facts, ["First pairs:", "", *(sample or ["(none)"])], used, "example lengths (tokens)",
                    "example lengths")

    return Job(batches(), card, a.length, {"generator": str(resolve(a.generator)), "input_loss": a.input_loss})


# ---------------------------------------------------------------------------------------------- impactful
class ImpactfulArgs(SourceArgs):
    length: int = Field(4096, description="tokens per row")
    scorer: str | None = Field(None, description="long model scoring tokens (none: digit heuristic)")
    base: str | None = Field(None, description="base model to compare the scorer with (none: the scorer with a "
                             "short context)")
    short: int | None = Field(None, description="truncated context (tokens) when the scorer has no base")
    window: int | None = Field(None, description="full context (tokens) for scoring")
    share: float = Field(0.2, description="share of tokens that are impactful (with a scorer)")
    other_share: float = Field(0.5, description="heuristic: share of digit-free sentences kept")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto, cpu or cuda (for the scorer)")

    def check(self) -> None:
        if self.length < 2 or not 0 < self.share <= 1 or not 0 <= self.other_share <= 1:
            raise ConfigError("length must be ≥ 2, share in (0, 1] and other_share in [0, 1]")
        if self.base and not self.scorer:
            raise ConfigError("base needs scorer (the long model whose log-probabilities it is compared with)")


def impactful(a: ImpactfulArgs, tok) -> Job:
    """LongRecipe impactful-token rows of `length` tokens: sentences of `srcs` kept by a scorer model (`scorer`
    = the long model, `base` = the base model; without `base`, `scorer` with full vs `short`-token context) or,
    without `scorer`, by the digit heuristic. Positions are plain 0..length-1 here (the training stage applies
    its position transform)."""
    from ..impactful import LogprobDelta, SelectionStats, impactful_rows

    corpus, bad = a.corpus(tok)
    rng = a.rng()
    order = rng.permutation(len(corpus))
    fn = None
    if a.scorer:
        long_model, score_tok = _quiet_load(a.scorer, a.device)
        base_model = _quiet_load(a.base, a.device)[0] if a.base else None
        if not _same_tokenizer(score_tok, tok):
            raise ConfigError(f"scorer {a.scorer} has another tokenizer than model {a.model}; score with a model "
                              "of the same family")
        fn = LogprobDelta(long_model, base_model, window=a.window, short=a.short)
    stats = SelectionStats()
    ignore_first = np.zeros(a.length, dtype=bool)
    ignore_first[0] = True

    def batches() -> Iterator[dict[str, object]]:
        with progress() as pr:
            task = pr.add_task("impactful sentences", total=len(order))

            def docs() -> Iterator[np.ndarray]:
                for d in corpus.docs(order):
                    yield d
                    pr.advance(task)

            for ids in impactful_rows(tok, docs(), a.length, rng, fn, share=a.share, other_share=a.other_share,
                                      stats=stats):
                yield one_row(plain_row(ids, np.where(ignore_first, -100, ids)))

    def card(w: Written) -> Card:
        how = (f"Δ = log p(`{a.scorer}`) − log p(`{a.base}`)" if a.base else
               f"Δ = log p(`{a.scorer}`, full context) − log p(short context)" if a.scorer else
               f"heuristic: digit sentences + {a.other_share:.0%} of the others")
        facts = [("selection", how), ("impactful share", f"{a.share:.0%}" if a.scorer else "—"),
                 ("documents", f"{stats.documents:,}"),
                 ("sentences kept", f"{stats.kept_sentences:,} of {stats.sentences:,}"),
                 ("tokens kept", f"{stats.kept_tokens:,} of {stats.tokens:,}"),
                 ("rows", f"{w.rows:,} × {a.length:,} tokens"), ("bad records skipped", f"{bad.count:,}")]
        return Card(facts, ["Rows are kept sentences, concatenated (documents separated by EOS); positions are "
                            "0..length-1, for the training stage's position transform to replace."],
                    stats.kept_lengths, "kept tokens per document", "kept tokens per document")

    return Job(batches(), card, a.length, {"scorer": a.scorer, "base": a.base})


build_selfinstruct = register("selfinstruct", SelfInstructArgs, selfinstruct,
                              "ctxstretch data selfinstruct (Llama 2 Long self-instruct long QA)", positional=("srcs",))
build_impactful = register("impactful", ImpactfulArgs, impactful,
                           "ctxstretch data impactful (LongRecipe impactful tokens)", positional=("srcs",))
