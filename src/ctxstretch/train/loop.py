"""One training stage on `accelerate`: AdamW, warm-up + cosine, gradient accumulation, bf16 autocast,
optional gradient checkpointing, rows carrying `position_ids`, atomic checkpoints and exact resume.

Rows come from `batch_fn(index)`, a pure function of the micro-batch index returning tensors
`input_ids`, `labels`, `position_ids`, `segment_ids`, all (B, T). Because the data order is a function of the step,
a resumed run sees exactly the rows an uninterrupted one would.

Distributed (`accelerate launch` with the configs in `train/accelerate/`): every process builds the same global
batch and trains on its block of rows (and, with context parallelism, its slice of each row); the loss is written
as per-token weights over the global batch, so N processes take the same optimizer steps as one. Only the main
process writes metrics and replicated checkpoints; sharded engines (FSDP, ZeRO-3) add per-rank shards, and end a
stage with every rank gathering the full weights for the main process (`unsharded`). The process group waits
`collective_timeout()` in a collective, so ranks can idle at a barrier while the main one evaluates or saves.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, release_memory
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from ..atomic import writing
from ..config import ConfigError, TrainConfig, UserError
from ..data.probes import IGNORE
from ..hardware import precision_for
from ..masking import DOC_ATTENTION, attention_inputs, attention_segments, single_segment, use_document_attention
from .loss import chunked_weighted_loss, final_hidden, supports_chunked_head

Batch = dict[str, torch.Tensor]
BatchFn = Callable[[int], Batch]
EvalFn = Callable[[torch.nn.Module, int], dict[str, float]]


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
    """accelerate's mixed_precision: bf16 autocast when asked for (or, with "auto", where bf16 is native)."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and precision_for(device) == "fp32"):
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


def _sharded(accelerator: Accelerator) -> bool:
    """True when each process holds only a shard of the weights/optimizer (FSDP, DeepSpeed ZeRO)."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous copies of every tensor (tied weights become separate copies, as safetensors requires)."""
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def weightless_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters live on the meta device (no memory; tied ones stay tied); buffers,
    such as rotary frequencies, are copied. Taken before sharding, it receives the gathered weights (`unsharded`)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


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


def _save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, model, optimizer, scheduler,
                     cfg: TrainConfig, stopped: bool = False, elapsed_s: float = 0.0) -> None:
    """Write `checkpoints/step-N` atomically (a temporary directory renamed by the main process).

    Replicated training (one process, DDP) lets the main process write weights and optimizer state alone. Sharded
    engines (FSDP, DeepSpeed ZeRO) hold each rank's share of the state, so every rank writes its shard with
    `accelerator.save_state` and the main process adds the gathered full weights."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _sharded(accelerator):
        accelerator.save_state(str(tmp / "sharded"))
        weights = full_state_dict(accelerator, model)
    else:
        weights = accelerator.unwrap_model(model).state_dict() if main else None
    if main:
        with writing(tmp, final):  # a failed write (full disk) leaves the last good checkpoint the latest
            save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, tmp / "model.safetensors")
            if not _sharded(accelerator):
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


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> tuple[int, bool, float]:
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so the log matches an uninterrupted run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


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


def token_weights(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shifted labels, weights), both (B, T), for the loss of one *global* batch.

    shifted[:, t] is the token predicted at position t (IGNORE at the end); weights[r, t] = 1 / (n_r · R), n_r the
    labelled tokens of row r and R the rows with any label, so Σ weights · token loss equals `row_mean_loss`.
    Computed before the batch is split over ranks (rows) and context-parallel ranks (tokens), each rank's weighted
    sum is its exact share of the global loss."""
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], 1)
    mask = shifted != IGNORE
    count = mask.sum(1, keepdim=True)
    rows = int((count > 0).sum())
    return shifted, mask / (count.clamp(min=1) * max(rows, 1))


