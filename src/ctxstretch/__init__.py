"""ctxstretch: extend the context window of a causal language model cheaply, and prove it worked.

The Python API is the command line's (`ctxstretch COMMAND --help`), keyword for flag:

    from ctxstretch import evaluate, extend
    report = extend(model="embedded", target=1024, out="runs/x", steps=50)   # -> runs/x/report.md
    evaluate("runs/x/model", out="runs/x-eval", lengths=[256, 1024])

`extend`, `evaluate`, `train`, `compare` and `report` each write a run directory and return the path of its
report.md. Settings are named as in the run's config.yaml; None (or leaving one out) means the library's default.
Importing the package is cheap: torch and transformers load when a function is called.

`train` and `compare` are also the names of submodules: `ctxstretch.train` is the function, and the module is
reached with `from ctxstretch.train import …`. The `extend` recipe's module is `ctxstretch.recipes.extend`.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from .eval.suite import EvalConfig, EvalResult
    from .recipes.extend import ExtendConfig
    from .recipes.pipeline import PipelineConfig

__version__ = "0.1.0"
__all__ = ["COMPARED", "EvalConfig", "EvalResult", "ExtendConfig", "PipelineConfig", "__version__", "compare",
           "evaluate", "extend", "extend_config", "report", "train", "train_pipeline"]

COMPARED = ("longrecipe", "full", "pose")  # the recipes `compare` runs unless told
_LAZY = {"ExtendConfig": "ctxstretch.recipes.extend", "EvalConfig": "ctxstretch.eval.suite",
         "EvalResult": "ctxstretch.eval.suite", "PipelineConfig": "ctxstretch.recipes.pipeline"}


def __getattr__(name: str) -> Any:
    """The config and result types, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctxstretch' has no attribute {name!r}")


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if v is not None}


def extend_config(config: str | Path | ExtendConfig | None = None, *, where: str = "extend()",
                  **settings: Any) -> ExtendConfig:
    """The validated settings of one `extend` run: `config` (an ExtendConfig, or the config.yaml of an earlier run),
    or keyword settings — ExtendConfig's fields (model, target, method, positions, text, train_length, mix,
    lora_rank, eval={...}, …) and, flat or as train={...}, its training stage's (steps, lr, batch_size, device,
    log_with, …). An unknown name is an error suggesting the nearest valid one; `where` names the caller in it."""
    from .config import ConfigError, parse
    from .recipes.extend import ExtendConfig, ExtendTrainConfig, load_extend_config

    given = _given(settings)
    if config is not None:
        if given:
            raise ConfigError(f"{where}: give a config or settings, not both ({', '.join(given)})")
        return config if isinstance(config, ExtendConfig) else load_extend_config(Path(config))
    top, stage = ExtendConfig.model_fields, ExtendTrainConfig.model_fields
    train = {k: given.pop(k) for k in list(given) if k in stage and k not in top}
    if train:
        given["train"] = {**given.get("train", {}), **train}
    return parse(ExtendConfig, given, where)


def extend(model: str | None = None, target: int | None = None, *, out: str | Path = "runs/extend",
           config: str | Path | ExtendConfig | None = None, resume: bool = False, force: bool = False,
           console: Console | None = None, **settings: Any) -> Path:
    """Grow a model's context window and prove it (`ctxstretch extend`): evaluate the base, change its RoPE, train on
    short rows carrying long positions, evaluate again. Writes model/ (plain HF), report.md, metrics.jsonl and
    config.yaml into `out`; returns report.md's path.

    model: a local HF model directory or 'embedded' (default); target: the new window in tokens (0, the default:
    16× the model's); settings: as for `extend_config` (e.g. steps=50, method="yarn"); config: an ExtendConfig or an
    earlier run's config.yaml instead of model, target and settings. resume: continue an interrupted run in `out`;
    force: overwrite it."""
    from .config import ConfigError
    from .recipes import extend as recipe

    if resume and force:
        raise ConfigError("extend(): resume and force conflict; pick one")
    cfg = extend_config(config, model=model, target=target, **settings)
    return recipe.run(cfg, Path(out), resume=resume, force=force, console=console).execute()


