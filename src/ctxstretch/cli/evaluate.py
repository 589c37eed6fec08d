"""`ctxstretch eval | report | check-parity`: measure any local model, put evaluated runs side by side, compare the
two inference backends."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import ctxstretch

from ..config import ConfigError
from .common import console, guarded, ints, names


@guarded
def eval_cmd(
    model: Annotated[str, typer.Option(help="local HF model directory, or 'embedded'")] = "embedded",
    out: Annotated[Path, typer.Option(help="directory for report.md, eval.json and plots")] = Path("runs/eval"),
    lengths: Annotated[str | None, typer.Option(help="comma-separated lengths, e.g. 256,1k,4k")] = None,
    trials: Annotated[int, typer.Option(help="probes per (length, depth) cell")] = 4,
    ruler: Annotated[str | None, typer.Option(help="RULER-style tasks: 'all' or a comma list")] = None,
    short_rows: Annotated[int, typer.Option(help="held-out rows of the model's window for the short-context loss "
                                            "(0: skip)")] = 16,
    short_text: Annotated[str, typer.Option(help="held-out short text: 'embedded' or a file/folder")] = "embedded",
    lm_eval_tasks: Annotated[str | None, typer.Option(help="lm-evaluation-harness tasks: its corpus-free RULER tasks "
                                                      "(niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,"
                                                      "ruler_cwe,ruler_fwe: at --lengths, in lm-eval's own "
                                                      "environment, built on first use) or short-context ones, e.g. "
                                                      "hellaswag (needs the [lmeval] extra)")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help="examples per lm-eval task")] = None,
    backend: Annotated[str, typer.Option(help="transformers, or vllm (in its own environment: ctxstretch backend "
                                         "setup vllm)")] = "transformers",
    vllm_env: Annotated[Path | None, typer.Option(help="the vLLM environment (default $CTXSTRETCH_VLLM_ENV, else "
                                                  "the one `backend setup vllm` builds)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    force: Annotated[bool, typer.Option(help="overwrite an existing --out")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own Python code")] = False,
) -> None:
    """Passkey and needle grids, loss by position, short-context regression and optional RULER-style tasks for any
    local model."""
    from ..data.ruler import TASKS

    if trials < 1:
        raise ConfigError(f"--trials {trials} must be ≥ 1")
    tasks = list(TASKS) if ruler == "all" else names(ruler)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"--ruler: unknown task '{unknown[0]}'; choose 'all' or from {', '.join(TASKS)}")
    report = ctxstretch.evaluate(
        model, out=out, lengths=ints(lengths), trials=trials, ruler=tasks, short_rows=short_rows,
        short_text=short_text, lm_eval_tasks=names(lm_eval_tasks), lm_eval_limit=lm_eval_limit, backend=backend,
        vllm_env=vllm_env, device=device, force=force, trust_remote_code=trust_remote_code, console=console,
        where="command line")
    console.print(f"[green]done[/]: {report}")


@guarded
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories from `extend` or `eval`")],
    out: Annotated[Path, typer.Option(help="directory for the combined report.md/report.html")] = Path("runs/report"),
) -> None:
    """Compare any number of evaluated models side by side (report.md and a self-contained report.html)."""
    path = ctxstretch.report(runs, out=out)
    console.print(f"[green]done[/]: {path} and {path.with_suffix('.html')}")


@guarded
def check_parity(
    model: Annotated[str, typer.Argument(help="local HF model directory, or 'embedded'")],
    lengths: Annotated[str | None, typer.Option(help="sequence lengths, e.g. 4k,16k (default: twice the original "
                                                "window)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16, in both engines")] = "float32",
    vllm_env: Annotated[Path | None, typer.Option(help="the vLLM environment (as for eval)")] = None,
) -> None:
    """Compare next-token logprobs of transformers and vLLM inside and beyond the original window; exit 1 if they
    differ."""
    from ..eval.backend import check_backend
    from ..eval.vllm_parity import check_parity as measure
    from ..eval.vllm_parity import table
    from ..models import resolve

    check_backend("vllm", vllm_env)
    buckets, verdict = measure(resolve(model), ints(lengths) or None, dtype, vllm_env)
    typer.echo("\n".join(table(buckets)))
    console.print(verdict, highlight=False, markup=False, soft_wrap=True)
    if not verdict.startswith("agree"):
        raise typer.Exit(1)
