"""The stages a pipeline runs, one class per kind: `TrainStage`, `BuildStage` (a `ctxstretch data` builder into the
run directory) and `MergeStage`. `Stage.run(ctx, sd)` runs one into its folder `sd` and leaves the model later
stages start from in `ctx` (`RunContext`), which loads it only when a stage asks for it: finished stages are skipped,
not redone, and building data never loads a model."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from ..config import TrainConfig
from ..data.builders import run_builder
from ..models import load, save
from ..rundir import RunDir, StageDir
from ..train.checkpoints import checkpoint_state, latest_checkpoint
from ..train.loop import run_accelerator, train_stage
from ..train.lora import with_lora
from ..train.merge import linear_merge
from ..train.parallel import distributed_state
from .config import PipelineConfig, StageConfig
from .rows import stage_rows


def barrier(device: str) -> None:
    """Wait for every process (a no-op in one process). accelerate's state is fetched anew: a run's Accelerator
    starts a fresh one."""
    distributed_state(device).wait_for_everyone()


@dataclass
class RunContext:
    """What the stages of one run share. `current` is where the model the next stage starts from lives: the
    original model (loaded with the new rope configuration) until a stage writes another."""

    cfg: PipelineConfig  # resolved
    run: RunDir
    original: Path
    rope_config: object  # the original model's configuration with the new rope
    tokenizer: object
    device: str
    resume: bool
    console: Console
    main: bool = True  # the process that evaluates and writes
    several: bool = False  # more than one process: each reloads every stage's saved model
    current: Path | None = None
    _model: torch.nn.Module | None = field(default=None, repr=False)
    _accelerator: Accelerator | None = field(default=None, repr=False)

    def __post_init__(self):
        self.current = self.current or self.original

    @property
    def loaded(self) -> dict:
        return dict(trust_remote_code=self.cfg.trust_remote_code, allow_bin=self.cfg.allow_bin)

    def model(self) -> torch.nn.Module:
        """The model the next stage starts from, loaded from `current` on first use."""
        if self._model is None:
            config = self.rope_config if self.current == self.original else None
            self._model, _ = load(self.current, self.device, config=config, **self.loaded)
        return self._model

    def accelerator(self, cfg: TrainConfig) -> Accelerator:
        """The run's one Accelerator, made for its first training stage (the stages share its precision and
        trackers: `config.check_shared`)."""
        if self._accelerator is None:
            self._accelerator = run_accelerator(cfg, self.device, self.run.logs)
        return self._accelerator

    def use(self, path: Path, model: torch.nn.Module | None = None) -> None:
        """Later stages start from the model saved at `path` (`model`: the same, in memory)."""
        self.current, self._model = path, model


class Stage:
    """One stage of a pipeline; a subclass says whether it `changes_model` and what it does (`apply`)."""

    changes_model = True

    def __init__(self, config: StageConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def apply(self, ctx: RunContext, sd: StageDir) -> tuple[torch.nn.Module | None, dict]:
        """Do the stage's work; returns (the model after it, its summary for metrics.jsonl and compare)."""
        raise NotImplementedError

    def run(self, ctx: RunContext, sd: StageDir) -> None:
        """Run the stage into `sd`: its model saved (main process), `done.json` written, later stages pointed at
        its model."""
        t0 = time.time()
        model, what = self.apply(ctx, sd)
        summary = {"stage": self.name, "kind": self.config.kind, "tokens": 0, **what,
                   "wall_s": round(time.time() - t0, 1)}
        ctx.console.print(f"stage [bold]{self.name}[/]: {summary['what']} ({summary['wall_s']:.0f} s)")
        if ctx.main:
            if self.changes_model:
                save(model, ctx.tokenizer, sd.model)
            sd.done.write_text(json.dumps(summary))
        barrier(ctx.device)
        if self.changes_model:  # several processes: each reloads it (a sharded engine leaves no whole model)
            ctx.use(sd.model, None if ctx.several else model)


class TrainStage(Stage):
    def apply(self, ctx: RunContext, sd: StageDir) -> tuple[torch.nn.Module | None, dict]:
        c, t = self.config, self.config.train
        model = ctx.model()
        rows = stage_rows(c, ctx.tokenizer, t.seed, dataset_dir=ctx.run.dataset(c.data.dataset))
        if c.lora_rank:
            model = with_lora(model, c.lora_rank, c.lora_train_embeddings_norms)
        resume = ctx.resume and latest_checkpoint(sd.root) is not None
        model = train_stage(model, rows, t, sd.root, resume=resume, name=c.name, accelerator=ctx.accelerator(t))
        if c.lora_rank and model is not None:  # None: a sharded run's other processes
            model = model.merge_and_unload()  # a plain model again: the output needs no peft
        summary: dict = {"tokens": t.steps * t.batch_size * t.grad_accum * c.train_length,
                         "train_length": c.train_length}
        last = latest_checkpoint(sd.root)
        if last is not None:  # training time across resumes, as the checkpoints recorded it
            summary["train_s"] = round(checkpoint_state(last).get("elapsed_s", 0.0), 1)
        summary["what"] = (f"{t.steps} steps × {t.batch_size * t.grad_accum} rows × {c.train_length:,} tokens, "
                           f"positions `{c.positions}` over {c.target:,}, lr {t.lr:.3g}, mix "
                           + ", ".join(f"{k} {v:g}" for k, v in c.data.mix.items()))
        return model, summary


class BuildStage(Stage):
    """Builds data into `sd.data` (main process only); the model is left as it was."""

    changes_model = False

    def apply(self, ctx: RunContext, sd: StageDir) -> tuple[None, dict]:
        c, build = self.config, self.config.build
        written = "built by the main process"
        if ctx.main:
            args = build.builder_args(model=ctx.cfg.model, length=c.train_length, seed=c.train.seed,
                                      device=ctx.device)
            written = f"{run_builder(build.kind, args, sd.data, force=True).rows} rows"
        return None, {"what": f"built {build.kind} data ({written})"}


class MergeStage(Stage):
    def apply(self, ctx: RunContext, sd: StageDir) -> tuple[torch.nn.Module, dict]:
        weight = self.config.merge.weight
        model = ctx.model()
        original, _ = load(ctx.original, ctx.device, config=ctx.rope_config, **ctx.loaded)
        return linear_merge(model, original, weight), {"what": f"merged with the original model, weight {weight}"}


STAGES: dict[str, type[Stage]] = {"train": TrainStage, "build": BuildStage, "merge": MergeStage}


def stage_of(config: StageConfig) -> Stage:
    return STAGES[config.kind](config)
