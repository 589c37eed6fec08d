"""Where a training stage runs and how one global batch is spread over processes: the device, accelerate's process
state and its collective timeout, the data/context/sequence-parallel layout, each process's rows (and slice of
them), and the checks that refuse what a layout cannot train correctly."""

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
SP_ATTENTION = ("sdpa", "flash_attention_2")  # what Ulysses wraps and `check_sequence_rows` checks


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


def sp_attention(accelerator: Accelerator) -> str | None:
    """The attention implementation DeepSpeed's Ulysses wrapper intercepts (`sp_attn_implementation`), or None
    without sequence parallelism."""
    pc = accelerator.parallelism_config
    if pc is None or not pc.sp_enabled or pc.sp_handler is None:
        return None
    return pc.sp_handler.sp_attn_implementation


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
    parallelism each row is further split along T over `cp` ranks by accelerate; with DeepSpeed sequence
    parallelism (Ulysses) each row is split along T over the `sp` ranks of a group, this process taking slice
    `sp_rank` (`sequence_part`). Gradients are averaged over all `world` processes (DDP, FSDP over dp_shard×cp,
    ZeRO — with sequence parallelism too, as the 2-process DeepSpeed test checks), so each process scales its loss
    share, a sum, by `world`."""

    dp_rank: int = 0
    dp: int = 1
    cp: int = 1
    world: int = 1
    sp: int = 1
    sp_rank: int = 0


def layout_of(accelerator: Accelerator) -> Layout:
    pc = accelerator.parallelism_config
    if pc is None:
        return Layout(accelerator.process_index, accelerator.num_processes, 1, accelerator.num_processes)
    if pc.tp_enabled:
        raise ConfigError("train_stage supports data, context (cp_size) and DeepSpeed sequence (sp_size) "
                          "parallelism; tensor parallelism (tp_size) is not wired in")
    if pc.sp_enabled:
        return sequence_layout(accelerator, pc.sp_size)
    rank, size = 0, 1
    if pc.dp_dim_names:
        dp_mesh = accelerator.torch_device_mesh["dp"]
        rank, size = dp_mesh.get_local_rank(), dp_mesh.size()
    return Layout(rank, size, pc.cp_size if pc.cp_enabled else 1, accelerator.num_processes)


def sequence_layout(accelerator: Accelerator, sp: int) -> Layout:
    """DeepSpeed Ulysses groups: consecutive ranks [i·sp, (i+1)·sp) share rows (DeepSpeed's
    `initialize_sequence_parallel`), so this process is slice `rank % sp` of data-parallel block `rank // sp`."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(f"sp_size {sp} (Ulysses sequence parallelism) runs on DeepSpeed only: launch with the "
                          "deepspeed_sp config (sp_backend: deepspeed), or use cp_size under FSDP2")
    world, rank = accelerator.num_processes, accelerator.process_index
    if world % sp:
        raise ConfigError(f"sp_size {sp} does not divide the {world} processes; pick num_processes as a multiple "
                          "of sp_size")
    return Layout(rank // sp, world // sp, 1, world, sp, rank % sp)


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
    row into 2·cp chunks to balance the causal work, and shards unevenly otherwise. With sequence parallelism
    they are padded to a multiple of sp and stay whole (checked whole by `check_sequence_rows`; `sequence_part`
    then takes this process's slice)."""
    rows = batch["input_ids"].shape[0]
    if rows % lay.dp:
        raise ConfigError(f"batch_size {rows} is not divisible by the {lay.dp} data-parallel processes; the global "
                          "batch must split evenly (pick batch_size as a multiple of the process count)")
    shifted, weights = token_weights(batch["labels"])
    per = rows // lay.dp
    part = slice(lay.dp_rank * per, (lay.dp_rank + 1) * per)
    out = {k: v[part].to(device) for k, v in batch.items()}
    out["shift_labels"], out["weights"] = shifted[part].to(device), weights[part].to(device)
    return pad_columns(out, 2 * lay.cp if lay.cp > 1 else lay.sp)


def sequence_part(rows: Batch, lay: Layout) -> Batch:
    """Slice `lay.sp_rank` of `sp` equal contiguous slices along T of every (B, T) tensor — the split DeepSpeed's
    `UlyssesSPDataLoaderAdapter` makes, labels shifted before it (here `shift_labels` and the loss `weights`, both
    computed over the whole global batch). Every process already holds the global batch, so nothing is gathered.
    Rows must be a multiple of sp long (`local_batch` pads them)."""
    t = rows["input_ids"].shape[1]
    if t % lay.sp:
        raise ValueError(f"row length {t} is not a multiple of sp_size {lay.sp}; pad it with pad_columns")
    chunk = t // lay.sp
    return {k: v[:, lay.sp_rank * chunk:(lay.sp_rank + 1) * chunk] for k, v in rows.items()}


def check_sequence_rows(rows: Batch, attn: str | None) -> None:
    """Ulysses attention drops attention masks and runs the core attention over the gathered row: plain causal
    under sdpa, split at position resets under flash-attention-2 (`check_varlen_positions`). Under sdpa a row
    must therefore hold one document (trailing unlabelled padding may follow it: `attention_segments`)."""
    if attn != "flash_attention_2" and not single_segment(attention_segments(rows["segment_ids"], rows["labels"])):
        raise UserError("sequence parallelism (sp_size) with sdpa runs plain causal attention over each row, and "
                        "these rows pack several documents; use attn_implementation: flash_attention_2 "
                        "(documents restarting position_ids at 0), or rows of one document each")


def check_varlen_positions(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
    """flash-attention-2 cuts a packed row where its positions return to 0; that must be exactly where documents
    start, or documents would leak into each other (or a position gap would be cut)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    if not torch.equal(starts, position_ids == 0):
        raise UserError("attn_implementation flash_attention_2: rows must restart position_ids at 0 exactly where a "
                        "document starts (flash-attention splits packed rows there); use sdpa for these rows")


def check_flash_rows(b: Batch, lay: Layout) -> None:
    """Under sequence parallelism, flash-attention-2 separates packed documents only in a batch of one row:
    Ulysses hands the attention whole rows without our `cu_seq_lens`, and transformers derives document boundaries
    from position_ids at batch size 1 alone. (Without sequence parallelism `step.varlen_batch` flattens any number
    of rows and passes the boundaries itself.)"""
    rows = b["input_ids"].shape[0]
    if rows > 1 and not single_segment(attention_segments(b["segment_ids"], b["labels"])):
        raise ConfigError(f"attn_implementation flash_attention_2 with packed rows under sequence parallelism needs "
                          f"one row per sequence-parallel group, not {rows}: over several rows documents would "
                          f"attend to each other; set batch_size to {lay.dp} and raise grad_accum instead, or train "
                          "without sp_size")


def check_supported(cfg: TrainConfig, lay: Layout, attn: str | None, zero3: bool, lora: bool,
                    sp_attn: str | None = None) -> None:
    """Refuse, in one line naming the setting and the fix, what would crash or silently train on wrong attention.

    attn: the attention implementation the stage trains with; zero3: DeepSpeed ZeRO-3; lora: a peft-wrapped model;
    sp_attn: the attention DeepSpeed's Ulysses wrapper intercepts (accelerate's `sp_attn_implementation`)."""
    if lay.cp > 1 and attn not in ("sdpa", DOC_ATTENTION):
        raise ConfigError(f"attn_implementation {attn} with context parallelism (cp_size {lay.cp}): torch's context "
                          f"parallelism replaces only scaled_dot_product_attention, so {attn} would attend within "
                          "each shard alone; set attn_implementation: sdpa")
    if lay.sp > 1:
        if attn not in SP_ATTENTION:
            raise ConfigError(f"attn_implementation {attn} with sequence parallelism (sp_size {lay.sp}): DeepSpeed's "
                              f"Ulysses attention wraps {' or '.join(SP_ATTENTION)} only; set attn_implementation: "
                              "sdpa")
        if sp_attn != attn:
            raise ConfigError(f"sp_attn_implementation {sp_attn} differs from the stage's attn_implementation "
                              f"{attn}: Ulysses would intercept an attention the model never calls; set "
                              f"parallelism_config_sp_attn_implementation: {attn} in the accelerate config")
        if cfg.fused_loss == "liger":
            raise ConfigError("fused_loss liger with sequence parallelism is not supported (it averages over the "
                              "local slice); set fused_loss: none (the default chunked loss builds no full logits)")
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

