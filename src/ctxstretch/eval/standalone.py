"""`ctxstretch eval`: evaluate one local model into a new directory (eval.json, report.md/html and plots)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .report import write_report
from .suite import EvalConfig


def evaluate_model(model: str, out: Path, cfg: EvalConfig, *, backend: str = "transformers",
                   vllm_env: Path | None = None, device: str = "auto", force: bool = False,
                   trust_remote_code: bool = False, console: Console | None = None) -> Path:
    """`ctxstretch eval`: evaluate the local model `model` (or 'embedded') into a new `out` — eval.json, report.md/
    html and plots; returns report.md's path. Empty `cfg.lengths`: `standalone_lengths` of the model's window.
    lm-eval's corpus-free RULER tasks among `cfg.lm_eval_tasks` run in lm-eval's own environment. A missing backend
    or extra, an unknown task and an existing `out` fail before any work."""
    import shutil

    from rich.progress import Progress

    from ..config import check_out_dir
    from ..models import load, load_config, resolve
    from ..rope import original_window
    from ..train.parallel import resolve_device
    from .backend import check_backend
    from .short import require_lm_eval
    from .suite import add_external, evaluate, prepare_external, standalone_lengths

    console = console or Console(stderr=True)
    check_backend(backend, vllm_env)  # missing extras fail in the first second
    if cfg.in_process_tasks:
        require_lm_eval()
    path = resolve(model)
    window = original_window(load_config(path, trust_remote_code))
    lengths = cfg.lengths or standalone_lengths(window)
    ruler_lengths, note = prepare_external(cfg, lengths)
    full, cfg = cfg, cfg.model_copy(update={"lengths": lengths, "lm_eval_tasks": cfg.in_process_tasks})
    check_out_dir(out, force)
    shutil.rmtree(out, ignore_errors=True)
    if backend == "vllm":
        from .vllm_eval import evaluate_dir

        out.mkdir(parents=True)
        with Progress(console=console) as progress:
            result = evaluate_dir(path, cfg, window, max(lengths), vllm_env, out / "vllm.log", progress)
    else:
        m, tok = load(path, resolve_device(device), trust_remote_code)
        with Progress(console=console) as progress:
            result = evaluate(m, tok, cfg, window, max(lengths), None, progress)
    if full.ruler_tasks and note is None:
        console.print(f"lm-eval RULER: {', '.join(full.ruler_tasks)} at {ruler_lengths} (its own environment, "
                      "offline)")
    add_external(result, path, full, ruler_lengths, out / "lm-eval", note)
    result.save(out)
    return write_report(out, f"ctxstretch eval: {model}", [f"- window {window:,}; lengths {lengths}"],
                        {Path(model).name or "model": result}, window)
