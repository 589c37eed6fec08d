"""A recipe as data: a model, a rope re-parameterisation and a list of stages (train, build data, merge), run in order.

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
from pydantic import Field
from rich.console import Console
from rich.progress import Progress

from ..config import ConfigError, Strict, TrainConfig, check_writable, parse
from ..data.mix import ROW_KINDS
from ..data.sources import CORPORA
from ..eval import lmeval_ruler
from ..eval.report import write_report
from ..eval.suite import EvalConfig, EvalResult, doublings, evaluate
from ..hardware import precision_for
from ..models import load, load_config, resolve, save
from ..positions import METHODS as POSITION_METHODS
from ..rope import METHODS as ROPE_METHODS
from ..rope import apply_rope, default_target, original_window
from ..train.checkpoints import checkpoint_state, latest_checkpoint
from ..train.loop import train_stage
from ..train.lora import with_lora
from ..train.merge import linear_merge
from ..train.parallel import distributed_state, resolve_device
from .rows import BUILDERS, build_stage_data, stage_rows


class RopeConfig(Strict):
    """How RoPE is re-parameterised before the first stage (transformers' rope configuration)."""

    method: str = Field("abf", description=f"one of {', '.join(ROPE_METHODS)}")
    theta: float | None = Field(None, gt=0, description="explicit base for abf/ntk-fixed")


class DataConfig(Strict):
    """Where a training stage's rows come from (see `ctxstretch.data.mix` for the row kinds)."""

    text: list[str] = Field(default_factory=lambda: ["embedded"],
                            description="text sources: 'embedded', 'stdlib' (package-level documents) or local "
                            "files/folders (txt, jsonl, parquet, arrow, a saved HF dataset)")
    text_field: str = "text"
    mix: dict[str, float] = Field(default_factory=lambda: {"text": 1.0},
                                  description=f"row kinds and weights: {', '.join(ROW_KINDS)}")
    long_threshold: int = Field(0, ge=0, description="documents of at least this many tokens are 'long' (0: none)")
    long_weight: float = Field(1.0, gt=0, description="how much more often long documents are drawn")
    cip_k: int = Field(4, ge=1, description="documents interleaved per CIP row")
    cip_chunk: int = Field(0, ge=0, description="CIP chunk length in tokens (0: row length / 8)")
    select: str = Field("all", pattern="^(all|impactful)$",
                        description="'impactful': keep only sentences with impactful tokens (LongRecipe §4.1)")
    scorer: str | None = Field(None, description="model scoring impactful tokens (none: the digit heuristic)")
    dataset: str | None = Field(None, description="a `ctxstretch data` output dir, or '@STAGE' for a build stage's")


class BuildConfig(Strict):
    """A data-building stage: runs a `ctxstretch data` builder into `stages/NAME/data`."""

    kind: str = Field(..., description=f"one of {', '.join(BUILDERS)}")
    args: dict = Field(default_factory=dict, description="the builder's keyword arguments")


class MergeConfig(Strict):
    """θ = weight·θ_original + (1 − weight)·θ_current, keeping the current rope configuration."""

    weight: float = Field(0.5, ge=0, le=1, description="share of the original model")


class StageConfig(Strict):
    """One stage: train (default), build data (`build`) or merge (`merge`)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = Field(default_factory=DataConfig)
    positions: str = Field("full", description=f"position transform: {', '.join(POSITION_METHODS)}")
    train_length: int = Field(0, ge=0, description="tokens per row; 0: length_fraction × target")
    length_fraction: float = Field(1.0, gt=0, le=1, description="row length as a share of the stage's target")
    target: int = Field(0, ge=0, description="positions cover [0, target); 0: the pipeline's target")
    contiguous_share: float = Field(0.0, ge=0, le=1, description="share of rows kept at contiguous positions")
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora_rank: int = Field(0, ge=0, description="LoRA rank via peft (0: full fine-tuning)")
    lora_train_embeddings_norms: bool = True
    build: BuildConfig | None = None
    merge: MergeConfig | None = None
    evaluate: bool = Field(False, description="evaluate the model after this stage")

    @property
    def kind(self) -> str:
        return "build" if self.build else "merge" if self.merge else "train"


class PipelineConfig(Strict):
    """A whole recipe; `config.yaml` in the run directory is this, resolved (lengths filled in)."""

    name: str = "custom"
    description: str = ""
    model: str = Field("embedded", description="local HF model directory, or 'embedded'")
    target: int = Field(0, ge=0, description="target window in tokens; 0: 16x the model's window")
    rope: RopeConfig = Field(default_factory=RopeConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    trust_remote_code: bool = False
    allow_bin: bool = False

    def resolved(self, window: int) -> PipelineConfig:
        """Fill in the target, every stage's target and row length, and the run's device and seed where a stage does
        not set its own; refuse impossible settings."""
        target = self.target or default_target(window)
        if self.rope.method not in ROPE_METHODS:
            raise ConfigError(f"rope.method '{self.rope.method}' is unknown; choose one of {', '.join(ROPE_METHODS)}")
        if target <= window:
            raise ConfigError(f"target {target} must be larger than the model's window ({window}); "
                              f"try target: {default_target(window)}")
        stages, names = [], set()
        for i, s in enumerate(self.stages):
            where = f"stages[{i}] ({s.name})"
            if s.name in names:
                raise ConfigError(f"{where}: two stages are named '{s.name}'; give each stage its own name")
            names.add(s.name)
            st = s.target or target
            length = s.train_length or min(st, max(window, int(s.length_fraction * st)))
            if st > target:
                raise ConfigError(f"{where}: target {st} exceeds the pipeline's target {target}")
            if length > st:
                raise ConfigError(f"{where}: train_length {length} exceeds the stage's target {st}")
            if s.positions not in POSITION_METHODS:
                raise ConfigError(f"{where}: positions '{s.positions}' is unknown; "
                                  f"choose one of {', '.join(POSITION_METHODS)}")
            if s.kind == "train":
                check_data(s.data, where, names)
            if s.build and s.build.kind not in BUILDERS:
                raise ConfigError(f"{where}: build kind '{s.build.kind}' is unknown; choose one of "
                                  f"{', '.join(BUILDERS)}")
            run_wide = {k: getattr(self, k) for k in ("device", "seed") if k not in s.train.model_fields_set}
            stages.append(s.model_copy(update={"target": st, "train_length": length,
                                               "train": s.train.model_copy(update=run_wide)}))
        return self.model_copy(update={"target": target, "stages": stages})


def check_data(data: DataConfig, where: str, earlier: set[str]) -> None:
    """Refuse a stage's data settings that cannot work, before anything runs."""
    unknown = sorted(set(data.mix) - set(ROW_KINDS))
    if unknown or not any(v > 0 for v in data.mix.values()):
        raise ConfigError(f"{where}: data.mix must weight some of: {', '.join(ROW_KINDS)}"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if any(v < 0 for v in data.mix.values()):
        raise ConfigError(f"{where}: data.mix weights must not be negative")
    if data.mix.get("dataset") and not data.dataset:
        raise ConfigError(f"{where}: data.mix uses 'dataset' rows but data.dataset is not set")
    if data.dataset:
        if data.dataset.startswith("@"):
            if data.dataset[1:] not in earlier:
                raise ConfigError(f"{where}: data.dataset '{data.dataset}' names no earlier build stage")
        elif not Path(data.dataset).is_dir():
            raise ConfigError(f"{where}: data.dataset '{data.dataset}' is not a directory; build it with "
                              "`ctxstretch data … --out DIR`")
    for src in data.text:
        if src not in CORPORA and not Path(src).exists():
            raise ConfigError(f"{where}: data.text source '{src}' does not exist")


def load_yaml(path: Path) -> dict:
    """A YAML mapping, with one-line errors naming the file and line."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_pipeline(data: dict, where: str) -> PipelineConfig:
    return parse(PipelineConfig, data, where)


def prepare_out(out: Path, saved_config: dict, resume: bool, force: bool) -> None:
    """Refuse an existing run directory unless resuming (same config) or forced; write `config.yaml`."""
    saved = out / "config.yaml"
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


def eval_cached(directory: Path, fn: Callable[[], EvalResult]) -> EvalResult:
    """`fn()` saved into `directory`, or what an earlier run saved there."""
    if (directory / "eval.json").exists():
        return EvalResult.load(directory)
    result = fn()
    result.save(directory)
    (directory / "heldout.partial.json").unlink(missing_ok=True)
    return result


Checks = Callable[[dict[str, EvalResult], int, int], list[tuple[str, bool, str]]]


def run_pipeline(cfg: PipelineConfig, out: Path, *, resume: bool = False, force: bool = False,
                 console: Console | None = None, saved_config: dict | None = None, base_eval: Path | None = None,
                 checks: Checks | None = None, title: str | None = None) -> Path:
    """Run every stage of `cfg` into `out`; returns the path of `report.md`.

    saved_config: what `config.yaml` records (default: the resolved pipeline). base_eval: a directory holding (or to
    hold) the base model's evaluation, shared between runs (`compare`). checks(results, window, target): claims
    shown as the report's Targets table. Under `accelerate launch` every process trains its share of each batch;
    only the main one evaluates and writes, and every process continues from each stage's saved model (a sharded
    engine leaves no whole model in any process)."""
    from ..data.datasets import load_tokenizer

    console = console or Console()
    t0 = time.time()
    device = resolve_device(cfg.device)
    state = distributed_state(device)
    main, several = state.is_main_process, state.num_processes > 1
    path = resolve(cfg.model)
    window = original_window(load_config(path, cfg.trust_remote_code, cfg.allow_bin))
    cfg = cfg.resolved(window)
    if main:
        prepare_out(out, saved_config or cfg.model_dump(mode="json"), resume, force)
    _barrier(device)
    cache = out / "cache"
    loaded = dict(trust_remote_code=cfg.trust_remote_code, allow_bin=cfg.allow_bin)
    console.print(f"[bold]{cfg.name}[/] {path}: window {window:,} → {cfg.target:,}, rope {cfg.rope.method}, "
                  f"stages: {', '.join(f'{s.name} ({s.kind})' for s in cfg.stages)}")
    tokenizer = load_tokenizer(str(path))

    precision = precision_for(device) if cfg.eval.precision == "auto" else cfg.eval.precision

    ruler = [t for t in cfg.eval.lm_eval_tasks if t in lmeval_ruler.TASKS]  # lm-eval's RULER, in its own venv
    lengths = cfg.eval.lengths or doublings(window, cfg.target)
    if ruler:
        lmeval_ruler.check_tasks(ruler, lengths)

    def run_eval(model, directory: Path, model_dir: Path) -> EvalResult:  # weights stay fp32 under bf16 autocast
        fast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.no_grad(), fast, Progress(console=console) as progress:
            result = evaluate(model, tokenizer, cfg.eval, window, cfg.target, cache, progress,
                              partial=directory / "heldout.partial.json")
        if ruler:
            result.external = lmeval_ruler.run_ruler(model_dir, ruler, lengths, cfg.eval.lm_eval_limit or 4,
                                                     directory / "lm-eval")
        return result

    results: dict[str, EvalResult] = {}
    if main:
        bdir = base_eval or out / "base"
        results["base"] = eval_cached(bdir, lambda: run_eval(load(path, device, **loaded)[0], bdir, path))
    _barrier(device)

    new_config = load_config(path, **loaded)
    rope = apply_rope(new_config, cfg.rope.method, cfg.target, cfg.rope.theta)
    console.print(f"rope: {json.dumps(rope)}")
    model, current = None, path  # the model is loaded lazily: finished stages are skipped, not redone
    summaries = []
    for stage in cfg.stages:
        sdir = out / "stages" / stage.name
        done = sdir / "done.json"
        if not done.exists():
            if model is None:
                model, _ = load(current, device, config=new_config if current == path else None, **loaded)
            model, summary = run_stage(stage, model, tokenizer, sdir, cfg, path, new_config, device, cache,
                                       resume, console, main)
            if main:
                if stage.kind != "build":  # building data leaves the model as it was
                    save(model, tokenizer, sdir / "model")
                done.write_text(json.dumps(summary))
            _barrier(device)
            if several and stage.kind != "build":
                model = None  # reloaded from sdir / "model" by every process that needs it
        elif stage.kind != "build":
            model = None
        current = sdir / "model" if stage.kind != "build" else current
        summaries.append(json.loads(done.read_text()))
        if stage.evaluate and main:
            if model is None:
                model, _ = load(current, device, **loaded)
            results[stage.name] = eval_cached(sdir / "eval",
                                              lambda m=model, d=sdir / "eval", c=current: run_eval(m, d, c))
    if not main:
        return out / "report.md"
    if model is None:
        model, _ = load(current, device, config=new_config if current == path else None, **loaded)
    save(model, tokenizer, out / "model")
    results["extended"] = eval_cached(out / "extended", lambda: run_eval(model, out / "extended", out / "model"))
    minutes = (time.time() - t0) / 60
    write_metrics(out, cfg, summaries, results, minutes)
    header = [f"- model: `{cfg.model}` (window {window:,}) → target {cfg.target:,}",
              f"- rope: `{json.dumps(rope)}`",
              *[f"- stage `{s['stage']}` ({s['kind']}): {s['what']}" for s in summaries],
              f"- wall time: {minutes:.1f} min on {device}",
              "- re-run: `ctxstretch train config.yaml --out DIR`"]
    report = write_report(out, title or f"ctxstretch {cfg.name}", header, results, window,
                          checks=checks(results, window, cfg.target) if checks else None)
    for stage in cfg.stages:
        shutil.rmtree(out / "stages" / stage.name / "checkpoints", ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    console.print(f"[green]done[/] in {minutes:.1f} min: {report}")
    return report


def _barrier(device: str) -> None:
    """Wait for every process (a no-op in one process). accelerate's state is fetched anew: stages reset it."""
    distributed_state(device).wait_for_everyone()


def write_metrics(out: Path, cfg: PipelineConfig, summaries: list[dict], results: dict[str, EvalResult],
                  minutes: float) -> None:
    """`metrics.jsonl`: every stage's step records, then the stage summaries, then each evaluation."""
    with (out / "metrics.jsonl").open("w") as log:
        for stage in cfg.stages:
            steps = out / "stages" / stage.name / "metrics.jsonl"
            log.write(steps.read_text() if steps.exists() else "")
        for s in summaries:
            log.write(json.dumps(s) + "\n")
        for name, r in results.items():
            extra = {"wall_minutes": round(minutes, 2)} if name == "extended" else {}
            log.write(json.dumps({"eval": name, **r.summary(), **extra}) + "\n")


def run_stage(stage: StageConfig, model, tokenizer, sdir: Path, cfg: PipelineConfig, original: Path, rope_config,
              device: str, cache: Path, resume: bool, console: Console, main: bool = True
              ) -> tuple[torch.nn.Module, dict]:
    """Run one stage on `model`; returns (the model after it, its summary for metrics.jsonl and compare).
    Data is built by the main process only."""
    t0 = time.time()
    summary: dict = {"stage": stage.name, "kind": stage.kind, "tokens": 0}
    if stage.build:
        written = "built by the main process"
        if main:
            written = build_stage_data(stage.build.kind, stage.build.args, sdir / "data",
                                       tokenizer_source=cfg.model, length=stage.train_length, seed=cfg.seed)
        summary["what"] = f"built {stage.build.kind} data ({written})"
    elif stage.merge:
        orig, _ = load(original, device, config=rope_config, trust_remote_code=cfg.trust_remote_code,
                       allow_bin=cfg.allow_bin)
        model = linear_merge(model, orig, stage.merge.weight)
        summary["what"] = f"merged with the original model, weight {stage.merge.weight}"
    else:
        rows = stage_rows(stage, tokenizer, cfg.seed, dataset_dir=_dataset_dir(stage, sdir.parent))
        if stage.lora_rank:
            model = with_lora(model, stage.lora_rank, stage.lora_train_embeddings_norms)
        resume_stage = resume and latest_checkpoint(sdir) is not None
        model = train_stage(model, rows, stage.train, sdir, resume=resume_stage, name=stage.name)
        if stage.lora_rank and model is not None:  # None: a sharded run's other processes
            model = model.merge_and_unload()  # a plain model again: the output needs no peft
        t = stage.train
        summary["tokens"] = t.steps * t.batch_size * t.grad_accum * stage.train_length
        summary["train_length"] = stage.train_length
        last = latest_checkpoint(sdir)
        if last is not None:  # training time across resumes, as the checkpoints recorded it
            summary["train_s"] = round(checkpoint_state(last).get("elapsed_s", 0.0), 1)
        summary["what"] = (f"{t.steps} steps × {t.batch_size * t.grad_accum} rows × {stage.train_length:,} tokens, "
                           f"positions `{stage.positions}` over {stage.target:,}, lr {t.lr:.3g}, mix "
                           + ", ".join(f"{k} {v:g}" for k, v in stage.data.mix.items()))
    summary["wall_s"] = round(time.time() - t0, 1)
    console.print(f"stage [bold]{stage.name}[/]: {summary['what']} ({summary['wall_s']:.0f} s)")
    return model, summary


def _dataset_dir(stage: StageConfig, stages_dir: Path) -> Path | None:
    ds = stage.data.dataset
    if not ds:
        return None
    return stages_dir / ds[1:] / "data" if ds.startswith("@") else Path(ds)
