"""Checkpoints of a training stage: written atomically, restored exactly, and, under sharded engines (FSDP,
DeepSpeed ZeRO), gathered into a plain model at the end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from ..atomic import writing
from ..config import TrainConfig
from ..models import with_parameters
from ..rundir import StageDir
from .parallel import sharded


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(StageDir(run_dir).checkpoints.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous copies of every tensor (tied weights become separate copies, as safetensors requires)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def weightless_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters live on the meta device (no memory; tied ones stay tied); buffers,
    such as rotary frequencies, are copied. Taken before sharding, it receives the gathered weights (`unsharded`)."""
    return with_parameters(model, lambda p: torch.empty_like(p, device="meta"))


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a prepared model, on CPU for FSDP2. Under FSDP and ZeRO-3 this is a collective every
    rank must join, and only the main process's result is complete."""
    if isinstance(model, FSDPModule):  # FSDP2: what accelerate's get_state_dict runs, for any device
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def unsharded(accelerator: Accelerator, model: torch.nn.Module,
              skeleton: torch.nn.Module | None) -> torch.nn.Module | None:
    """Every rank gathers the sharded `model`'s weights; the main process puts them into `skeleton` (its
    `weightless_copy` from before sharding) and returns it, a plain model; the other processes return None."""
    weights = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    if skeleton is None:
        raise ValueError("the main process needs the model's weightless_copy from before sharding")
    with torch.no_grad():
        for name, p in skeleton.named_parameters():  # each parameter once: tied ones stay one tensor
            if name not in weights:
                raise KeyError(f"the gathered weights lack {name}")
            torch.utils.swap_tensors(p, torch.nn.Parameter(weights[name].detach().contiguous(), p.requires_grad))
        for name, b in skeleton.named_buffers():
            if name in weights:
                b.copy_(weights[name])
    return skeleton.eval()


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, model, optimizer, scheduler,
                     cfg: TrainConfig, stopped: bool = False, elapsed_s: float = 0.0) -> None:
    """Write `checkpoints/step-N` atomically (a temporary directory renamed by the main process).

    Replicated training (one process, DDP) lets the main process write weights and optimizer state alone. Sharded
    engines (FSDP, DeepSpeed ZeRO) hold each rank's share of the state, so every rank writes its shard with
    `accelerator.save_state` and the main process adds the gathered full weights."""
    root = StageDir(run_dir).checkpoints
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded(accelerator):
        accelerator.save_state(str(tmp / "sharded"))
        weights = full_state_dict(accelerator, model)
    else:
        weights = accelerator.unwrap_model(model).state_dict() if main else None
    if main:
        with writing(tmp, final):  # a failed write (full disk) leaves the last good checkpoint the latest
            save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, tmp / "model.safetensors")
            if not sharded(accelerator):
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                        "stopped": stopped, "elapsed_s": round(elapsed_s, 1)}))
            os.replace(tmp, final)
        for old in sorted(root.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_state(ckpt: Path) -> dict:
    """step, stopped (the stage met its stopping rule there) and elapsed_s (training seconds up to it)."""
    return json.loads((ckpt / "state.json").read_text())


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> tuple[int, bool, float]:
    """Restore model, optimizer and schedule of a replicated run (before `prepare`); return (step, stopped early
    there, training seconds so far). Sharded checkpoints restore their engine state after `prepare`, except when
    the stage had stopped there: it is not prepared again, and its gathered full weights are the result."""
    state = checkpoint_state(ckpt)
    scheduler.load_state_dict(state["scheduler"])
    replicated = (ckpt / "optimizer.pt").exists()
    if replicated or state.get("stopped", False):
        model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    if replicated:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return int(state["step"]), bool(state.get("stopped", False)), float(state.get("elapsed_s", 0.0))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))

