"""One training stage on `accelerate`: AdamW, warm-up + cosine, gradient accumulation, bf16 autocast,
optional gradient checkpointing and activation offload, bf16 weights with fp32 master weights under DeepSpeed
(`param_dtype`), rows carrying `position_ids`, atomic checkpoints and exact resume.

Rows come from `batch_fn(index)`, a pure function of the micro-batch index returning tensors
`input_ids`, `labels`, `position_ids`, `segment_ids`, all (B, T). Because the data order is a function of the step,
a resumed run sees exactly the rows an uninterrupted one would.

Distributed (`accelerate launch` with the configs in `train/accelerate/`): every process builds the same global
batch and trains on its block of rows (and, with context or DeepSpeed sequence parallelism, its slice of each
row); the loss is written as per-token weights over the global batch, so N processes take the same optimizer steps
as one (`parallel`, `step`).
Only the main process writes metrics and replicated checkpoints; sharded engines (FSDP, ZeRO-3) add per-rank
shards, and end a stage with every rank gathering the full weights for the main process (`checkpoints`). The
process group waits `collective_timeout()` in a collective, so ranks can idle at a barrier while the main one
evaluates or saves. Logged steps also carry the loss by position bucket and go to the `log_with` trackers
(`tracking`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    parse_flag_from_env,
    release_memory,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..config import ConfigError, TrainConfig
from ..hardware import precision_for
from ..masking import use_document_attention
from ..rundir import StageDir
from .checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    truncate_metrics,
    unsharded,
    weightless_copy,
)
from .parallel import (
    Batch,
    check_supported,
    collective_timeout,
    deepspeed_fill,
    layout_of,
    local_batch,
    resolve_device,
    sharded,
    sp_attention,
    zero3,
)
from .step import activation_offload, check_param_dtype, micro_step, prepare_extras
from .tracking import PositionLoss, start_trackers

BatchFn = Callable[[int], Batch]
EvalFn = Callable[[torch.nn.Module, int], dict[str, float]]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to `min_lr_ratio` of the peak."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mixed_precision(cfg: TrainConfig, device: str) -> str:
    """accelerate's mixed_precision: bf16 autocast when asked for (or, with "auto", where bf16 is native)."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and precision_for(device) == "fp32"):
        return "no"
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return "no"
    return "bf16"


def run_accelerator(cfg: TrainConfig, device: str, logs: Path) -> Accelerator:
    """A run's one Accelerator: its precision, trackers (writing under `logs`) and collective timeout, shared by all
    its training stages (each sets its own gradient accumulation; `check_run_settings` refuses stages that differ
    in the rest).

    accelerate keeps one process-wide state whose precision is fixed by the first Accelerator; a new run in the same
    process (the Python API, tests) starts from a fresh one (the process group itself is kept)."""
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    # `cpu=True` would switch a DeepSpeed launch off; DeepSpeed picks its device (and gloo on CPU) itself
    cpu = device == "cpu" and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    return Accelerator(mixed_precision=mixed_precision(cfg, device), cpu=cpu,
                       gradient_accumulation_steps=cfg.grad_accum, log_with=cfg.log_with or None, project_dir=logs,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())])


def shared_settings(cfg: TrainConfig) -> dict[str, object]:
    """What a run's training stages share through its one Accelerator: the precision and the trackers."""
    return {"precision": mixed_precision(cfg, resolve_device(cfg.device)), "log_with": sorted(cfg.log_with)}


def check_run_settings(accelerator: Accelerator, cfg: TrainConfig, name: str) -> None:
    """Refuse a stage whose `shared_settings` differ from its run's Accelerator (they are fixed per run)."""
    run = {"precision": accelerator.mixed_precision, "log_with": sorted(str(t) for t in accelerator.log_with)}
    for key, value in shared_settings(cfg).items():
        if value != run[key]:
            raise ConfigError(f"stage {name}: {key} {value} differs from the run's {run[key]}; give every training "
                              f"stage of a run the same {key}")


