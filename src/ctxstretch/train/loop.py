"""One training stage on `accelerate`: AdamW, warm-up + cosine, gradient accumulation, bf16 autocast,
optional gradient checkpointing, rows carrying `position_ids`, atomic checkpoints and exact resume.

Rows come from `batch_fn(index)`, a pure function of the micro-batch index returning tensors
`input_ids`, `labels`, `position_ids`, `segment_ids`, all (B, T). Because the data order is a function of the step,
a resumed run sees exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from ..config import TrainConfig
from ..data.probes import IGNORE
from ..masking import mask_for_model

Batch = dict[str, torch.Tensor]
BatchFn = Callable[[int], Batch]
EvalFn = Callable[[torch.nn.Module, int], dict[str, float]]


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged per row, then over rows with any label, so short answers weigh as much as text.

    logits (B, T, V), labels (B, T) aligned with the inputs (the prediction for token t comes from t-1)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(labels.shape)
    mask = labels != IGNORE
    count = mask.sum(1)
    has = count > 0
    per_row = (tok * mask).sum(1)[has] / count[has]
    return per_row.mean() if has.any() else logits.sum() * 0.0


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to `min_lr_ratio` of the peak."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _mixed_precision(cfg: TrainConfig, device: str) -> str:
    if cfg.precision == "fp32":
        return "no"
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return "no"
    return "bf16"


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return choice


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous copies of every tensor (tied weights become separate copies, as safetensors requires)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def _save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, cfg: TrainConfig,
                     stopped: bool = False, elapsed_s: float = 0.0) -> None:
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(plain_state_dict(model), tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                "stopped": stopped, "elapsed_s": round(elapsed_s, 1)}))
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_state(ckpt: Path) -> dict:
    """step, stopped (the stage met its stopping rule there) and elapsed_s (training seconds up to it)."""
    return json.loads((ckpt / "state.json").read_text())


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> tuple[int, bool, float]:
    """Restore model, optimizer and schedule; return (step, stopped early there, training seconds so far)."""
    model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    state = checkpoint_state(ckpt)
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), bool(state.get("stopped", False)), float(state.get("elapsed_s", 0.0))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train_stage(
    model: torch.nn.Module,
    batch_fn: BatchFn,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    eval_fn: EvalFn | None = None,
    name: str = "train",
    stop_when: Callable[[dict], bool] | None = None,
) -> torch.nn.Module:
    """Train `model` in place for `cfg.steps` optimizer steps; return it (unwrapped).

    `stop_when(eval_record)` may end the stage early after an evaluation (a curriculum rule such as "until
    induction has formed"); the stage then checkpoints at that step and returns."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    # accelerate keeps one process-wide state; each stage (a recipe runs several) sets its own precision
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg, device), cpu=device == "cpu")
    if cfg.gradient_checkpointing:  # transformers ≥ 5.2 renamed it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    start, stopped, before = 0, False, 0.0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start, stopped, before = _load_checkpoint(ckpt, model, optimizer, scheduler)
        _truncate_metrics(metrics_path, start)
    if stopped:  # the stage had already met its stopping rule
        return model.eval()
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    tokens, t0, last_loss = 0, time.perf_counter(), float("nan")
    columns = [TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    with Progress(*columns, disable=not accelerator.is_main_process) as progress, metrics_path.open("a") as log:
        task = progress.add_task(name, total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            total = 0.0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in batch_fn(step * cfg.grad_accum + micro).items()}
                with accelerator.autocast():
                    logits = model(
                        input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        attention_mask=mask_for_model(model, batch["segment_ids"]), use_cache=False,
                    ).logits
                loss = row_mean_loss(logits, batch["labels"]) / cfg.grad_accum
                accelerator.backward(loss)
                total += loss.item()
                tokens += batch["input_ids"].numel()
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = total
            done = step + 1
            rate = tokens / max(1e-9, time.perf_counter() - t0)
            progress.update(task, completed=done, info=f"loss {total:.3f}  {rate:,.0f} tok/s")
            record: dict[str, float | int | str] = {}
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = {"stage": name, "step": done, "loss": round(total, 5),
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(rate, 1),
                          "elapsed_s": round(before + time.perf_counter() - t0, 1)}
            if eval_fn is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                model.eval()
                with torch.no_grad(), accelerator.autocast():
                    record = {"stage": name, "step": done, "loss": round(total, 5), "eval": True,
                              **eval_fn(model, done)}
                model.train()
                progress.console.print(f"step {done}: " + ", ".join(f"{k} {v}" for k, v in record.items()
                                                                 if k not in ("stage", "step", "eval")))
            if record:
                log.write(json.dumps(record) + "\n")
                log.flush()
            stop = bool(record) and "eval" in record and stop_when is not None and stop_when(record)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                _save_checkpoint(run_dir, done, accelerator.unwrap_model(model), optimizer, scheduler, cfg, stop,
                                 before + time.perf_counter() - t0)
            if stop:
                progress.console.print(f"{name}: stopping rule met at step {done}")
                break
    del last_loss
    model = accelerator.unwrap_model(model)
    model.eval()
    if cfg.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return model
