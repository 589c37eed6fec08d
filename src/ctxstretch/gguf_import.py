"""Convert a llama.cpp GGUF file into a plain Hugging Face model directory (safetensors), through transformers.

transformers dequantizes the GGUF tensors to float32 when it loads them (`from_pretrained(..., gguf_file=...)`), but
the loaded model refuses `save_pretrained`; so the plain model class is rebuilt from the config without its
`quantization_config`, given the dequantized weights, and saved. Needs the `gguf` package (`pip install
'ctxstretch[gguf]'`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .models import ModelError
from .rope import RopeError, current_rope

MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    """What the GGUF header says about a file, read before any weights are loaded."""

    path: Path
    architecture: str
    name: str
    quantization: str
    tensor_types: dict[str, int]
    size: int
    rope_scaling: dict | None = None  # llama.cpp's rope scaling keys, as transformers' rope_parameters entries


def _rope_scaling(reader, arch: str) -> dict | None:
    """`{arch}.rope.scaling.*` (written by llama.cpp's converter for linear and YaRN scaling) as the entries of
    transformers' `rope_parameters`; transformers' own GGUF loader drops them."""
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind not in ("linear", "yarn") or not factor:
        return None
    out = {"rope_type": str(kind), "factor": float(factor)}
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if kind == "yarn" and original:
        out["original_max_position_embeddings"] = int(original)
    return out


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise ModelError("reading GGUF files needs the 'gguf' package; install it with "
                         "`pip install 'ctxstretch[gguf]'`") from None
    return gguf


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a malformed field reads as missing
        return None


def _file_type_name(gguf, value) -> str | None:
    if value is None:
        return None
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (ValueError, TypeError):
        return f"file_type {value}"


def inspect_gguf(path: Path) -> GGUFInfo:
    """Check that `path` is a complete GGUF file and read its architecture and quantization type."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file; pass the path of a .gguf model file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file; pass the path of a .gguf model file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise ModelError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF'); pass a llama.cpp "
                         ".gguf model file")
    gguf = _gguf_module()
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure of a file with GGUF magic means a damaged file
        raise ModelError(f"{path}: truncated or corrupt GGUF file ({_first_line(e)}); download it again") from None
    tensors = list(reader.tensors)
    end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if not tensors or end > size:
        raise ModelError(f"{path}: truncated or corrupt GGUF file (no tensors, or tensor data past the end at "
                         f"{size:,} bytes); download it again")
    arch = _field(reader, "general.architecture")
    if not arch:
        raise ModelError(f"{path}: the GGUF file names no architecture (general.architecture); it is not a "
                         "model file")
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    quant = _file_type_name(gguf, _field(reader, "general.file_type"))
    if quant is None:  # older files: the most common type among the 2-D tensors
        quant = max(counts, key=lambda k: counts[k])
    return GGUFInfo(path=path, architecture=str(arch), name=str(_field(reader, "general.name") or path.stem),
                    quantization=quant, tensor_types=counts, size=size, rope_scaling=_rope_scaling(reader, str(arch)))


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ModelError(f"{out} exists and is not a directory; choose another --out")
        if any(out.iterdir()) and not force:
            raise ModelError(f"{out} already exists; pass --force to overwrite it")


def _load(staged: Path, info: GGUFInfo):
    """(config, dequantized model, tokenizer) from a staging dir holding only the GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = staged.parent, staged.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/… for unsupported files
        raise ModelError(f"{info.path}: transformers cannot load GGUF architecture '{info.architecture}' "
                         f"({_first_line(e)}); convert a Llama/Qwen/Mistral-style model instead") from None
    if info.rope_scaling:
        config.rope_parameters = {**(config.rope_parameters or {}), **info.rope_scaling}
    try:
        current_rope(config)
    except RopeError:
        raise ModelError(f"{info.path}: architecture '{info.architecture}' has no rotary position embedding "
                         "(RoPE); ctxstretch extends RoPE models only (Llama, Qwen, Mistral, …)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{info.path}: transformers cannot load this GGUF model ({_first_line(e)}); convert a "
                         "Llama/Qwen/Mistral-style model instead") from None
    return config, model, tokenizer


def _plain_copy(model):
    """The same weights in the model's plain (unquantized) class, which `save_pretrained` accepts."""
    import torch
    from transformers import AutoModelForCausalLM

    try:  # every weight is overwritten below: skip the random initialisation (~6 s for 135M parameters)
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.tie_weights()  # no_init_weights skips the tying too; untied, a tied head would be saved twice
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def _model_card(info: GGUFInfo, digest: str, config, params: int, seconds: float) -> str:
    rope = current_rope(config)
    types = ", ".join(f"{k} × {v}" for k, v in sorted(info.tensor_types.items(), key=lambda kv: -kv[1]))
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return "\n".join([
        f"# {info.name}",
        "",
        "Imported from a llama.cpp GGUF file by `ctxstretch import` (weights dequantized to float32 by transformers'",
        "GGUF loader, saved as safetensors).",
        "",
        "| | |",
        "|---|---|",
        f"| source file | `{info.path.name}` |",
        f"| quantization | {info.quantization} (tensor types: {types}) |",
        f"| sha256 | `{digest}` |",
        f"| source size | {info.size:,} bytes |",
        f"| architecture | {info.architecture} → `{config.model_type}` |",
        f"| parameters | {params:,} |",
        f"| window | {config.max_position_embeddings:,} tokens |",
        f"| rope | {rope} |",
        f"| imported | {when} ({seconds:.1f} s) |",
        "",
        "The weights are the dequantized quantized values: this model reproduces the GGUF file's outputs, not those "
        "of the original full-precision checkpoint.",
        "",
    ])


def import_gguf(gguf_path: Path, out: Path, force: bool = False) -> Path:
    """Write `gguf_path` as a plain HF directory at `out` (atomically: `out.tmp`, then renamed); return `out`."""
    start = time.perf_counter()
    gguf_path, out = Path(gguf_path), Path(out)
    info = inspect_gguf(gguf_path)
    _check_out(out, force)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # transformers reads the GGUF from a directory; a directory holding only a link to the file keeps it from
        # picking up a config.json or tokenizer files that happen to lie next to the .gguf
        with tempfile.TemporaryDirectory(prefix="ctxstretch-gguf-") as stage:
            staged = Path(stage) / gguf_path.name
            staged.symlink_to(gguf_path.resolve())
            config, model, tokenizer = _load(staged, info)
        digest = sha256(gguf_path)
        plain = _plain_copy(model)
        del model
        params = sum(p.numel() for p in plain.parameters())
        out.parent.mkdir(parents=True, exist_ok=True)
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        plain.generation_config.save_pretrained(tmp)
        seconds = time.perf_counter() - start
        (tmp / "README.md").write_text(_model_card(info, digest, plain.config, params, seconds))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
