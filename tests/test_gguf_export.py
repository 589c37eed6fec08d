"""Export to GGUF with llama.cpp's own converter, and the round trip back: rope scaling survives for the types
llama.cpp reads from metadata (default/ABF/fixed NTK, linear, YaRN); dynamic NTK, which llama.cpp lacks, is refused."""

from __future__ import annotations

import json
import os

import pytest

from ctxstretch import gguf_export
from ctxstretch.gguf_export import ExportError, export_gguf, round_trip
from ctxstretch.models import load_config
from ctxstretch.rope import apply_rope


def _variant(src, dest, method: str | None):
    """`src` with only config.json rewritten for `method` (weights and tokenizer linked)."""
    dest.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            os.symlink(f, dest / f.name)
    cfg = load_config(src)
    if method:
        apply_rope(cfg, method, 4 * 8192, None)
    cfg.save_pretrained(dest)
    return dest


def test_refusals_are_one_line(micro_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="--outtype q3: choose one of"):
        export_gguf(micro_model_dir, tmp_path / "m.gguf", outtype="q3")
    (tmp_path / "there.gguf").write_bytes(b"x")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(micro_model_dir, tmp_path / "there.gguf")
    real_find = gguf_export.importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(gguf_export.importlib.util, "find_spec",
                  lambda name, *a: None if name == "sentencepiece" else real_find(name, *a))
        with pytest.raises(ExportError, match=r"pip install 'ctxstretch\[gguf\]'"):
            export_gguf(micro_model_dir, tmp_path / "m.gguf")
    cfg = json.loads((micro_model_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    (micro_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="no dynamic NTK"):
        export_gguf(micro_model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ntk-fixed", "yarn", "pi"])
def test_smollm2_round_trip_keeps_the_rope(smollm2, tmp_path, method):
    model = _variant(smollm2, tmp_path / "model", method)
    gguf = export_gguf(model, tmp_path / "out.gguf")
    result = round_trip(model, gguf, tokens=16)
    assert result["rope_kept"], result
    assert result["max_abs_logit_diff"] < 1e-3 and result["ok"]
    assert not list(tmp_path.glob("*.part"))