def evaluate(model: str = "embedded", *, out: str | Path = "runs/eval", backend: str = "transformers",
             vllm_env: str | Path | None = None, device: str = "auto", force: bool = False,
             trust_remote_code: bool = False, console: Console | None = None, where: str = "evaluate()",
             **settings: Any) -> Path:
    """Evaluate any local model (`ctxstretch eval`): the held-out probe families, passkey and needle grids, loss by
    position and the short-context loss; RULER-style tasks and lm-evaluation-harness tasks when asked. Writes
    eval.json, report.md/html and plots into a new `out`; returns report.md's path.

    settings: EvalConfig's fields — lengths (tokens; default: from a quarter of the model's window to twice it),
    trials, depths, needle, ruler, loss_rows, short_rows, short_text, lm_eval_tasks, lm_eval_limit, …. backend:
    transformers or vllm (its own environment, `vllm_env`). `where` names the caller in error messages."""
    from .config import parse
    from .eval.standalone import evaluate_model
    from .eval.suite import EvalConfig

    cfg = parse(EvalConfig, _given(settings), where)
    return evaluate_model(model, Path(out), cfg, backend=backend, vllm_env=Path(vllm_env) if vllm_env else None,
                          device=device, force=force, trust_remote_code=trust_remote_code, console=console)


def train_pipeline(recipe: str | Path, *, model: str | None = None, target: int | None = None,
                   steps: int | None = None, resolved: bool = False) -> PipelineConfig:
    """The pipeline `train` runs: `recipe` is a preset name (`ctxstretch train --list`) or a recipe YAML file;
    model, target and steps (the main stage's, recipes only) override the recipe's. resolved: with every derived
    setting filled in for the model's window (what `train --show` prints)."""
    from .recipes import pipeline_from, read_spec

    data, where = read_spec(str(recipe))
    pipeline = pipeline_from(data, where, _window, model=model, target=target, steps=steps)
    return pipeline.resolved(_window(pipeline.model)) if resolved else pipeline


def _window(model: str) -> int:
    """The original context window of a local model or 'embedded', in tokens."""
    from .models import load_config, resolve
    from .rope import original_window

    return original_window(load_config(resolve(model)))


def train(recipe: str | Path | PipelineConfig, *, out: str | Path = "runs/train", model: str | None = None,
          target: int | None = None, steps: int | None = None, resume: bool = False, force: bool = False,
          console: Console | None = None) -> Path:
    """Run a multi-stage recipe (`ctxstretch train`): train, build data, merge; every stage leaves a plain HF model
    directory under `out`. recipe: a preset name, a recipe YAML file or a PipelineConfig; model, target, steps: as
    for `train_pipeline`. Returns report.md's path."""
    from .config import ConfigError
    from .recipes.pipeline import PipelineConfig, Run

    if resume and force:
        raise ConfigError("train(): resume and force conflict; pick one")
    if not isinstance(recipe, PipelineConfig):
        recipe = train_pipeline(recipe, model=model, target=target, steps=steps)
    return Run(recipe, Path(out), resume=resume, force=force, console=console).execute()


def compare(recipes: Sequence[str] = COMPARED, *, out: str | Path = "runs/compare", model: str | None = None,
            target: int | None = None, steps: int | None = None, batch_size: int | None = None,
            eval: dict[str, Any] | None = None, console: Console | None = None) -> Path:
    """Run several recipes on one model under one budget (`ctxstretch compare`): every recipe gets the same
    main-stage steps × rows per step (default: the first recipe's). eval: EvalConfig settings for every run (e.g.
    lengths, trials). Writes OUT/RECIPE/ runs, compare.md and the combined report; returns compare.md's path."""
    from .compare import run_compare
    from .config import ConfigError

    names = [n.strip() for n in recipes if n.strip()]
    if not names:
        raise ConfigError("compare(): give at least one recipe name")
    options = _given({"model": model, "target": target, "steps": steps, "batch_size": batch_size})
    return run_compare(names, Path(out), overrides={"eval": eval} if eval else None, console=console, **options)


def report(runs: Sequence[str | Path], *, out: str | Path = "runs/report") -> Path:
    """Put any number of evaluated models side by side (`ctxstretch report`): each run directory's eval.json, or
    its base/ and extended/ ones. Writes report.md and a self-contained report.html; returns report.md's path."""
    from .eval.report import report_runs

    return report_runs([Path(r) for r in runs], Path(out))


class _Package(types.ModuleType):
    """Importing a submodule binds it as an attribute of its package; for the submodules named like an API function
    that binding is skipped, so `from ctxstretch import train` is the function however often the module loads."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in ("train", "compare"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
