"""Synthetic training data: impactful-token selection keeps exactly the sentences it should; self-instruct parses
tags and the embedded model writes real (poor) examples with loss only where asked; training probes never repeat
an evaluation item; the token cache is hit on a second run and gives identical rows; datasets record their
tokenizer and refuse another one."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstretch.data import builders
from ctxstretch.data import datasets as dsets
from ctxstretch.data.impactful import (
    LogprobDelta,
    SelectionStats,
    digit_vocab,
    heuristic_keep,
    impactful_mask,
    impactful_rows,
    keep_sentences,
    sentence_spans,
    sentences_with,
)
from ctxstretch.data.probes import EVAL_SEED_OFFSET, IGNORE, ProbeBuilder, rng_for
from ctxstretch.data.records import DataError
from ctxstretch.data.ruler import RulerBuilder, probe_examples
from ctxstretch.data.selfinstruct import QAWriter, chunk_spans, generate_qas, parse_qa, plan_questions, selfinstruct_row
from ctxstretch.data.sentences import BoundaryVocab
from tests.data.test_data import _cli

FAST = settings(max_examples=50, deadline=None)
SENTENCES = ["The cat sat on the mat.", " It has 3 legs.", " Dogs bark loudly.", " In 1999 it rained.",
             " Nothing else happened.", " The end is near!"]


ORIGINAL_CACHE = os.environ.get("CTXSTRETCH_CACHE")


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CTXSTRETCH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return BoundaryVocab.from_tokenizer(tokenizer), digit_vocab(tokenizer)


def _enc(tok, text):
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------- impactful
@FAST
@given(ends=st.lists(st.booleans(), max_size=40), keep_seed=st.integers(0, 2**16))
def test_sentence_spans_partition_the_document_and_keep_selects_whole_sentences(ends, keep_seed):
    ends = np.array(ends, dtype=bool)
    spans = sentence_spans(ends)
    if len(ends):
        assert spans[0, 0] == 0 and spans[-1, 1] == len(ends) and (spans[1:, 0] == spans[:-1, 1]).all()
        assert (spans[:, 1] > spans[:, 0]).all() and ends[spans[:-1, 1] - 1].all()
    ids = np.arange(len(ends)) + 100
    keep = np.random.default_rng(keep_seed).random(len(spans)) < 0.5
    want = [ids[s:e] for (s, e), k in zip(spans, keep, strict=True) if k]
    assert np.array_equal(keep_sentences(ids, spans, keep), np.concatenate([np.zeros(0, int), *want]))


def test_heuristic_keeps_every_digit_sentence_and_about_half_the_others(tokenizer, vocab):
    boundaries, digits = vocab
    ids = _enc(tokenizer, "".join(SENTENCES))
    spans = sentence_spans(boundaries.sentence_ends(ids))
    texts = [tokenizer.decode(ids[s:e]) for s, e in spans]
    assert texts == SENTENCES
    has_digit = sentences_with(spans, digits[ids])
    assert has_digit.tolist() == [False, True, False, True, False, False]
    assert heuristic_keep(ids, spans, digits, np.random.default_rng(0), other_share=0).tolist() == has_digit.tolist()
    assert heuristic_keep(ids, spans, digits, np.random.default_rng(0), other_share=1).all()
    kept = np.array([heuristic_keep(ids, spans, digits, np.random.default_rng(s)) for s in range(400)])
    assert kept[:, has_digit].all() and 0.4 < kept[:, ~has_digit].mean() < 0.6
    again = np.array([heuristic_keep(ids, spans, digits, np.random.default_rng(s)) for s in range(400)])
    assert np.array_equal(kept, again)  # seeded


def test_scored_selection_drops_sentences_without_an_impactful_token(tokenizer, vocab):
    ids = _enc(tokenizer, "".join(SENTENCES))
    marked = {int(t) for t in _enc(tokenizer, " has")} | {int(t) for t in _enc(tokenizer, " else")}

    def scorer(x):  # Δ large on the tokens of " has" and " else", small elsewhere; position 0 unscored
        d = np.where(np.isin(x, list(marked)), 5.0, -1.0)
        d[0] = np.nan
        return d

    is_marked = np.isin(ids, list(marked))
    is_marked[0] = False
    share = is_marked.sum() / (len(ids) - 1)  # exactly the marked tokens are the top share
    assert np.array_equal(impactful_mask(scorer(ids), share), is_marked)
    assert impactful_mask(scorer(ids), 0.2).sum() == int(np.ceil(0.2 * (len(ids) - 1)))
    stats = SelectionStats()
    length = 12
    rows = list(impactful_rows(tokenizer, [ids, ids], length, np.random.default_rng(0), scorer, share=share,
                               boundaries=vocab[0], stats=stats))
    kept = _enc(tokenizer, SENTENCES[1] + SENTENCES[4])
    stream = np.concatenate([kept, kept])
    assert stats.kept_sentences == 4 and stats.sentences == 12
    assert all(len(r) == length for r in rows) and len(rows) == len(stream) // length
    assert np.array_equal(np.concatenate(rows), stream[: len(rows) * length])


def test_heuristic_rows_are_digit_sentences_only_when_others_are_dropped(tokenizer, vocab):
    docs = [_enc(tokenizer, "".join(SENTENCES[i:] + SENTENCES[:i])) for i in range(6)]
    rows = list(impactful_rows(tokenizer, docs, 8, np.random.default_rng(1), other_share=0.0, boundaries=vocab[0],
                               digits=vocab[1]))
    text = tokenizer.decode(np.concatenate(rows))
    assert rows and all(r.dtype == np.int64 and len(r) == 8 for r in rows)
    assert "legs" in text and "1999" in text and "cat" not in text and "bark" not in text


def test_logprob_delta_one_model_full_vs_truncated_context(tokenizer):
    from tests.conftest import micro_llama

    model = micro_llama(tokenizer, window=64)
    ids = _enc(tokenizer, "".join(SENTENCES) * 3)[:60]
    delta = LogprobDelta(model, window=64, short=8)(ids)
    assert delta.shape == ids.shape and np.isnan(delta[0]) and np.isfinite(delta[1:]).all()
    assert np.allclose(delta[1:5], 0, atol=1e-5)  # inside the first short window both contexts are the same
    assert np.abs(delta[20:]).max() > 1e-4
    two = LogprobDelta(model, micro_llama(tokenizer, window=64), window=64)(ids)
    assert np.allclose(two[1:], 0, atol=1e-5)  # the same weights: no token is impactful


# ---------------------------------------------------------------------------------------------- selfinstruct
def test_parse_qa_reads_tags_and_rejects_empty_or_broken_pairs():
    assert parse_qa("junk <question> Who  wrote it?\n</question>\n<answer>Ada</answer> more") == ("Who wrote it?",
                                                                                                  "Ada")
    assert parse_qa("<question>Q?</question><answer>a few words") == ("Q?", "a few words")
    for bad in ("<question>Q?</question>", "<question> </question><answer>A</answer>",
                "<question>Q?</question><answer>.</answer>", "<answer>A</answer><question>Q</question>",
                "<question>Q <question>x</question><answer>A</answer>", "no tags at all"):
        assert parse_qa(bad) is None, bad
    assert chunk_spans(9, 4) == [(0, 4), (4, 9)] and chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]


DOC = ("The lighthouse keeper, Mara Voss, lit the lamp every evening at seven. The island had 42 sheep and one "
       "dog named Pilot. Ships from Brest passed twice a week, carrying flour and letters. In 1911 a storm broke "
       "the lantern glass, and Mara kept the light burning with oil lamps for nine nights. ") * 2


def test_embedded_model_writes_real_examples_with_loss_only_on_the_answer(tokenizer):
    from ctxstretch.models import load, resolve

    model, gen_tok = load(resolve("embedded"))
    writer = QAWriter(model, gen_tok, max_question_tokens=16, max_answer_tokens=12, batch_size=4)
    doc = _enc(tokenizer, DOC)
    items = plan_questions([len(doc)], 4, writer.chunk_budget(), np.random.default_rng(0))
    assert {it.kind for it in items} == {"short", "normal"}
    generate_qas(writer, [doc], items, seed=0, self_check=True)
    good = [it for it in items if it.question and it.answer]
    assert good, [it.raw for it in items]
    assert all(it.passed is not None for it in good) and all(parse_qa(it.raw) for it in good)
    it = good[0]
    eos = tokenizer.eos_token_id
    row = selfinstruct_row(tokenizer, doc, it.question, it.answer, 400, pad_id=eos, eos_id=eos)
    n = int((row["segment_ids"] == 0).sum())
    assert len(row["input_ids"]) == 400 and np.array_equal(row["input_ids"][: len(doc)], doc)
    labelled = row["labels"] != IGNORE
    answer = [*_enc(tokenizer, " " + it.answer), eos]
    assert row["labels"][labelled].tolist() == answer and labelled[n - len(answer) : n].all()
    assert row["position_ids"][n] == 0 and (row["segment_ids"][n:] == 1).all()
    with_input = selfinstruct_row(tokenizer, doc, it.question, it.answer, 400, pad_id=eos, eos_id=eos,
                                  input_loss=True)
    lab = with_input["labels"]
    assert lab[0] == IGNORE and np.array_equal(lab[1 : len(doc)], doc[1:])
    assert (lab[len(doc) : n - len(answer)] == IGNORE).all() and lab[n - len(answer) : n].tolist() == answer


@pytest.mark.real_model
def test_chat_template_rows_wrap_the_document_in_a_user_turn(tokenizer, monkeypatch, request):
    monkeypatch.delenv("CTXSTRETCH_CACHE")
    if ORIGINAL_CACHE:
        monkeypatch.setenv("CTXSTRETCH_CACHE", ORIGINAL_CACHE)
    path = request.getfixturevalue("smollm2")  # the user's model cache, not this module's temporary one
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(path)
    doc = _enc(chat, DOC)
    row = selfinstruct_row(chat, doc, "Who keeps the light?", "Mara Voss", 300, pad_id=0, eos_id=chat.eos_token_id)
    text = chat.decode(row["input_ids"][row["segment_ids"] == 0])
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nThe lighthouse" in text
    assert text.endswith("Question: Who keeps the light?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
                         "Mara Voss<|im_end|>")
    assert chat.decode(row["input_ids"][row["labels"] != IGNORE]) == "Mara Voss<|im_end|>"


# ---------------------------------------------------------------------------------------------- probes
def test_training_probes_never_repeat_an_evaluation_item(tokenizer):
    hay = np.tile(_enc(tokenizer, DOC), 20)
    ruler = RulerBuilder(ProbeBuilder(tokenizer, hay))
    kinds, lengths, depths = ["passkey", "needle", "niah_multikey", "niah_multivalue"], [200, 300], [0.0, 0.5, 1.0]
    train = list(probe_examples(ruler, kinds, lengths, depths, 6, seed=0))
    evals = []
    for seed in range(3):  # the items `ctxstretch eval` draws (eval/passkey.py, eval/ruler.py), three eval seeds
        for kind in kinds:
            for n in lengths:
                if kind in ("passkey", "needle"):
                    for d in depths:
                        rng = rng_for(f"{kind}-{n}-{d}", seed, evaluation=True)
                        make = ruler.p.passkey if kind == "passkey" else ruler.p.needle
                        evals += [make(rng, n, d) for _ in range(6)]
                else:
                    rng = rng_for(f"ruler-{kind}-{n}", seed, evaluation=True)
                    evals += [ruler.make(kind, rng, n) for _ in range(6)]
        same_stream = list(probe_examples(ruler, kinds, lengths, depths, 6, seed=seed, evaluation=True))
        assert all(np.array_equal(a[3].input_ids, b.input_ids)
                   for a, b in zip(same_stream, evals[-len(same_stream):], strict=True))
    assert len(train) == 2 * 3 * 6 * 2 + 2 * 6 * 2
    assert all(len(ex.input_ids) == n for _, n, _, ex in train)
    eval_rows = {ex.input_ids.tobytes() for ex in evals}
    eval_answers = {ex.input_ids[ex.labels != IGNORE].tobytes() for ex in evals}
    assert not any(ex.input_ids.tobytes() in eval_rows for *_, ex in train)
    assert sum(ex.input_ids[ex.labels != IGNORE].tobytes() in eval_answers for *_, ex in train) <= 1
    with pytest.raises(ValueError, match="evaluation range"):
        next(probe_examples(ruler, ["passkey"], [200], [0.5], 1, seed=EVAL_SEED_OFFSET))


# ---------------------------------------------------------------------------------------------- cache, CLI
def _corpus(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": DOC[: 40 + 30 * i]}) + "\n" for i in range(10)))
    (src / "b.txt").write_text(DOC)
    return src


def test_token_cache_is_hit_on_a_second_run_and_gives_identical_rows(tmp_path, monkeypatch):
    import datasets

    from ctxstretch.data import tokenized

    src = _corpus(tmp_path)
    builders.build_pack([str(src)], tmp_path / "p1", length=64)
    entries = list((Path(os.environ["CTXSTRETCH_CACHE"]) / "tokens").iterdir())
    assert entries and (entries[-1] / "tokens.arrow").is_file()

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again instead of reading the cache")

    monkeypatch.setattr(tokenized.TokenizedCorpus, "build", no_tokenising)
    builders.build_pack([str(src)], tmp_path / "p2", length=64)
    builders.build_cip([str(src)], tmp_path / "c2", length=64, chunk_len=8)
    a, b = datasets.load_from_disk(str(tmp_path / "p1")), datasets.load_from_disk(str(tmp_path / "p2"))
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] and len(a) > 3
    (src / "b.txt").write_text(DOC + " changed")  # another fingerprint: tokenised again
    with pytest.raises(AssertionError, match="tokenised again"):
        builders.build_pack([str(src)], tmp_path / "p3", length=64)


def test_cli_selfinstruct_impactful_probes_write_datasets_that_know_their_tokenizer(tmp_path, tokenizer):
    import datasets

    src = _corpus(tmp_path)
    code, out = _cli("selfinstruct", src / "b.txt", "--length", 256, "--count", 4, "--batch-size", 4,
                     "--max-new-tokens", 16, "--min-doc-tokens", 32, "--input-loss", "--no-self-check",
                     "--out", tmp_path / "si")
    assert code == 0, out
    ds = datasets.load_from_disk(str(tmp_path / "si"))
    assert len(ds) >= 1 and all(len(r) == 256 for r in ds["input_ids"]) and ds[0]["question"]
    assert "self-instruct" in (tmp_path / "si" / "card.md").read_text()
    code, out = _cli("impactful", src, "--length", 32, "--out", tmp_path / "imp")
    assert code == 0, out
    assert all(len(r) == 32 for r in datasets.load_from_disk(str(tmp_path / "imp"))["input_ids"])
    code, out = _cli("probes", "--kinds", "passkey,needle", "--lengths", "128", "--depths", "0,1", "--count", 2,
                     "--haystack", src, "--out", tmp_path / "pr")
    assert code == 0, out
    ds = datasets.load_from_disk(str(tmp_path / "pr"))
    assert ds["kind"] == ["passkey"] * 4 + ["needle"] * 4 and ds["depth"] == [0.0, 0.0, 1.0, 1.0] * 2
    for name in ("si", "imp", "pr"):
        assert (tmp_path / name / "lengths.png").is_file()
        meta = dsets.check_dataset_tokenizer(tmp_path / name, tokenizer)
        assert meta["tokenizer"]["tokenizer_sha256"] and meta["length"] in (256, 32, 128)
    other = tokenizer.__class__.from_pretrained(meta["tokenizer"]["model"])
    other.add_tokens(["<brand-new>"])
    with pytest.raises(DataError, match="another|tokenizer"):
        dsets.check_dataset_tokenizer(tmp_path / "pr", other)


@pytest.mark.parametrize("args", [
    ("probes", "--kinds", "passkey,bogus", "--lengths", "128"),
    ("probes", "--lengths", "128", "--depths", "0,x"),
    ("probes", "--kinds", "passkey", "--lengths", "8"),
    ("impactful", "embedded", "--share", "2"),
    ("impactful", "embedded", "--base", "embedded"),
    ("selfinstruct", "nope.txt", "--count", "2"),
    ("selfinstruct", "embedded", "--generator", "/no/such/model"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args):
    code, out = _cli(*args, "--out", tmp_path / "o")
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out, out
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()


# ------------------------------------------------------------------------------------------------ registry
def test_every_registered_builder_has_a_python_api_with_its_arguments_signature():
    import inspect

    assert set(builders.REGISTRY) == {"pack", "cip", "synl", "selfinstruct", "impactful", "probes"}
    for kind, spec in builders.REGISTRY.items():
        sig = inspect.signature(getattr(builders, f"build_{kind}"))
        params = list(sig.parameters)
        assert params[: len(spec.positional) + 1] == [*spec.positional, "out"], kind
        assert set(params) == {*spec.args.model_fields, "out", "force", "command"}, kind
        for name, field in spec.args.model_fields.items():
            if name not in spec.positional and not field.is_required():
                assert sig.parameters[name].default == field.get_default(call_default_factory=True), (kind, name)


@pytest.mark.parametrize("call,message", [
    (lambda out: builders.build_pack(["embedded"], out, length=1), "length 1 must be at least 2"),
    (lambda out: builders.build_cip(["embedded"], out, interleave="zigzag"), "interleave must be round-robin"),
    (lambda out: builders.build_synl(out, lengths=[], count=1), "give lengths"),
    (lambda out: builders.build_probes(out, lengths=[128], kinds=["bogus"]), "kinds: bogus unknown"),
    (lambda out: builders.build_probes(out, lengths=[128], seed=2**41), "must be in [0, 2**40)"),
    (lambda out: builders.build_impactful(["embedded"], out, base="embedded"), "base needs scorer"),
    (lambda out: builders.build_selfinstruct(["embedded"], out, length=8), "length must be ≥ 16"),
    (lambda out: builders.build_pack(["embedded"], out, length="many"), "field 'length'"),
])
def test_python_api_errors_name_arguments_not_command_line_flags(tmp_path, call, message):
    from ctxstretch.config import ConfigError

    with pytest.raises(ConfigError) as e:
        call(tmp_path / "out")
    assert message in str(e.value) and "--" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_run_builder_takes_typed_arguments_and_the_api_takes_paths(tmp_path):
    import datasets

    from ctxstretch.data.builders.synth import SynlArgs
    from ctxstretch.tiny import MODEL_DIR

    a = builders.run_builder("synl", SynlArgs(lengths=[200], count=1, seed=3), tmp_path / "a")
    b = builders.build_synl(tmp_path / "b", lengths=[200], count=1, seed=3, model=Path(MODEL_DIR))
    assert a.rows == b.rows == 1
    assert datasets.load_from_disk(str(tmp_path / "a"))["input_ids"] == datasets.load_from_disk(
        str(tmp_path / "b"))["input_ids"]
    with pytest.raises(TypeError):
        builders.build_synl(tmp_path / "c", lengths=[200], cuont=1)  # like any Python function