def tracked(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: numbers kept, the position buckets under `loss_by_position/`."""
    out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    out.update({f"loss_by_position/{k}": v for k, v in record.get("loss_by_position", {}).items()})
    return out


def train_stage(
    model: torch.nn.Module,
    batch_fn: BatchFn,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    eval_fn: EvalFn | None = None,
    name: str = "train",
    stop_when: Callable[[dict], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> torch.nn.Module | None:
    """Train `model` in place for `cfg.steps` optimizer steps; return it (unwrapped).

    accelerator: the run's (`run_accelerator`), shared by its stages; by default the stage is a run of its own.

    Under `accelerate launch` every process calls this with the same arguments: each builds the global batch
    `batch_fn(i)` (cfg.batch_size rows) and trains on its share, so N processes follow the single-process loss
    curve. `stop_when(eval_record)` may end the stage early after an evaluation (a curriculum rule such as "until
    induction has formed"); the stage then checkpoints at that step and returns.

    Under a sharded engine (FSDP, DeepSpeed ZeRO-3) the main process returns a new plain model holding the
    gathered weights (on CPU), the others None; `model` itself stays sharded and is not to be used again."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if accelerator is None:  # a stage on its own: a run of one stage
        accelerator = run_accelerator(cfg, device, StageDir(run_dir).logs)
    check_run_settings(accelerator, cfg, name)
    accelerator.gradient_accumulation_steps = cfg.grad_accum
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    lay = layout_of(accelerator)
    check_supported(cfg, lay, cfg.attn_implementation or getattr(model.config, "_attn_implementation", None),
                    zero3(accelerator), hasattr(model, "peft_config"), sp_attention(accelerator))
    check_param_dtype(cfg, accelerator)  # DeepSpeed's bf16 mode then holds bf16 weights, fp32 master + AdamW state
    activation_offload(cfg, device)  # refused on a CPU before anything is prepared
    model.config.use_cache = False
    skeleton = weightless_copy(model) if sharded(accelerator) and main else None  # before any training-only change
    fsdp_ckpt = (accelerator.distributed_type == DistributedType.FSDP  # accelerate checkpoints the layers itself
                 and bool(accelerator.state.fsdp_plugin.activation_checkpointing))
    if cfg.gradient_checkpointing and not fsdp_ckpt:  # transformers ≥ 5.2 renamed it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    prepare_extras(model, cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    metrics_path = StageDir(run_dir).metrics
    start, stopped, before = 0, False, 0.0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start, stopped, before = load_checkpoint(ckpt, model, optimizer, scheduler)
        if main:
            truncate_metrics(metrics_path, start)
    if stopped:  # the stage had already met its stopping rule
        return None if sharded(accelerator) and not main else model.eval()
    # packed rows without T × T masks (not under torch.compile: per-row document spans would recompile every step;
    # not under sequence parallelism, whose Ulysses wrapper intercepts the attention the model was prepared with)
    restore_attn = use_document_attention(model) if lay.cp == lay.sp == 1 and not cfg.torch_compile else None
    deepspeed_fill(accelerator, cfg, max(1, cfg.batch_size // lay.dp))
    base = model
    model, optimizer = accelerator.prepare(model, optimizer)
    if ckpt is not None and sharded(accelerator):
        accelerator.load_state(str(ckpt / "sharded"))
    model.train()
    start_trackers(accelerator, cfg.log_with, name, {"stage": name, **cfg.model_dump()})
    by_position = PositionLoss()

    tokens, t0 = 0, time.perf_counter()
    columns = [TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    log_file = metrics_path.open("a") if main else contextlib.nullcontext()
    with Progress(*columns, disable=not main) as progress, log_file as log:
        task = progress.add_task(name, total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            total = 0.0
            for micro in range(cfg.grad_accum):
                batch = batch_fn(step * cfg.grad_accum + micro)
                tokens += batch["input_ids"].numel()
                with accelerator.accumulate(model):
                    total += micro_step(accelerator, model, base, local_batch(batch, lay, accelerator.device),
                                        cfg, lay, by_position) / cfg.grad_accum
            if cfg.grad_clip > 0 and accelerator.distributed_type != DistributedType.DEEPSPEED:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.num_processes > 1:  # each process holds its share of the global loss
                total = accelerator.reduce(torch.tensor(total, device=accelerator.device), "sum").item()
            done = step + 1
            rate = tokens / max(1e-9, time.perf_counter() - t0)
            progress.update(task, completed=done, info=f"loss {total:.3f}  {rate:,.0f} tok/s")
            record: dict[str, float | int | str] = {}
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = {"stage": name, "step": done, "loss": round(total, 5),
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(rate, 1),
                          "elapsed_s": round(before + time.perf_counter() - t0, 1),
                          "loss_by_position": by_position.record(accelerator)}
            if eval_fn is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                model.eval()
                with torch.no_grad(), accelerator.autocast():
                    record = {"stage": name, "step": done, "loss": round(total, 5), "eval": True,
                              **eval_fn(model, done)}
                model.train()
                progress.console.print(f"step {done}: " + ", ".join(f"{k} {v}" for k, v in record.items()
                                                                 if k not in ("stage", "step", "eval")))
            if record and main:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if record and cfg.log_with:
                accelerator.log(tracked(record), step=done)
            stop = bool(record) and "eval" in record and stop_when is not None and stop_when(record)
            if accelerator.num_processes > 1:  # the main process's verdict holds for all
                stop = bool(broadcast_object_list([stop])[0])
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                save_checkpoint(accelerator, run_dir, done, model, optimizer, scheduler, cfg, stop,
                                 before + time.perf_counter() - t0)
            if stop:
                progress.console.print(f"{name}: stopping rule met at step {done}")
                break
    if cfg.log_with:
        accelerator.end_training()
        accelerator.trackers = []  # the next stage opens its own
    if sharded(accelerator):  # a sharded module is no model to save, evaluate or prepare again
        whole = unsharded(accelerator, model, skeleton)
        del model, base, optimizer, scheduler  # the shards and optimizer states: free them before a reload
        accelerator.free_memory()
        release_memory()
        return whole
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()  # it forgets this stage's model and optimizer; the next stage prepares its own
    model.eval()
    if restore_attn is not None:
        model.set_attn_implementation(restore_attn)
    if cfg.gradient_checkpointing and not fsdp_ckpt:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return model

