"""Data: readers report bad records by file:line; packed rows never attend across documents; CIP keeps every token
once and in order; SynL answers follow from the rendered table; `ctxstretch data` writes all or nothing."""

import csv
import io
import itertools
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.data.cip import cip_rows, cip_sequence, interleave_order
from ctxstretch.data.packing import iter_packed, pack_rows
from ctxstretch.data.probes import IGNORE
from ctxstretch.data.readers import read_documents, read_sources
from ctxstretch.data.records import BadRecords, DataError, Document
from ctxstretch.data.synl import KINDS, synl_example, synl_row
from ctxstretch.data.tokenized import TokenizedCorpus
from ctxstretch.data.tokens import tokenize_batches
from ctxstretch.data.weighting import long_document_weights, plan_documents, source_multipliers
from ctxstretch.masking import mask_for_model
from tests.conftest import micro_llama

FAST = settings(max_examples=60, deadline=None)


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory, monkeypatch):
    """The token cache goes to a temporary folder, never the user's."""
    monkeypatch.setenv("CTXSTRETCH_CACHE", str(tmp_path_factory.mktemp("cache")))


# ------------------------------------------------------------------------------------------------------ readers
@pytest.fixture
def messy(tmp_path):
    """A folder with good files and every kind of bad record."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text\nsecond line\n")
    (root / "sub" / "b.md").write_text("# beta\n")
    (root / "c.py").write_text("print('gamma')\n")
    (root / "empty.txt").write_text("  \n")
    (root / "binary.txt").write_bytes(b"line one\nline\0two\n")
    (root / "latin.txt").write_bytes(b"ok\ncaf\xe9\n")
    (root / "d.jsonl").write_text('{"text": "delta"}\n{"text": \n\n{"body": "x"}\n{"text": ""}\n{"text": 7}\n'
                                  '{"text": "epsilon"}\n')
    (root / "skip.bin").write_bytes(b"\0\1\2")  # unknown suffix inside a folder: not read
    return root


def test_folder_reads_good_documents_and_counts_bad_ones_with_file_and_line(messy):
    bad = BadRecords("skip")
    docs = list(read_documents(messy, bad=bad))
    assert [d.text for d in docs] == ["alpha text\nsecond line\n", "print('gamma')\n", "delta", "epsilon",
                                      "# beta\n"]
    assert {d.source for d in docs} == {"corpus"}
    where = {(r.path.split("/")[-1], r.line, r.reason.split(" (")[0]) for r in bad.examples}
    assert where == {("binary.txt", 2, "binary file"), ("latin.txt", 2, "undecodable bytes"),
                     ("empty.txt", 1, "empty text"), ("d.jsonl", 2, "invalid JSON"),
                     ("d.jsonl", 4, "missing field 'text'"), ("d.jsonl", 5, "empty text"),
                     ("d.jsonl", 6, "field 'text' is int, not a string")}
    assert bad.count == 7


def test_fail_policy_raises_one_line_naming_file_line_and_fix(messy):
    with pytest.raises(DataError) as e:
        list(read_documents(messy / "d.jsonl"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{messy / 'd.jsonl'}:2: invalid JSON") and "--on-bad-record skip" in msg


def test_jsonl_streams_and_text_field_is_configurable(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "first"}\n{"body": "second"}\nnot json at all\n')
    docs = read_documents(path, text_field="body")
    assert next(docs).text == "first"  # lazy: the bad third line is not reached yet
    assert next(docs).where == f"{path}:2"
    with pytest.raises(DataError, match=r"x\.jsonl:3: invalid JSON"):
        next(docs)


def test_parquet_arrow_and_saved_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["one", None, "", "four"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "f.feather"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    datasets.Dataset.from_dict({"content": ["ds one", "ds two"]}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["split doc"]})}).save_to_disk(
        str(tmp_path / "dd"))
    for name in ("t.parquet", "s.arrow", "f.feather"):
        bad = BadRecords("skip")
        assert [d.text for d in read_documents(tmp_path / name, bad=bad)] == ["one", "four"], name
        assert sorted((r.line, r.reason) for r in bad.examples) == [(2, "missing text (null)"), (3, "empty text")]
    assert [d.text for d in read_documents(tmp_path / "saved", text_field="content")] == ["ds one", "ds two"]
    assert [d.text for d in read_documents(tmp_path / "dd")] == ["split doc"]
    with pytest.raises(DataError, match="missing field 'text'.*--text-field"):
        list(read_documents(tmp_path / "saved"))
    # inside a folder, a saved dataset is read as one (not as loose Arrow files); a corrupt file is a bad record
    (tmp_path / "notes.txt").write_text("a note")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    bad = BadRecords("skip")
    texts = [d.text for d in read_documents(tmp_path, bad=bad)]
    assert texts.count("split doc") == 1 and "a note" in texts and texts.count("four") == 3
    assert any(r.path.endswith("broken.parquet") and "not a readable Parquet" in r.reason for r in bad.examples)


def test_embedded_source_and_missing_path(tmp_path):
    docs = list(itertools.islice(read_sources(["embedded"]), 2))
    assert len(docs) == 2 and all(d.source == "embedded" and d.text.strip() for d in docs)
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------------ packing
def _real(rows):
    return rows.input_ids[~rows.pad]


@FAST
@given(lengths=st.lists(st.integers(0, 40), max_size=12), length=st.integers(1, 24), split_short=st.booleans())
def test_pack_rows_keeps_every_token_and_restarts_positions(lengths, length, split_short):
    docs = [np.arange(n) + 1000 * (i + 1) for i, n in enumerate(lengths)]
    rows = pack_rows(docs, length, split_short=split_short)
    assert rows.input_ids.shape[1:] == (length,)
    assert np.array_equal(_real(rows), np.concatenate([np.zeros(0, int), *docs]))
    # position 0 exactly at each piece start (a document start or a row start); labels ignored there and on padding
    doc_of = rows.input_ids // 1000
    starts = np.ones_like(rows.pad)
    starts[:, 1:] = (doc_of[:, 1:] != doc_of[:, :-1]) | (rows.pad[:, 1:] != rows.pad[:, :-1])
    assert np.array_equal(rows.position_ids == 0, starts)
    assert np.array_equal(rows.labels == IGNORE, starts | rows.pad)
    assert (np.diff(rows.segment_ids, axis=1) == starts[:, 1:]).all()
    if not split_short:  # a document that fits in a row is never split
        for d in docs:
            if 0 < len(d) <= length:
                assert ((rows.input_ids == d[0]).any(axis=1) == (rows.input_ids == d[-1]).any(axis=1)).all()


@FAST
@given(lengths=st.lists(st.integers(0, 30), max_size=15), length=st.integers(1, 16), block=st.integers(1, 4),
       split_short=st.booleans())
def test_streamed_packing_equals_packing_at_once(lengths, length, block, split_short):
    docs = [np.arange(n) + 100 * i for i, n in enumerate(lengths)]
    whole = pack_rows(docs, length, split_short=split_short)
    parts = list(iter_packed(iter(docs), length, rows_per_block=block, split_short=split_short))
    for f in ("input_ids", "position_ids", "segment_ids", "labels", "pad"):
        got = np.concatenate([getattr(p, f) for p in parts]) if parts else getattr(whole, f)
        assert np.array_equal(got, getattr(whole, f)), f


def test_long_documents_are_upsampled_and_sources_mixed():
    lengths = np.array([10] * 400 + [1000] * 100)
    w = long_document_weights(lengths, 500, 3.0)
    assert w[:400].max() == 1 and w[400:].min() == 3
    order = plan_documents(lengths, np.zeros(500, int), np.random.default_rng(0), long_threshold=500, long_weight=3.0)
    assert 250 <= (order >= 400).sum() <= 350 and (order < 400).sum() == 400
    assert np.array_equal(order, plan_documents(lengths, np.zeros(500, int), np.random.default_rng(0),
                                                long_threshold=500, long_weight=3.0))
    # two sources of 4,000 and 100,000 tokens mixed 1:1 → about equal token shares
    sources = np.array([0] * 400 + [1] * 100)
    assert np.allclose(source_multipliers(np.array([4000, 100_000]), np.array([1.0, 1.0])), [13, 0.52])
    order = plan_documents(lengths, sources, np.random.default_rng(1), source_weights=np.array([1.0, 1.0]))
    share = lengths[order][sources[order] == 0].sum() / lengths[order].sum()
    assert 0.45 < share < 0.55


def test_batched_tokenisation_matches_the_tokenizer(tokenizer):
    texts = ["Hello world.", "", "x = 12345\n" * 40, "ünïcödé text"]
    got = list(tokenize_batches(tokenizer, iter(texts), batch=3, eos_id=tokenizer.eos_token_id))
    want = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [g.tolist() for g in got] == [[*w, tokenizer.eos_token_id] for w in want]


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_row_logits_equal_each_document_alone(tokenizer, impl):
    model = micro_llama(tokenizer, window=64)
    model.set_attn_implementation(impl)
    texts = ["The cat sat on the mat.", "def f(x):\n    return x + 1\n",
             "A longer third document that will not fit in what is left of the row, so it is split across rows."]
    corpus = TokenizedCorpus.build(tokenizer, [Document(t, "s", "") for t in texts], eos_id=tokenizer.eos_token_id)
    rows = pack_rows(list(corpus.docs(range(3))), 32, pad_id=tokenizer.eos_token_id)
    assert len(rows) >= 2 and rows.segment_ids.max() >= 2
    mask = mask_for_model(model, torch.tensor(rows.segment_ids))
    assert mask.dtype == (torch.float32 if impl == "eager" else torch.bool)
    packed = model(input_ids=torch.tensor(rows.input_ids), position_ids=torch.tensor(rows.position_ids),
                   attention_mask=mask, use_cache=False).logits
    for r in range(len(rows)):
        for s in np.unique(rows.segment_ids[r][~rows.pad[r]]):
            sel = rows.segment_ids[r] == s
            alone = model(input_ids=torch.tensor(rows.input_ids[r][sel])[None],
                          position_ids=torch.tensor(rows.position_ids[r][sel])[None], use_cache=False).logits
            assert torch.allclose(packed[r, torch.tensor(sel)], alone[0], atol=1e-5), (impl, r, s)


# ---------------------------------------------------------------------------------------------------------- CIP
@FAST
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=6), chunk=st.integers(1, 16),
       mode=st.sampled_from(["round_robin", "random"]), seed=st.integers(0, 2**16))
def test_cip_keeps_every_token_once_and_in_document_order(lengths, chunk, mode, seed):
    docs = [np.arange(n) + 1000 * i for i, n in enumerate(lengths)]
    ids, doc = cip_sequence(docs, chunk, mode, np.random.default_rng(seed))
    assert len(ids) == sum(lengths)
    for i, d in enumerate(docs):
        assert np.array_equal(ids[doc == i], d) and np.array_equal(ids[ids // 1000 == i], d)
    # chunks are chunk-sized runs (a document's last chunk may be shorter)
    runs = np.split(ids, np.flatnonzero(np.diff(doc)) + 1) if len(ids) else []
    for run in runs:
        assert len(run) % chunk == 0 or run[-1] % 1000 == lengths[run[0] // 1000] - 1


@FAST
@given(lengths=st.lists(st.integers(1, 80), min_size=1, max_size=10), length=st.integers(4, 64),
       k=st.integers(0, 4), mode=st.sampled_from(["round_robin", "random"]))
def test_cip_rows_keep_every_token_once_and_in_order(lengths, length, k, mode):
    docs = [np.arange(n) + 1000 * i for i, n in enumerate(lengths)]
    rows = cip_rows(docs, length, k=k, chunk_len=5, mode=mode, rng=np.random.default_rng(0), rows_per_block=2)
    tokens = _real(rows)
    assert rows.input_ids.shape[1] == length and len(tokens) == sum(lengths)
    for i, d in enumerate(docs):
        assert np.array_equal(tokens[tokens // 1000 == i], d)


def test_round_robin_order_and_seeded_random_order():
    doc, number = interleave_order(np.array([2, 1, 3]))
    assert list(zip(doc.tolist(), number.tolist(), strict=True)) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (2, 2)]
    a = interleave_order(np.array([5, 5, 5]), "random", np.random.default_rng(3))
    b = interleave_order(np.array([5, 5, 5]), "random", np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], np.repeat([0, 1, 2], 5))


# --------------------------------------------------------------------------------------------------------- SynL
def _parse_table(prompt: str, fmt: str) -> list[dict[str, str]]:
    body = prompt[prompt.index("\n\n") + 2 : prompt.index("\n\nQuestion:")]
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(body)))
    lines = [ln for ln in body.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], r, strict=True)) for r in cells[1:]]


def _recompute(rows: list[dict[str, str]], q) -> str:
    by_id = {r["id"]: r for r in rows}
    if q.kind == "lookup":
        return by_id[q.key][q.column]
    if q.kind == "two_hop":
        return by_id[by_id[q.key][q.ref]][q.column]
    if q.kind == "extremum":
        pick = max if q.op == "max" else min
        return pick(rows, key=lambda r: int(r[q.column]))["id"]
    num = q.op in (">", "<")

    def val(x: str):
        return int(x) if num else x  # ISO dates and categories compare as strings

    test = {"=": lambda a, b: a == b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
            "after": lambda a, b: a > b, "before": lambda a, b: a < b}[q.op]
    return str(sum(test(val(r[q.column]), val(q.value)) for r in rows))


@pytest.mark.parametrize("fmt", ["markdown", "csv"])
@pytest.mark.parametrize("target", [300, 900])
def test_synl_answers_follow_from_the_rendered_table(tokenizer, fmt, target):
    for i, kind in enumerate(KINDS * 3):
        ex = synl_example(tokenizer, target, np.random.default_rng([target, i]), fmt=fmt, kind=kind)
        rows = _parse_table(ex.prompt, fmt)
        q = ex.question
        assert len(rows) == ex.n_rows and len({r["id"] for r in rows}) == len(rows)
        assert _recompute(rows, q) == ex.answer, (q, ex.answer)
        assert q.column in q.text and q.key in q.text and q.value in q.text and q.text in ex.prompt
        # the table grew to the target: the example fits, and two more rows would not
        row_tokens = max(len(tokenizer(ln)["input_ids"]) for ln in ex.prompt.splitlines()[3:6])
        assert target - 2 * row_tokens < ex.n_tokens <= target
        row = synl_row(tokenizer, ex, target, tokenizer.eos_token_id, tokenizer.eos_token_id)
        labelled = row["input_ids"][row["labels"] != IGNORE]
        assert tokenizer.decode(labelled[:-1]).strip() == ex.answer and labelled[-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------------- CLI
runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, ["data", *map(str, args)])
    return result.exit_code, result.output


def test_cli_pack_malformed_jsonl_exits_2_and_writes_nothing(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n')
    out = tmp_path / "out"
    code, output = _cli("pack", src, "--length", 16, "--out", out)
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in output and len(lines) == 1, output
    assert lines[0].startswith("error:") and "src.jsonl:2: invalid JSON" in lines[0]
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_cli_pack_cip_synl_write_datasets_with_cards(tmp_path):
    import datasets

    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i}. " * (3 + i)}) + "\n"
                                         for i in range(12)) + "oops\n")
    (src / "b.txt").write_text("A plain text document.\n" * 5)
    code, output = _cli("pack", src, "--length", 64, "--out", tmp_path / "p", "--on-bad-record", "skip",
                        "--long-threshold", 30, "--long-weight", 2)
    assert code == 0, output
    ds = datasets.load_from_disk(str(tmp_path / "p"))
    assert set(ds.column_names) == {"input_ids", "position_ids", "segment_ids", "labels"}
    assert all(len(r) == 64 for r in ds["input_ids"])
    card = (tmp_path / "p" / "card.md").read_text()
    assert "a.jsonl:13" in card and "| bad records skipped | 1 |" in card and "--long-weight 2.0" in card
    assert (tmp_path / "p" / "lengths.png").stat().st_size > 1000

    code, output = _cli("pack", src, "--length", 64, "--out", tmp_path / "p", "--on-bad-record", "skip")
    assert code == 2 and "--force" in output

    code, output = _cli("cip", src, "--length", 48, "--chunk-len", 8, "--interleave", "random", "--out",
                        tmp_path / "c", "--on-bad-record", "skip", "--seed", 3)
    assert code == 0, output
    assert len(datasets.load_from_disk(str(tmp_path / "c"))[0]["input_ids"]) == 48

    code, output = _cli("synl", "--lengths", "200,400", "--count", 2, "--format", "csv", "--out", tmp_path / "s")
    assert code == 0, output
    ds = datasets.load_from_disk(str(tmp_path / "s"))
    assert ds["length"] == [200, 200, 400, 400] and [len(r) for r in ds["input_ids"]] == [200, 200, 400, 400]
    assert "synthetic lengthy tables" in (tmp_path / "s" / "card.md").read_text()
