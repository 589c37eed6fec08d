"""Where a training stage runs and how one global batch is spread over processes: the device, accelerate's process
state and its collective timeout, the data/context-parallel layout, each process's rows, and the checks that refuse
what a layout cannot train correctly."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from ..config import ConfigError, TrainConfig, UserError
from ..data.probes import IGNORE
from ..masking import DOC_ATTENTION, attention_segments, single_segment
from .loss import token_weights

Batch = dict[str, torch.Tensor]

ACCELERATE_DIR = Path(__file__).parent / "accelerate"
TIMEOUT_ENV = "CTXSTRETCH_DIST_TIMEOUT_MIN"
TIMEOUT_MIN = 360.0


def accelerate_config(name: str) -> Path:
    """Path of a shipped `accelerate launch --config_file` (ddp, fsdp2, fsdp2_cp, deepspeed_zero3, …)."""
    names = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    path = ACCELERATE_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        raise ConfigError(f"no accelerate config '{name}'; choose from {', '.join(names)}")
    return path


def collective_timeout() -> timedelta:
    """How long a process waits in a collective: `CTXSTRETCH_DIST_TIMEOUT_MIN` minutes, 6 hours by default.

    The other ranks wait at a barrier while the main one evaluates, builds data or saves; NCCL's own default
    (10 minutes) would kill such a job."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        minutes = float(raw) if raw else TIMEOUT_MIN
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and minutes > 0):
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of minutes; unset it for the 6-hour "
                          "default")
    return timedelta(minutes=minutes)


def distributed_state(device: str) -> PartialState:
    """accelerate's process state; the first call starts the process group, with `collective_timeout()`.

    On CPU, `cpu=True` makes accelerate see torchrun's processes (it would otherwise report one)."""
    return PartialState(cpu=device == "cpu", timeout=collective_timeout())


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return choice


def sharded(accelerator: Accelerator) -> bool:
    """True when each process holds only a shard of the weights/optimizer (FSDP, DeepSpeed ZeRO)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def zero3(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def deepspeed_fill(accelerator: Accelerator, cfg: TrainConfig, rows_per_process: int) -> None:
    """DeepSpeed's `auto` entries are normally filled from a prepared DataLoader; we have none."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    conf = accelerator.state.deepspeed_plugin.deepspeed_config
    conf["train_micro_batch_size_per_gpu"] = rows_per_process
    conf["gradient_clipping"] = cfg.grad_clip
    conf.setdefault("zero_force_ds_cpu_optimizer", False)  # our torch AdamW also runs on offloaded states


@dataclass(frozen=True)
class Layout:
    """How one global batch (B, T) is spread over the processes.

    Rows are split over the `dp` data-parallel ranks (this process takes block `dp_rank`); with context
    parallelism each row is further split along T over `cp` ranks by accelerate. Gradients are averaged over all
    `world` processes (DDP, FSDP over dp_shard×cp, ZeRO)."""

    dp_rank: int = 0
    dp: int = 1
    cp: int = 1
    world: int = 1


def layout_of(accelerator: Accelerator) -> Layout:
    pc = accelerator.parallelism_config
    if pc is None:
        return Layout(accelerator.process_index, accelerator.num_processes, 1, accelerator.num_processes)
    if pc.tp_enabled or pc.sp_enabled:
        raise ConfigError("train_stage supports data parallelism (DDP/FSDP/ZeRO) and context parallelism (cp_size); "
                          "tensor and DeepSpeed sequence parallelism (tp_size/sp_size) are not wired in")
    rank, size = 0, 1
    if pc.dp_dim_names:
        dp_mesh = accelerator.torch_device_mesh["dp"]
        rank, size = dp_mesh.get_local_rank(), dp_mesh.size()
    return Layout(rank, size, pc.cp_size if pc.cp_enabled else 1, accelerator.num_processes)


