"""`extend --text`: the user's long documents in each input format become the training stream; bad paths fail
with one line before anything runs."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.config import ConfigError
from ctxstretch.recipes.extend import ExtendConfig, pipeline, resolve_extend
from ctxstretch.recipes.rows import stage_rows

DOCS = [" ".join(f"zebra{i} river stone {j}." for j in range(400)) for i in range(3)]


def _write(kind: str, root):
    if kind == "folder":
        d = root / "texts"
        d.mkdir()
        for i, doc in enumerate(DOCS):
            (d / f"doc{i}.txt").write_text(doc)
        return d
    if kind == "jsonl":
        p = root / "docs.jsonl"
        p.write_text("".join(json.dumps({"body": doc}) + "\n" for doc in DOCS))
        return p
    if kind == "parquet":
        p = root / "docs.parquet"
        pq.write_table(pa.table({"body": DOCS}), p)
        return p
    d = root / "saved"
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(d))
    return d


@pytest.mark.parametrize("kind", ["folder", "jsonl", "parquet", "saved-dataset"])
def test_text_sources_feed_the_training_rows(kind, tmp_path, tokenizer):
    src = _write(kind, tmp_path)
    field = "text" if kind == "folder" else "body"
    cfg, _ = resolve_extend(ExtendConfig(text=[str(src)], text_field=field, mix={"text": 1.0}, train_length=512,
                                         target=2048, train={"device": "cpu"}))
    stage = pipeline(cfg).resolved(256).stages[0]
    assert stage.data.text == [str(src)] and stage.data.text_field == field
    batch = stage_rows(stage, tokenizer, seed=0, dataset_dir=None)(0)
    assert batch["input_ids"].shape == (4, 512)
    decoded = tokenizer.decode(batch["input_ids"][0])
    assert "zebra" in decoded and "river stone" in decoded
    assert int(batch["position_ids"].max()) < 2048


def test_missing_text_source_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_extend(ExtendConfig(text=[str(tmp_path / "nope")], train={"device": "cpu"}))
    result = CliRunner().invoke(app, ["extend", "--text", str(tmp_path / "nope"), "--device", "cpu", "--dry-run"])
    assert result.exit_code == 2 and "does not exist" in result.output and len(result.output.strip().splitlines()) == 1


def test_stdlib_corpus_has_package_level_long_documents():
    from ctxstretch.data.sources import embedded_documents, stdlib_documents

    docs = list(stdlib_documents())
    lengths = np.array([len(d) for d in docs])
    assert (lengths > 4 * 32768).sum() >= 10  # many documents longer than a 32K-token window
    assert any(d.startswith("# file: email/") for d in docs)
    # the same files are held out as in the embedded corpus: no held-out file's text appears in a training doc
    held = next(iter(embedded_documents("heldout")))
    assert not any(held[:2000] in d for d in docs)
