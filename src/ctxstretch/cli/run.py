"""`ctxstretch extend | train | compare`: the commands that train, each a face over the Python API's function of
the same name (`ctxstretch.extend`, `ctxstretch.train`, `ctxstretch.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import ctxstretch

from ..config import ConfigError
from .common import console, floats, guarded, ints, names

BACKEND_HELP = ("evaluations in transformers, or vllm (its own environment: `ctxstretch backend setup vllm`), "
                "which also checks the final model's rope parity between the two")


@guarded
def extend(
    out: Annotated[Path, typer.Option(help="run directory to create")] = Path("runs/extend"),
    model: Annotated[str, typer.Option(help="local HF model directory, or 'embedded'")] = "embedded",
    target: Annotated[int, typer.Option(help="target window in tokens (0: 16x the model's window)")] = 0,
    method: Annotated[str | None, typer.Option(help="rope method: abf, ntk-fixed, pi, ntk, yarn, llama3 "
                                               "(default ntk-fixed)")] = None,
    positions: Annotated[str, typer.Option(help="position transform: longrecipe, pose, randpos, full")] = "longrecipe",
    text: Annotated[list[str] | None, typer.Option(help="training text (repeatable): files or folders of txt, jsonl, "
                                                   "parquet, arrow, a saved HF dataset; 'embedded' or 'stdlib' "
                                                   "(default: the model's kind)")] = None,
    text_field: Annotated[str, typer.Option(help="text column of jsonl/parquet/arrow sources")] = "text",
    steps: Annotated[int | None, typer.Option(help="training steps (0: training-free)")] = None,
    train_length: Annotated[int, typer.Option(help="tokens per training row (0: 0.3x target, 0.5x for the "
                                              "embedded model)")] = 0,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank via peft (0: full fine-tuning)")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    log_with: Annotated[str, typer.Option(help="trackers beside metrics.jsonl, comma-separated: tensorboard, "
                                          "trackio, wandb (offline)")] = "",
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "transformers",
    config: Annotated[Path | None, typer.Option(help="a config.yaml from an earlier run (flags are ignored)")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
    dry_run: Annotated[bool, typer.Option(help="print the resolved settings and the time and memory estimate, "
                                          "then exit")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own Python code")] = False,
    allow_bin: Annotated[bool, typer.Option(help="load pickled .bin weights (torch.load weights_only=True)")] = False,
) -> None:
    """Grow a model's context window and write model/, report.md, metrics.jsonl and config.yaml to --out."""
    if resume and force:
        raise ConfigError("--resume and --force conflict; pick one")
    if config is not None:
        cfg = ctxstretch.extend_config(config)
    else:
        cfg = ctxstretch.extend_config(
            where="command line", model=model, target=target, method=method or None, positions=positions, text=text,
            text_field=text_field, steps=steps, train_length=train_length, lr=lr, lora_rank=lora_rank, device=device,
            log_with=names(log_with), trust_remote_code=trust_remote_code, allow_bin=allow_bin,
            **({"eval": {"backend": backend}} if backend != "transformers" else {}))
    if dry_run:
        from ..recipes.extend import dry_run, resolve_extend

        for line in dry_run(*resolve_extend(cfg)):
            console.print(line, highlight=False, markup=line.startswith("settings"), soft_wrap=True)
        return
    ctxstretch.extend(config=cfg, out=out, resume=resume, force=force, console=console)


@guarded
def train(
    recipe: Annotated[str | None, typer.Argument(help="a recipe YAML file, or a preset name (see --list)")] = None,
    out: Annotated[Path, typer.Option(help="run directory to create")] = Path("runs/train"),
    model: Annotated[str | None, typer.Option(help="override the recipe's model")] = None,
    target: Annotated[int | None, typer.Option(help="override the target window")] = None,
    steps: Annotated[int | None, typer.Option(help="override the main stage's steps (recipes only)")] = None,
    show: Annotated[bool, typer.Option(help="print the expanded pipeline YAML and exit")] = False,
    list_presets: Annotated[bool, typer.Option("--list", help="list the shipped recipe presets")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
) -> None:
    """Run a multi-stage recipe (train, build data, merge); every stage leaves a plain HF model directory."""
    if list_presets:
        from ..recipes import PRESETS

        for p in sorted(PRESETS.glob("*.yaml")):
            first = next((ln for ln in p.read_text().splitlines() if ln.startswith("#")), "#")
            typer.echo(f"{p.stem:14s} {first.lstrip('# ')}")
        return
    if recipe is None:
        raise ConfigError("give a recipe YAML file or a preset name (ctxstretch train --list)")
    if resume and force:
        raise ConfigError("--resume and --force conflict; pick one")
    if show:
        import yaml

        resolved = ctxstretch.train_pipeline(recipe, model=model, target=target, steps=steps, resolved=True)
        typer.echo(yaml.safe_dump(resolved.model_dump(mode="json", exclude_defaults=True), sort_keys=False,
                                 allow_unicode=True))
        return
    ctxstretch.train(recipe, out=out, model=model, target=target, steps=steps, resume=resume, force=force,
                     console=console)


@guarded
def compare(
    recipes: Annotated[str, typer.Option(help="comma-separated recipe names")] = ",".join(ctxstretch.COMPARED),
    out: Annotated[Path, typer.Option(help="directory for every run and compare.md")] = Path("runs/compare"),
    model: Annotated[str, typer.Option(help="local HF model directory, or 'embedded'")] = "embedded",
    target: Annotated[int, typer.Option(help="target window (0: 16x the model's window)")] = 0,
    steps: Annotated[int | None, typer.Option(help="main-stage steps for every recipe (the shared budget)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="rows per step for every recipe")] = None,
    lengths: Annotated[str | None, typer.Option(help="evaluation lengths, e.g. 2k,4k,8k (default: doublings)")] = None,
    trials: Annotated[int | None, typer.Option(help="probes per (length, depth) cell")] = None,
    loss_rows: Annotated[int | None, typer.Option(help="held-out rows for loss by position")] = None,
    depths: Annotated[str | None, typer.Option(help="needle depths, e.g. 0.1,0.5,0.9")] = None,
    needle: Annotated[bool, typer.Option(help="also run the needle grid")] = True,
    short_rows: Annotated[int | None, typer.Option(help="rows of the base window for the short-context loss")] = None,
    backend: Annotated[str, typer.Option(help=BACKEND_HELP)] = "transformers",
) -> None:
    """Run several recipes under one budget; write compare.md (+ report.md/html with every model side by side)."""
    if not names(recipes):
        raise ConfigError("--recipes: give at least one recipe name")
    evals = {"lengths": ints(lengths) or None, "trials": trials, "loss_rows": loss_rows,
             "depths": floats(depths, "--depths") if depths else None, "needle": None if needle else False,
             "short_rows": short_rows, "backend": None if backend == "transformers" else backend}
    path = ctxstretch.compare(names(recipes), out=out, model=model, target=target, steps=steps,
                              batch_size=batch_size, eval={k: v for k, v in evals.items() if v is not None},
                              console=console)
    console.print(f"[green]done[/]: {path}")
