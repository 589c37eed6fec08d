"""`ctxstretch plan | accelerate-config`: scaling helpers for running on GPUs."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..config import ConfigError
from .common import guarded


def count(text: str, k: int = 1000) -> float:
    """'2B', '500M', '1e9', '64k' → a number; `k` is 1024 for lengths (128k = 131,072 tokens)."""
    t = text.strip().upper()
    mult = {"K": k, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        return float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise ConfigError(f"'{text}' is not a number (use e.g. 2B, 500M, 1e9, 128k)") from None


@guarded
def plan(
    model: Annotated[str, typer.Option(help="local model directory, 'embedded', or a config.json")] = "embedded",
    target: Annotated[str, typer.Option(help="target window in tokens, e.g. 128k")] = "128k",
    gpu: Annotated[str, typer.Option(help="h100, h200, a100-80g, a100-40g or l40s")] = "h100",
    gpus: Annotated[int, typer.Option(help="number of GPUs")] = 8,
    tokens: Annotated[str, typer.Option(help="training token budget, e.g. 2B")] = "1B",
    mfu: Annotated[float, typer.Option(help="model FLOPs utilisation to assume (0-1)")] = 0.4,
    master: Annotated[str, typer.Option(help="fp32 (fp32 weights + AdamW, bf16 autocast) or bf16")] = "fp32",
    train_length: Annotated[str, typer.Option(help="tokens per training row (0: 0.3 x target)")] = "0",
    as_json: Annotated[bool, typer.Option("--json", help="print machine-readable JSON")] = False,
) -> None:
    """FLOPs, memory per GPU, time and the recommended parallel setting for extending a model."""
    from ..plan import plan as make_plan
    from ..plan import render

    result = make_plan(model, int(count(target, 1024)), gpu, gpus, count(tokens), mfu, master,
                       int(count(train_length, 1024)))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        from rich.console import Console

        render(result, Console())


@guarded
def accelerate_config(
    name: Annotated[str, typer.Argument(help="ddp, fsdp2, fsdp2_cp, deepspeed_zero3, deepspeed_zero3_offload")],
) -> None:
    """Print the path of a shipped accelerate config, for `accelerate launch --config_file $(...)`."""
    from ..train.parallel import accelerate_config as shipped

    typer.echo(str(shipped(name)))
