"""Run a pipeline (`config.PipelineConfig`) with `Run(cfg, out).execute()`: evaluate the base model,
re-parameterise RoPE, run the stages in order (`stages.py`), evaluate the final model, write `report.md` and
`metrics.jsonl` (layout: `ctxstretch.rundir`).

Every stage writes a plain Hugging Face model directory to `RUN/stages/NAME/model`; a finished stage is not redone
and a killed one resumes at its last checkpoint (`--resume`). The base model is evaluated before the first stage,
stages marked `evaluate` after themselves, and the final model at the end; `report.md` puts them side by side.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import Progress

from ..config import ConfigError, check_writable
from ..eval.backend import check_backend
from ..eval.report import write_report
from ..eval.suite import EvalResult, add_external, doublings, evaluate, prepare_external
from ..eval.vllm_eval import evaluate_dir
from ..eval.vllm_parity import parity_record
from ..hardware import precision_for
from ..models import eval_dtype, in_dtype, load, load_config, resolve, save
from ..rope import apply_rope, original_window
from ..rundir import EvalDir, RunDir
from ..train.parallel import distributed_state, resolve_device
from .config import PipelineConfig, StageConfig, load_pipeline, load_yaml
from .stages import RunContext, barrier, stage_of

# the configuration types are importable from here too (`config.py` defines them)
__all__ = ["Evaluator", "PipelineConfig", "Run", "StageConfig", "load_pipeline", "load_yaml", "prepare_out",
           "write_metrics"]


def prepare_out(out: Path, saved_config: dict, resume: bool, force: bool) -> None:
    """Refuse an existing run directory unless resuming (same config) or forced; write `config.yaml`."""
    saved = RunDir(out).config
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        if resume:
            if saved.exists() and yaml.safe_load(saved.read_text()) != saved_config:
                raise ConfigError(f"{out}: --resume with a different configuration than {saved}; rerun with the "
                                  "same settings, or use --force to start over")
            if not saved.exists():  # a directory seeded with an earlier evaluation (e.g. a shared base/)
                saved.write_text(yaml.safe_dump(saved_config, sort_keys=False))
            return
        if not force:
            raise ConfigError(f"{out} already exists; pass --resume to continue it or --force to overwrite it")
        shutil.rmtree(out)
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(saved_config, sort_keys=False))


class Evaluator:
    """The run's evaluation suite: each model is evaluated into its own folder, or read back from what an earlier
    run saved there."""

    def __init__(self, cfg: PipelineConfig, tokenizer, window: int, device: str, cache: Path, console: Console):
        self.cfg, self.tokenizer, self.window, self.device, self.cache, self.console = (cfg, tokenizer, window,
                                                                                       device, cache, console)
        self.precision = precision_for(device) if cfg.eval.precision == "auto" else cfg.eval.precision
        self.lengths = cfg.eval.lengths or doublings(window, cfg.target)
        self.ruler_lengths, self.ruler_note = prepare_external(cfg.eval, self.lengths)
        if self.ruler_note:
            console.print(f"[yellow]lm-eval RULER not run:[/] {self.ruler_note}", highlight=False)

    def __call__(self, directory: Path, model: Callable[[], torch.nn.Module], model_dir: Path) -> EvalResult:
        """The evaluation of `model()` (saved at `model_dir`) in `directory`, run there unless it is already."""
        d = EvalDir(directory)
        if d.done:
            return EvalResult.load(d.root)
        if self.cfg.eval.backend == "vllm":  # the saved model, served by vLLM in its own environment
            with Progress(console=self.console) as progress:
                result = evaluate_dir(model_dir, self.cfg.eval, self.window, self.cfg.target,
                                      log_path=d.root / "vllm.log", progress=progress)
        else:  # bf16 evaluation holds bf16 weights (`eval_dtype`); a model still in training is evaluated as a copy
            fast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16")
            with torch.no_grad(), fast, Progress(console=self.console) as progress:
                result = evaluate(in_dtype(model(), eval_dtype(self.precision)), self.tokenizer, self.cfg.eval,
                                  self.window, self.cfg.target, self.cache,
                                  progress, partial=d.partial)
        add_external(result, model_dir, self.cfg.eval, self.ruler_lengths, d.lm_eval, self.ruler_note,
                     "bf16" if self.cfg.eval.backend == "vllm" else self.precision)
        result.save(d.root)
        d.partial.unlink(missing_ok=True)
        return result

    def parity(self, directory: Path, result: EvalResult, model_dir: Path) -> None:
        """With the vLLM backend: whether vLLM reads the model's rope as transformers does, kept in its eval.json."""
        if self.cfg.eval.backend != "vllm" or result.parity is not None:
            return
        self.console.print("rope parity: transformers vs vLLM at twice the original window")
        result.parity = parity_record(model_dir, log_path=directory / "parity.log")
        self.console.print(f"rope parity: {result.parity['verdict']}", highlight=False, markup=False)
        result.save(directory)


Claims = Callable[[dict[str, EvalResult], int, int], list[tuple[str, bool, str]]]