def pad_columns(batch: Batch, multiple: int) -> Batch:
    """`batch` with its rows lengthened at the end to a multiple of `multiple` tokens: labels and shift_labels
    IGNORE, weights 0, every other tensor repeating its last column (the last document goes on, its positions
    stay in range). Attention is causal and the added tokens weigh nothing, so no loss term changes."""
    extra = -batch["input_ids"].shape[1] % multiple
    if not extra:
        return batch
    out = {}
    for k, v in batch.items():
        if k in ("labels", "shift_labels"):
            tail = torch.full_like(v[:, :1], IGNORE)
        elif k == "weights":
            tail = torch.zeros_like(v[:, :1])
        else:
            tail = v[:, -1:]
        out[k] = torch.cat([v, tail.expand(-1, extra)], 1)
    return out


def local_batch(batch: Batch, lay: Layout, device) -> Batch:
    """This process's rows of a global batch, with `shift_labels` and loss `weights` (see `token_weights`).

    With context parallelism the rows are padded to a multiple of 2·cp tokens (`pad_columns`): torch splits each
    row into 2·cp chunks to balance the causal work, and shards unevenly otherwise."""
    rows = batch["input_ids"].shape[0]
    if rows % lay.dp:
        raise ConfigError(f"batch_size {rows} is not divisible by the {lay.dp} data-parallel processes; the global "
                          "batch must split evenly (pick batch_size as a multiple of the process count)")
    shifted, weights = token_weights(batch["labels"])
    per = rows // lay.dp
    part = slice(lay.dp_rank * per, (lay.dp_rank + 1) * per)
    out = {k: v[part].to(device) for k, v in batch.items()}
    out["shift_labels"], out["weights"] = shifted[part].to(device), weights[part].to(device)
    return pad_columns(out, 2 * lay.cp) if lay.cp > 1 else out


def check_varlen_positions(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
    """flash-attention-2 cuts a packed row where its positions return to 0; that must be exactly where documents
    start, or documents would leak into each other (or a position gap would be cut)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    if not torch.equal(starts, position_ids == 0):
        raise UserError("attn_implementation flash_attention_2: rows must restart position_ids at 0 exactly where a "
                        "document starts (flash-attention splits packed rows there); use sdpa for these rows")


def check_flash_rows(b: Batch, lay: Layout) -> None:
    """flash-attention-2 separates packed documents only in a batch of one row: transformers derives their
    boundaries from position_ids at batch size 1 alone, and runs plain causal attention over longer batches."""
    rows = b["input_ids"].shape[0]
    if rows > 1 and not single_segment(attention_segments(b["segment_ids"], b["labels"])):
        raise ConfigError(f"attn_implementation flash_attention_2 with packed rows needs one row per process, not "
                          f"{rows}: over several rows documents would attend to each other; set batch_size to {lay.dp} "
                          "(one row per data-parallel process) and raise grad_accum instead, or use "
                          "attn_implementation: sdpa")


def check_supported(cfg: TrainConfig, lay: Layout, attn: str | None, zero3: bool, lora: bool) -> None:
    """Refuse, in one line naming the setting and the fix, what would crash or silently train on wrong attention.

    attn: the attention implementation the stage trains with; zero3: DeepSpeed ZeRO-3; lora: a peft-wrapped model."""
    if lay.cp > 1 and attn not in ("sdpa", DOC_ATTENTION):
        raise ConfigError(f"attn_implementation {attn} with context parallelism (cp_size {lay.cp}): torch's context "
                          f"parallelism replaces only scaled_dot_product_attention, so {attn} would attend within "
                          "each shard alone; set attn_implementation: sdpa")
    if cfg.fused_loss != "liger":
        return
    if lay.cp > 1:
        raise ConfigError("fused_loss liger with context parallelism is not supported; set fused_loss: none")
    if zero3:
        raise ConfigError("fused_loss liger under DeepSpeed ZeRO-3: liger reads lm_head.weight outside the head's "
                          "forward, where ZeRO-3 keeps it partitioned; set fused_loss: none (the default chunked "
                          "loss builds no full logits either) or use an FSDP config")
    if lora:
        raise ConfigError("fused_loss liger with LoRA (lora_rank > 0): liger patches a plain transformers model, "
                          "not peft's wrapper; set fused_loss: none (the default chunked loss builds no full logits "
                          "either) or lora_rank: 0")

