"""HF directory → GGUF for llama.cpp users, with llama.cpp's own converter (`convert_hf_to_gguf.py`), and the round
trip checked: the file is imported back (`gguf_import`) and its rope configuration and logits compared.

The converter is not a PyPI package: it ships inside the `llama-cpp-python` source distribution
(`vendor/llama.cpp/`). Its script, its `conversion/` package and its vendored `gguf-py` are read out of that sdist
(fetched once with `pip download --no-deps --no-binary :all:`, nothing compiled or installed) into
`$CTXSTRETCH_CACHE/llama.cpp/VERSION` and run in a subprocess of this interpreter without network. It needs
`sentencepiece` (`pip install 'ctxstretch[gguf]'`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from .config import UserError, check_writable
from .fetch import pip_download
from .gguf_import import import_gguf
from .models import check_model_dir, check_model_files
from .realmodel import default_cache

LLAMA_CPP_PYTHON = "0.3.36"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class ExportError(UserError):
    """The model cannot be exported, phrased for the user."""


def converter_dir(cache: Path | None = None) -> Path:
    """llama.cpp's converter, extracted from the llama-cpp-python sdist into the cache on first use."""
    root = Path(cache) if cache is not None else default_cache().parent / "llama.cpp"
    target = root / LLAMA_CPP_PYTHON
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix="download-") as tmp:
        sdist = pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", Path(tmp), ExportError, binary=False)
        staged = Path(tmp) / "converter"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        try:
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                           and m.name[len(prefix):].startswith(_PARTS) and (m.isfile() or m.isdir())]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(staged, members=members, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise ExportError(f"cannot read llama.cpp's converter out of {sdist.name} ({e})") from None
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.replace(staged, target)
    return target


def export_gguf(model: Path, out: Path, outtype: str = "f32", force: bool = False,
                converter: Path | None = None) -> Path:
    """Write `model` (a plain HF directory) as the GGUF file `out` (atomically: `out.part`, then renamed)."""
    model, out = Path(model), Path(out)
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    check_model_dir(model)
    check_model_files(model)
    rope = (json.loads((model / "config.json").read_text()).get("rope_parameters") or {})
    if rope.get("rope_type") == "dynamic":
        raise ExportError(f"{model}: llama.cpp has no dynamic NTK scaling (the GGUF would run with the original "
                          "rope); re-parameterise with --method ntk-fixed (a fixed base) or yarn, then export")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to overwrite it")
    check_writable(out)
    if importlib.util.find_spec("sentencepiece") is None:
        raise ExportError("llama.cpp's converter needs sentencepiece: pip install 'ctxstretch[gguf]'")
    script = (converter or converter_dir()) / "convert_hf_to_gguf.py"
    part = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the converter's own gguf-py
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, str(script), str(model), "--outfile", str(part), "--outtype", outtype]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0 or not part.is_file():
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            raise ExportError(f"llama.cpp's converter failed on {model}: {lines[-1] if lines else done.returncode}")
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def round_trip(model: Path, gguf: Path, tokens: int = 64) -> dict:
    """Import `gguf` back and compare with `model`: rope parameters, and the logits of `tokens` fixed token ids
    (max |Δ|). Both load in fp32 with plain transformers. Llama-3 scaling travels as llama.cpp's `rope_freqs`
    tensor, which llama.cpp reads and transformers' GGUF loader does not: that round trip reports a difference."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="ctxstretch-roundtrip-") as tmp:
        back = import_gguf(gguf, Path(tmp) / "model")
        rope_in = json.loads((Path(model) / "config.json").read_text()).get("rope_parameters")
        rope_out = json.loads((back / "config.json").read_text()).get("rope_parameters")
        a = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=torch.float32).eval()
        b = AutoModelForCausalLM.from_pretrained(back, local_files_only=True, dtype=torch.float32).eval()
        ids = torch.randint(0, a.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            gap = float((a(ids).logits - b(ids).logits).abs().max())
        shutil.rmtree(back, ignore_errors=True)
    same_rope = _rope_close(rope_in, rope_out)
    return {"rope_in": rope_in, "rope_out": rope_out, "rope_kept": same_rope, "max_abs_logit_diff": gap,
            "ok": same_rope and gap < 1e-3}


def _rope_close(a: dict | None, b: dict | None) -> bool:
    """Equal rope parameters, floats within the GGUF's float32 precision."""
    a, b = a or {}, b or {}
    if set(a) != set(b):
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, float | int) and isinstance(w, float | int) and not isinstance(v, bool):
            if abs(v - w) > 1e-6 * max(1.0, abs(v)):
                return False
        elif v != w:
            return False
    return True