def weighted_loss(logits: torch.Tensor, shifted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ weights · cross-entropy; logits (B, T, V) predict `shifted` (B, T) position by position."""
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return (tok.view(shifted.shape) * weights).sum()


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


def _check_varlen_positions(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> None:
    """flash-attention-2 cuts a packed row where its positions return to 0; that must be exactly where documents
    start, or documents would leak into each other (or a position gap would be cut)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    if not torch.equal(starts, position_ids == 0):
        raise UserError("attn_implementation flash_attention_2: rows must restart position_ids at 0 exactly where a "
                        "document starts (flash-attention splits packed rows there); use sdpa for these rows")


def _check_flash_rows(b: Batch, lay: Layout) -> None:
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


def _zero3(accelerator: Accelerator) -> bool:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    return accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def _prepare_extras(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Optional one-GPU extras, each refusing clearly when its package is missing."""
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation flash_attention_2 needs the flash-attn package (CUDA only): "
                          "pip install flash-attn --no-build-isolation; or use sdpa")
    if cfg.attn_implementation and cfg.attn_implementation != getattr(model.config, "_attn_implementation", None):
        model.set_attn_implementation(cfg.attn_implementation)
    if cfg.fused_loss == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("fused_loss liger needs liger-kernel (CUDA/Triton): pip install liger-kernel; "
                              "or set fused_loss: none")
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=False, rms_norm=False, swiglu=False, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
    if cfg.torch_compile:
        model.compile()  # in place: parameter names (and checkpoints) stay the same


def _micro_step(accelerator: Accelerator, model, base, b: Batch, cfg: TrainConfig, lay: Layout) -> float:
    """Forward and backward of this process's share of one micro-batch; returns its (unscaled) share of the loss."""
    scale = lay.world  # gradients are averaged over `world` processes; the loss shares are sums
    if lay.cp > 1:
        if not bool((b["segment_ids"] == b["segment_ids"][:, :1]).all()):
            raise UserError("context parallelism supports one document per row (plain causal attention); pack "
                            "rows without cross-document masks, or train without cp_size")
        keys = ("input_ids", "position_ids", "shift_labels", "weights")
        bufs = [b[k] for k in keys]
        with accelerator.maybe_context_parallel(buffers=bufs, buffer_seq_dims=[1] * 4, no_restore_buffers=set(bufs)):
            ids, pos, shifted, weights = bufs
            with accelerator.autocast():
                # an all-ones 2-D mask keeps transformers from reading PoSE gaps in the shards as document starts
                logits = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                               use_cache=False).logits
            loss = weighted_loss(logits, shifted, weights)
            accelerator.backward(loss * scale)
        return loss.item()
    if cfg.attn_implementation == "flash_attention_2":
        _check_flash_rows(b, lay)
        _check_varlen_positions(b["segment_ids"], b["position_ids"])
        attn: dict = {"attention_mask": None}
    else:  # plain causal, per-document spans or (eager, odd segment ids) a dense mask; see ctxstretch.masking
        attn = attention_inputs(base, b["segment_ids"], b["labels"])
    inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], **attn}
    with accelerator.autocast():
        if cfg.fused_loss == "liger":  # token mean of the local rows; exact when each process holds one row
            out = model(**inputs, labels=b["labels"], use_cache=False)
            loss = out.loss * b["weights"].sum()
        elif supports_chunked_head(base):  # the LM head + loss in chunks: no (B, T, V) logits
            hidden = final_hidden(model, **inputs)
            loss = chunked_weighted_loss(base.get_output_embeddings(), hidden, b["shift_labels"], b["weights"])
        else:
            logits = model(**inputs, use_cache=False).logits
            loss = weighted_loss(logits, b["shift_labels"], b["weights"])
    accelerator.backward(loss * scale)
    return loss.item()