class Run:
    """One run of a pipeline into its run directory (`ctxstretch.rundir.RunDir`): `Run(cfg, out).execute()`.

    The run owns what its stages share: the run directory, the model's tokenizer, the run-wide device and seed
    (passed into every stage by `PipelineConfig.resolved`) and, through `RunContext`, the process's one Accelerator.
    It evaluates the base model, re-parameterises RoPE, runs the stages in order, evaluates the final model and
    writes `report.md` and `metrics.jsonl`.

    saved_config: what `config.yaml` records (default: the resolved pipeline). base_eval: a directory holding (or to
    hold) the base model's evaluation, shared between runs (`compare`). claims(results, window, target): the
    recipe's claims, shown as the report's Targets table. rerun: the command the report names to re-run
    `config.yaml`. Under `accelerate launch` every process trains its share
    of each batch; only the main one evaluates and writes, and every process continues from each stage's saved model
    (a sharded engine leaves no whole model in any process)."""

    def __init__(self, cfg: PipelineConfig, out: Path, *, resume: bool = False, force: bool = False,
                 console: Console | None = None, saved_config: dict | None = None, base_eval: Path | None = None,
                 claims: Claims | None = None, title: str | None = None,
                 rerun: str = "ctxstretch train config.yaml --out DIR"):
        self.dir = RunDir(Path(out))
        self.resume, self.force = resume, force
        self.console = console or Console()
        self.path = resolve(cfg.model)
        self.window = original_window(load_config(self.path, cfg.trust_remote_code, cfg.allow_bin))
        self.cfg = cfg.resolved(self.window)
        self.device = resolve_device(self.cfg.device)
        self.saved_config = saved_config or self.cfg.model_dump(mode="json")
        self.base_eval, self.claims, self.rerun = base_eval, claims, rerun
        self.title = title or f"ctxstretch {self.cfg.name}"

    def execute(self) -> Path:
        """Run every stage into the run directory; returns the path of `report.md`."""
        from ..data.datasets import load_tokenizer

        cfg, run, console, device, path, window = (self.cfg, self.dir, self.console, self.device, self.path,
                                                   self.window)
        t0 = time.time()
        state = distributed_state(device)
        main = state.is_main_process
        check_backend(cfg.eval.backend)  # a missing vLLM environment fails before anything is written
        tokenizer = load_tokenizer(str(path))
        # only the main process evaluates, so only it prepares the evaluation (lm-eval's environment, too)
        evaluated = Evaluator(cfg, tokenizer, window, device, run.cache, console) if main else None
        if main:
            prepare_out(run.root, self.saved_config, self.resume, self.force)
        barrier(device)
        console.print(f"[bold]{cfg.name}[/] {path}: window {window:,} → {cfg.target:,}, rope {cfg.rope.method}, "
                      f"stages: {', '.join(f'{s.name} ({s.kind})' for s in cfg.stages)}")
        loaded = dict(trust_remote_code=cfg.trust_remote_code, allow_bin=cfg.allow_bin)
        results: dict[str, EvalResult] = {}
        if evaluated is not None:
            results["base"] = evaluated(self.base_eval or run.base.root, lambda: load(
                path, device, dtype=eval_dtype(evaluated.precision), **loaded)[0], path)
        barrier(device)

        rope_config = load_config(path, **loaded)
        rope = apply_rope(rope_config, cfg.rope.method, cfg.target, cfg.rope.theta)
        console.print(f"rope: {json.dumps(rope)}")
        ctx = RunContext(cfg, run, path, rope_config, tokenizer, device, self.resume, console, main=main,
                         several=state.num_processes > 1)
        summaries = []
        for stage in map(stage_of, cfg.stages):
            sd = run.stage(stage.name)
            if not sd.done.exists():
                stage.run(ctx, sd)
            elif stage.changes_model:
                ctx.use(sd.model)
            summaries.append(sd.summary())
            if stage.config.evaluate and evaluated is not None:
                results[stage.name] = evaluated(sd.eval.root, ctx.model, ctx.current)
        if evaluated is None:  # another process of a distributed run: the main one evaluates and reports
            return run.report
        save(ctx.model(), tokenizer, run.model)
        results["extended"] = evaluated(run.extended.root, ctx.model, run.model)
        evaluated.parity(run.extended.root, results["extended"], run.model)
        minutes = (time.time() - t0) / 60
        write_metrics(run, cfg, summaries, results, minutes)
        header = [f"- model: `{cfg.model}` (window {window:,}) → target {cfg.target:,}",
                  f"- rope: `{json.dumps(rope)}`",
                  *[f"- stage `{s['stage']}` ({s['kind']}): {s['what']}" for s in summaries],
                  f"- wall time: {minutes:.1f} min on {device}",
                  f"- re-run: `{self.rerun}`"]
        report = write_report(run.root, self.title, header, results, window,
                              checks=self.claims(results, window, cfg.target) if self.claims else None)
        for stage in cfg.stages:
            shutil.rmtree(run.stage(stage.name).checkpoints, ignore_errors=True)
        shutil.rmtree(run.cache, ignore_errors=True)
        console.print(f"[green]done[/] in {minutes:.1f} min: {report}")
        return report


def write_metrics(run: RunDir, cfg: PipelineConfig, summaries: list[dict], results: dict[str, EvalResult],
                  minutes: float) -> None:
    """`metrics.jsonl`: every stage's step records, then the stage summaries, then each evaluation."""
    with run.metrics.open("w") as log:
        for stage in cfg.stages:
            steps = run.stage(stage.name).metrics
            log.write(steps.read_text() if steps.exists() else "")
        for s in summaries:
            log.write(json.dumps(s) + "\n")
        for name, r in results.items():
            extra = {"wall_minutes": round(minutes, 2)} if name == "extended" else {}
            log.write(json.dumps({"eval": name, **r.summary(), **extra}) + "\n")
