"""Load and save local Hugging Face models and tokenizers, offline, safetensors only, with architecture checks."""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from .atomic import writing  # noqa: E402
from .config import UserError  # noqa: E402
from .rope import current_rope  # noqa: E402
from .tiny import MODEL_DIR  # noqa: E402

EMBEDDED = "embedded"


class ModelError(UserError):
    """A model directory that cannot be used, phrased for the user."""


def resolve(model: str | Path | None) -> Path:
    """`None` or "embedded" → the shipped base model; otherwise a local directory that must exist."""
    if model is None or str(model) == EMBEDDED:
        if not (MODEL_DIR / "config.json").exists():
            raise ModelError(f"the embedded model is missing from {MODEL_DIR}; rebuild it with `ctxstretch tiny build`")
        return MODEL_DIR
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelError(f"--model {path}: no such directory; pass a local Hugging Face model directory")
    return path


def read_json(path: Path) -> dict:
    """A JSON file's content, or a one-line ModelError naming the file and line."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def check_model_dir(path: Path, trust_remote_code: bool = False) -> None:
    """Refuse a directory without a readable config.json, or one asking for remote code without the flag."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelError(f"{path}: no config.json; this is not a Hugging Face model directory")
    raw = read_json(config_file)
    if raw.get("auto_map") and not trust_remote_code:
        raise ModelError(f"{config_file}: the model asks for remote code (auto_map); pass --trust-remote-code "
                         "only if you trust its author")


def check_model_files(path: Path, allow_bin: bool = False) -> None:
    """Refuse directories without tokenizer files or with only pickled weights."""
    if not any(path.glob("tokenizer*.json")) and not (path / "tokenizer.model").exists():
        raise ModelError(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model); save the tokenizer "
                         "next to the weights")
    has_safe = any(path.glob("*.safetensors"))
    has_bin = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safe and has_bin and not allow_bin:
        raise ModelError(f"{path}: weights are only pickled .bin files; convert them to safetensors, or pass "
                         "--allow-bin to load them with torch.load(weights_only=True)")
    if not has_safe and not has_bin:
        raise ModelError(f"{path}: no weights (*.safetensors) found")


def load_config(path: Path, trust_remote_code: bool = False, allow_bin: bool = False):
    """The checked config of a local model directory; raises ModelError/RopeError with the fix."""
    check_model_dir(path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path / 'config.json'}: transformers cannot read it ({first})") from None
    current_rope(config)  # raises for non-RoPE models
    check_model_files(path, allow_bin)
    return config


def load(path: Path, device: str = "cpu", trust_remote_code: bool = False, allow_bin: bool = False,
         config=None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local directory, never touching the network."""
    config = config or load_config(path, trust_remote_code, allow_bin)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True,
        use_safetensors=not allow_bin or None, attn_implementation="sdpa",
    )
    return model.to(device).eval(), tokenizer


def with_parameters(model: torch.nn.Module, make: Callable[[torch.nn.Parameter], torch.Tensor]) -> torch.nn.Module:
    """A deep copy of `model` whose every parameter p is `make(p)` (tied parameters stay one tensor); buffers,
    such as rotary frequencies, are copied as they are."""
    memo = {id(p): torch.nn.Parameter(make(p), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def eval_dtype(precision: str) -> torch.dtype:
    """Weights for evaluation: bf16 when the evaluation runs in bf16 (a bf16-native device, or asked for), fp32
    otherwise. Under bf16 autocast every matrix product already reads bf16 weights; holding them in bf16 halves
    the weights' memory and changes the embedded model's mean held-out loss by < 1% (`tests/test_models_dtype.py`)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` itself when its parameters are in `dtype` already, else a copy with its parameters cast to `dtype`
    (buffers kept; `model` unchanged, so a model still being trained keeps its weights)."""
    if model.dtype == dtype:
        return model
    out = with_parameters(model, lambda p: p.detach().to(dtype))
    out.config.dtype = dtype
    return out


def save(model, tokenizer, out: Path) -> Path:
    """Write a plain HF directory (safetensors) atomically: to `out.tmp`, then renamed. The weights are written in
    the dtype the model holds them in (bf16 when trained with bf16 parameters), and config.json's `dtype` says so,
    so `AutoModelForCausalLM.from_pretrained(out, dtype="auto")` loads them as trained."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # config.json records the weights' dtype (weights put into a copy by `unsharded` leave the copy's config
    # behind); the caller's model keeps its own config as it was
    dtype, model.config.dtype = model.config.dtype, model.dtype
    try:
        with writing(tmp, out):  # a failed write leaves no `out.tmp` (config.json without weights) behind
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
    finally:
        model.config.dtype = dtype
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
