"""One micro-batch of a training stage: its forward and backward on this process's share of the rows, and the
one-GPU extras a stage may switch on before it prepares the model (flash-attention-2, liger, compilation,
activation offload, bf16 parameters).

Under flash-attention-2 (without sequence parallelism) the micro-batch is flattened to one row (1, B·T) and the
document boundaries are handed to flash-attention's varlen kernel as `cu_seq_lens` built from the rows' segment ids
(`varlen_batch`): several packed rows per process train exactly, and positions inside a document (PoSE/LongRecipe
gaps) are never read as boundaries.

The loss of a share is Σ weights · token loss, the weights computed over the global batch (`loss.token_weights`),
so the shares of all processes — rows over data-parallel ranks, slices of a row over context- or
sequence-parallel ranks — add up to the one-process loss."""

from __future__ import annotations

import contextlib
import importlib.util

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..config import ConfigError, TrainConfig, UserError
from ..data.probes import IGNORE
from ..masking import attention_inputs
from .loss import chunked_weighted_loss, final_hidden, supports_chunked_head, weighted_loss
from .parallel import Batch, Layout, check_flash_rows, check_sequence_rows, check_varlen_positions, sequence_part
from .tracking import PositionLoss


def compile_layers(model: torch.nn.Module) -> int:
    """Regional compilation: every decoder layer (the classes in the model's `_no_split_modules`) compiled in place
    with `Module.compile`, so the layers share one compiled graph and parameter names (and checkpoints) stay the
    same; embeddings, masks and the LM head run eagerly, and transformers builds no dense causal mask for a
    compiled whole model. Returns the number of layers compiled."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"torch_compile: {type(model).__name__} names no decoder layer class "
                          "(_no_split_modules) to compile; set torch_compile: false")
    for layer in layers:
        layer.compile()
    return len(layers)


def prepare_extras(model: torch.nn.Module, cfg: TrainConfig) -> None:
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
        compile_layers(model)


def activation_offload(cfg: TrainConfig, device: str) -> contextlib.AbstractContextManager:
    """The context a training forward runs in: with `cfg.activation_offload` on a CUDA device, torch's
    `save_on_cpu(pin_memory=True)`, which moves every tensor autograd saves for the backward to pinned CPU memory
    and brings it back in the backward; otherwise nothing. On a CPU the activations are in CPU memory already, so
    the option is refused (ConfigError) rather than silently ignored."""
    if not cfg.activation_offload:
        return contextlib.nullcontext()
    if device != "cuda":
        raise ConfigError("activation_offload moves saved activations from GPU to CPU memory, and this stage runs "
                          "on the CPU; set activation_offload: false")
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def check_param_dtype(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """param_dtype bf16 runs only where a library keeps fp32 master weights and AdamW state for bf16 weights:
    DeepSpeed's bf16 mode (ZeRO's fp32 optimizer partitions). torch's AdamW on bf16 parameters would keep bf16
    state and round small updates away, so every other setting is refused."""
    if cfg.param_dtype == "fp32":
        return
    if accelerator.distributed_type != DistributedType.DEEPSPEED or accelerator.mixed_precision != "bf16":
        raise ConfigError("param_dtype bf16 needs fp32 master weights and AdamW state, which DeepSpeed's bf16 mode "
                          "keeps: launch with `accelerate launch --config_file $(ctxstretch accelerate-config "
                          "deepspeed_bf16)` (one GPU), or set param_dtype: fp32")


def varlen_batch(b: Batch) -> tuple[Batch, dict]:
    """A micro-batch of whole rows (B, T) as one flattened row (1, B·T) and flash-attention's varlen kwargs
    (`cu_seq_lens_q/k`, int32 (n_docs + 1,), and `max_length_q/k`, ints — the names transformers'
    `DataCollatorWithFlattening` produces): one sequence per run of equal segment id within a row, so documents
    never attend across each other or across rows, and position_ids are kept as they are (a gap inside a document
    stays a gap). Each row's first label becomes IGNORE: in the flat row it would be the target of the previous
    row's last token, a term the per-row loss never has (`shift_labels` and the loss weights are per row
    already). A segment id that recurs after another one in the same row is refused (one varlen sequence must be
    contiguous)."""
    seg = b["segment_ids"]
    rows, t = seg.shape
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    if any(int(starts[r].sum()) != int(seg[r].unique().numel()) for r in range(rows)):
        raise UserError("attn_implementation flash_attention_2: a document's segment id recurs after another "
                        "document in the same row; pack each document as one contiguous run, or use sdpa")
    bounds = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat([bounds, bounds.new_tensor([rows * t])]).to(torch.int32)
    longest = int(cu.diff().max())
    flat = {k: v.reshape(1, rows * t) for k, v in b.items()}
    if "labels" in b:
        labels = b["labels"].clone()
        labels[:, 0] = IGNORE
        flat["labels"] = labels.reshape(1, rows * t)
    return flat, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _context_parallel_step(accelerator: Accelerator, model, b: Batch, cfg: TrainConfig, lay: Layout,
                           by_position: PositionLoss | None) -> float:
    """micro_step under torch context parallelism: accelerate shards the buffers along T around the forward."""
    if not bool((b["segment_ids"] == b["segment_ids"][:, :1]).all()):
        raise UserError("context parallelism supports one document per row (plain causal attention); pack "
                        "rows without cross-document masks, or train without cp_size")
    keys = ("input_ids", "position_ids", "shift_labels", "weights")
    bufs = [b[k] for k in keys]
    with accelerator.maybe_context_parallel(buffers=bufs, buffer_seq_dims=[1] * 4, no_restore_buffers=set(bufs)):
        ids, pos, shifted, weights = bufs
        with activation_offload(cfg, accelerator.device.type), accelerator.autocast():
            # an all-ones 2-D mask keeps transformers from reading PoSE gaps in the shards as document starts
            logits = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                           use_cache=False).logits
        tokens = torch.zeros_like(weights) if by_position is not None else None
        loss = weighted_loss(logits, shifted, weights, out_tokens=tokens)
        accelerator.backward(loss * lay.world)
    if tokens is not None:
        by_position.add(tokens, pos, weights != 0)
    return loss.item()


def micro_step(accelerator: Accelerator, model, base, b: Batch, cfg: TrainConfig, lay: Layout,
               by_position: PositionLoss | None = None) -> float:
    """Forward and backward of this process's share of one micro-batch (`b`: its whole rows, from `local_batch`);
    returns its (unscaled) share of the loss. by_position, when given, receives each scored token's loss (not
    under liger, which returns only the mean).

    Under sequence parallelism the rows are checked whole, then this process keeps its slice along T
    (`sequence_part`): tokens, position_ids (so PoSE/LongRecipe gaps reach RoPE unchanged) and loss weights.
    DeepSpeed's Ulysses attention exchanges the slices per head group, attends over the whole row and hands each
    process back its slice; the LM head and loss run on the slice."""
    if lay.cp > 1:
        return _context_parallel_step(accelerator, model, b, cfg, lay, by_position)
    flash = cfg.attn_implementation == "flash_attention_2"
    if lay.sp > 1:  # Ulysses gathers whole rows per head group: FA2 splits them where positions restart at 0
        if flash:
            check_flash_rows(b, lay)
            check_varlen_positions(b["segment_ids"], b["position_ids"])
        check_sequence_rows(b, cfg.attn_implementation)
        b = sequence_part(b, lay)
    if flash and lay.sp == 1:  # one flat row, documents given to the varlen kernel as cu_seq_lens
        b, attn = varlen_batch(b)
        attn["attention_mask"] = None
    elif flash:
        attn = {"attention_mask": None}
    elif lay.sp > 1:  # one document per row (checked); Ulysses drops masks and attends causally over the row
        attn = {"attention_mask": torch.ones_like(b["input_ids"])}
    else:  # plain causal, per-document spans or (eager, odd segment ids) a dense mask; see ctxstretch.masking
        attn = attention_inputs(base, b["segment_ids"], b["labels"])
    inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], **attn}
    tokens = torch.zeros_like(b["weights"]) if by_position is not None and cfg.fused_loss != "liger" else None
    with activation_offload(cfg, accelerator.device.type), accelerator.autocast():
        if cfg.fused_loss == "liger":  # token mean of the local rows; exact when each process holds one row
            out = model(**inputs, labels=b["labels"], use_cache=False)
            loss = out.loss * b["weights"].sum()
        elif supports_chunked_head(base):  # the LM head + loss in chunks: no (B, T, V) logits
            hidden = final_hidden(model, **inputs)
            loss = chunked_weighted_loss(base.get_output_embeddings(), hidden, b["shift_labels"], b["weights"],
                                         out_tokens=tokens)
        else:
            logits = model(**inputs, use_cache=False).logits
            loss = weighted_loss(logits, b["shift_labels"], b["weights"], out_tokens=tokens)
    accelerator.backward(loss * lay.world)  # gradients are averaged over `world` processes; the shares are sums
    if tokens is not None:
        by_position.add(tokens, b["position_ids"], b["weights"] != 0)
    return loss.item()