def _deepspeed_fill(accelerator: Accelerator, cfg: TrainConfig, rows_per_process: int) -> None:
    """DeepSpeed's `auto` entries are normally filled from a prepared DataLoader; we have none."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    conf = accelerator.state.deepspeed_plugin.deepspeed_config
    conf["train_micro_batch_size_per_gpu"] = rows_per_process
    conf["gradient_clipping"] = cfg.grad_clip
    conf.setdefault("zero_force_ds_cpu_optimizer", False)  # our torch AdamW also runs on offloaded states


def train_stage(
    model: torch.nn.Module,
    batch_fn: BatchFn,
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    eval_fn: EvalFn | None = None,
    name: str = "train",
    stop_when: Callable[[dict], bool] | None = None,
) -> torch.nn.Module | None:
    """Train `model` in place for `cfg.steps` optimizer steps; return it (unwrapped).

    Under `accelerate launch` every process calls this with the same arguments: each builds the global batch
    `batch_fn(i)` (cfg.batch_size rows) and trains on its share, so N processes follow the single-process loss
    curve. `stop_when(eval_record)` may end the stage early after an evaluation (a curriculum rule such as "until
    induction has formed"); the stage then checkpoints at that step and returns.

    Under a sharded engine (FSDP, DeepSpeed ZeRO-3) the main process returns a new plain model holding the
    gathered weights (on CPU), the others None; `model` itself stays sharded and is not to be used again."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    # accelerate keeps one process-wide state; each stage (a recipe runs several) sets its own precision
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg, device), cpu=device == "cpu",
                              gradient_accumulation_steps=cfg.grad_accum,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())])
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    lay = layout_of(accelerator)
    check_supported(cfg, lay, cfg.attn_implementation or getattr(model.config, "_attn_implementation", None),
                    _zero3(accelerator), hasattr(model, "peft_config"))
    model.config.use_cache = False
    skeleton = weightless_copy(model) if _sharded(accelerator) and main else None  # before any training-only change
    fsdp_ckpt = (accelerator.distributed_type == DistributedType.FSDP  # accelerate checkpoints the layers itself
                 and bool(accelerator.state.fsdp_plugin.activation_checkpointing))
    if cfg.gradient_checkpointing and not fsdp_ckpt:  # transformers ≥ 5.2 renamed it activation checkpointing
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    _prepare_extras(model, cfg)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    metrics_path = run_dir / "metrics.jsonl"
    start, stopped, before = 0, False, 0.0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start, stopped, before = _load_checkpoint(ckpt, model, optimizer, scheduler)
        if main:
            _truncate_metrics(metrics_path, start)
    if stopped:  # the stage had already met its stopping rule
        return None if _sharded(accelerator) and not main else model.eval()
    # packed rows without T × T masks (not under torch.compile: per-row document spans would recompile every step)
    restore_attn = use_document_attention(model) if lay.cp == 1 and not cfg.torch_compile else None
    _deepspeed_fill(accelerator, cfg, max(1, cfg.batch_size // lay.dp))
    base = model
    model, optimizer = accelerator.prepare(model, optimizer)
    if ckpt is not None and _sharded(accelerator):
        accelerator.load_state(str(ckpt / "sharded"))
    model.train()

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
                    total += _micro_step(accelerator, model, base, local_batch(batch, lay, accelerator.device),
                                         cfg, lay) / cfg.grad_accum
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
                          "elapsed_s": round(before + time.perf_counter() - t0, 1)}
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
            stop = bool(record) and "eval" in record and stop_when is not None and stop_when(record)
            if accelerator.num_processes > 1:  # the main process's verdict holds for all
                stop = bool(broadcast_object_list([stop])[0])
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                _save_checkpoint(accelerator, run_dir, done, model, optimizer, scheduler, cfg, stop,
                                 before + time.perf_counter() - t0)
            if stop:
                progress.console.print(f"{name}: stopping rule met at step {done}")
                break
    if _sharded(accelerator):  # a sharded module is no model to save, evaluate or prepare again
        whole = unsharded(accelerator, model, skeleton)
        del model, base, optimizer, scheduler  # the shards and optimizer states: free them before a reload
        accelerator.free_memory()
        release_memory()
        return whole
    model = accelerator.unwrap_model(model)
    model.eval()
    if restore_attn is not None:
        model.set_attn_implementation(restore_attn)
    if cfg.gradient_checkpointing and not fsdp_ckpt:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return model
