"""`ctxstretch plan`: FLOPs, memory per GPU, time and a recommended setting for extending a model to a target
window, from the model's config.json alone (nothing is loaded).

Every figure is an estimate with its formula stated next to it; compare with a measured run before buying GPUs.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ConfigError

GB = 1e9  # decimal gigabytes, as GPU datasheets state memory


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense (no sparsity) peak
    memory_gb: float
    source: str


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM5 80 GB", 989.0, 80.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS dense BF16"),
    "h200": GPU("H200 SXM 141 GB", 989.0, 141.0, "NVIDIA H200 datasheet (SXM): 989 TFLOPS dense BF16, 141 GB HBM3e"),
    "a100-80g": GPU("A100 SXM4 80 GB", 312.0, 80.0, "NVIDIA A100 datasheet: 312 TFLOPS dense BF16, 80 GB HBM2e"),
    "a100-40g": GPU("A100 SXM4 40 GB", 312.0, 40.0, "NVIDIA A100 datasheet: 312 TFLOPS dense BF16, 40 GB HBM2"),
    "l40s": GPU("L40S 48 GB", 362.05, 48.0, "NVIDIA L40S datasheet: 362.05 TFLOPS dense BF16 (733 with sparsity)"),
}
USABLE = 0.9  # share of GPU memory we plan to fill (CUDA context, allocator fragmentation, NCCL buffers)
STATE_BYTES = {"fp32": (4, 4, 8), "bf16": (2, 2, 4)}  # bytes per parameter: weights, gradients, AdamW m + v
RECOMPUTE = 4 / 3  # activation checkpointing re-runs the forward: ~+33% time at the same MFU


@dataclass(frozen=True)
class Shape:
    """What the estimates need from a decoder-only transformer's config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    window: int

    @property
    def params(self) -> int:
        """All parameters: embeddings (+ untied LM head) + per layer q/o (d·h·hd each), k/v (d·kv·hd each),
        gated MLP (3·d·I) and two RMSNorms, + the final norm. Biases are ignored."""
        d, att = self.hidden, self.heads * self.head_dim
        layer = 2 * d * att + 2 * d * self.kv_heads * self.head_dim + 3 * d * self.intermediate + 2 * d
        return self.vocab * d * (1 if self.tied else 2) + self.layers * layer + d

    @property
    def matmul_params(self) -> int:
        """Parameters in matrix products per token: all but the input embedding lookup (the LM head counts)."""
        return self.params - self.vocab * self.hidden + (self.vocab * self.hidden if self.tied else 0)


def read_shape(source: str | Path) -> Shape:
    """Shape from a model directory, 'embedded', or a config.json path; one-line ConfigError otherwise."""
    from .models import read_json, resolve

    path = Path(source)
    if str(source) != "embedded" and path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"{path}: no such file; pass a model directory, 'embedded' or a config.json")
        config_file = path
    else:
        config_file = resolve(str(source)) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{config_file.parent}: no config.json; pass a Hugging Face model directory")
    raw = read_json(config_file)
    raw = raw.get("text_config", raw) if isinstance(raw, dict) else raw
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(raw, dict) or not isinstance(raw.get(k), int) or raw.get(k) <= 0]
    if missing:
        raise ConfigError(f"{config_file}: missing or non-positive '{missing[0]}'; plan needs a decoder-only "
                          "transformer config (hidden_size, num_hidden_layers, num_attention_heads, ...)")
    heads = raw["num_attention_heads"]
    return Shape(hidden=raw["hidden_size"], layers=raw["num_hidden_layers"], heads=heads,
                 kv_heads=int(raw.get("num_key_value_heads") or heads),
                 head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
                 intermediate=raw["intermediate_size"], vocab=raw["vocab_size"],
                 tied=bool(raw.get("tie_word_embeddings", False)), window=int(raw.get("max_position_embeddings", 0)))


def flops_per_token(shape: Shape, length: int) -> float:
    """Training FLOPs per token at row length T: 6·N (forward + backward of the matmuls, N = `matmul_params`) +
    12·L·T·(h·hd) for attention scores and values, counted as non-causal as MFU conventions do (PaLM, Chowdhery et
    al. 2022, appendix B); causal kernels do about half of that term."""
    return 6 * shape.matmul_params + 12 * shape.layers * length * shape.heads * shape.head_dim


def activation_bytes_per_token(shape: Shape, checkpointing: bool) -> float:
    """Activations kept for the backward, per token of a row, as `train_stage` runs: bf16 autocast over fp32 master
    weights, flash/SDPA attention (no T² scores), the chunked LM head.

    Per layer, in bytes per token (h·hd taken as d, kv = kv_heads·hd):
    - two RMSNorms, each keeping its fp32 input (the residual stream, fp32 under autocast) and its fp32 normalised
      product (the weight multiplies it): 2 × 8·d;
    - autocast casts a projection's fp32 input to bf16 once per projection, and each cast is kept: q, k, v and
      gate, up read their norm's output, so 5 × 2·d;
    - RoPE keeps the bf16 q and k and their `rotate_half` copies (2 × 2·(d + kv)); sdpa keeps its bf16 q, k, v and
      output (2·d + 4·kv + 2·d);
    - the gated MLP's gate, up, act(gate) and product in bf16 (8·I).
    With checkpointing only each layer's fp32 input (4·d) is kept, plus one layer recomputed at a time. Outside the
    layers: the final norm (8·d) and the fp32 copy of the labelled tokens' hidden states the chunked head reads
    (4·d). The peak comes in the backward of the last layer, with all of that alive and the first gradients
    beside it: the fp32 gradients of the final hidden states and of the residual stream (8·d) and the bf16
    gradients of the MLP's gate, up and product (6·I). Checked against `bench/bench_memory.py`
    (bench/RESULTS.md)."""
    d, kv = shape.hidden, shape.kv_heads * shape.head_dim
    layer = 16 * d + 10 * d + 4 * (d + kv) + 4 * d + 4 * kv + 8 * shape.intermediate
    head = 12 * d + 8 * d + 6 * shape.intermediate
    if checkpointing:
        return shape.layers * 4 * d + layer + head
    return shape.layers * layer + head


LOSS_CHUNK = 2048  # tokens per chunk of the LM head + loss (`ctxstretch.train.loss`)


def logits_bytes_per_token(shape: Shape) -> float:
    """Full-vocabulary logits at the loss's backward: bf16 logits, their fp32 copy, the fp32 log-softmax the
    cross-entropy keeps and its fp32 gradient (2 + 4 + 4 + 4 bytes per entry) — what a plain loss holds for every
    token. `train_stage` runs the head in checkpointed chunks (`logits_bytes`), which holds it for one chunk."""
    return 14 * shape.vocab


def logits_bytes(shape: Shape, tokens: float) -> float:
    """Logits memory of the chunked LM head + loss: one chunk of LOSS_CHUNK tokens at a time, whatever the row."""
    return min(tokens, LOSS_CHUNK) * logits_bytes_per_token(shape)


@dataclass
class Setting:
    engine: str  # ddp | fsdp2 | fsdp2_cp | deepspeed_zero3_offload
    sharded: bool
    checkpointing: bool
    cp: int
    dp: int
    states_gb: float
    activations_gb: float
    total_gb: float
    fits: bool


def memory_for(shape: Shape, length: int, gpus: int, master: str, sharded: bool, checkpointing: bool,
               cp: int) -> dict[str, float]:
    """GB per GPU for one row of `length` tokens per GPU group (`cp` GPUs share a row)."""
    w, g, o = STATE_BYTES[master]
    shard = gpus if sharded else 1
    tokens = length / cp
    out = {"weights_gb": shape.params * w / shard / GB, "grads_gb": shape.params * g / shard / GB,
           "optimizer_gb": shape.params * o / shard / GB,
           "activations_gb": tokens * activation_bytes_per_token(shape, checkpointing) / GB,
           "logits_gb": logits_bytes(shape, tokens) / GB}
    out["total_gb"] = sum(out.values())
    return out


def recommend(shape: Shape, length: int, gpu: GPU, gpus: int, master: str) -> Setting:
    """The simplest setting that fits: DDP, then FSDP2/ZeRO-3 full sharding, then activation checkpointing, then
    context parallelism over 2, 4, … GPUs per row; if nothing fits, ZeRO-3 with CPU offload."""
    usable = gpu.memory_gb * USABLE
    cps = [c for c in (2 ** i for i in range(int(math.log2(gpus)) + 1)) if gpus % c == 0]
    tries = [(False, False, 1), (True, False, 1), (True, True, 1)] + [(True, True, c) for c in cps if c > 1]
    if gpus == 1:
        tries = [(False, False, 1), (False, True, 1)]
    for sharded, ckpt, cp in tries:
        mem = memory_for(shape, length, gpus, master, sharded, ckpt, cp)
        if mem["total_gb"] <= usable:
            engine = "fsdp2_cp" if cp > 1 else "fsdp2" if sharded else "ddp" if gpus > 1 else "single-gpu"
            return Setting(engine, sharded, ckpt, cp, gpus // cp, _states(mem), mem["activations_gb"] +
                           mem["logits_gb"], mem["total_gb"], True)
    mem = memory_for(shape, length, gpus, master, True, True, cps[-1])
    return Setting("deepspeed_zero3_offload", True, True, cps[-1], gpus // cps[-1], _states(mem),
                   mem["activations_gb"] + mem["logits_gb"], mem["total_gb"], False)


def _states(mem: dict[str, float]) -> float:
    return mem["weights_gb"] + mem["grads_gb"] + mem["optimizer_gb"]


def plan(source: str | Path, target: int, gpu: str = "h100", gpus: int = 8, tokens: float = 1e9, mfu: float = 0.4,
         master: str = "fp32", train_length: int = 0) -> dict:
    """Everything `ctxstretch plan` prints, as plain data (see the module functions for each formula)."""
    if gpu not in GPUS:
        close = difflib.get_close_matches(gpu.lower(), list(GPUS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--gpu: unknown GPU '{gpu}'{hint} (choose from {', '.join(GPUS)})")
    if target < 1:
        raise ConfigError(f"--target {target} must be a positive number of tokens")
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} must be ≥ 1")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} must be in (0, 1], e.g. 0.4 for 40%")
    if tokens <= 0:
        raise ConfigError(f"--tokens {tokens:g} must be positive")
    if master not in STATE_BYTES:
        raise ConfigError(f"--master {master}: choose fp32 (fp32 weights under bf16 autocast, as train_stage does) "
                          "or bf16")
    shape = read_shape(source)
    card = GPUS[gpu]
    # LongRecipe (Hu et al., 2024, §3): train on rows of 30% of the target, positions spread over the target
    length = train_length or max(256, int(round(0.3 * target / 256)) * 256)
    setting = recommend(shape, length, card, gpus, master)
    fpt = flops_per_token(shape, length)
    seconds = tokens * fpt / (gpus * card.bf16_tflops * 1e12 * mfu) * (RECOMPUTE if setting.checkpointing else 1)
    mem = {ck: memory_for(shape, length, gpus, master, setting.sharded, ck, setting.cp) for ck in (False, True)}
    return {
        "model": str(source), "params": shape.params, "shape": asdict(shape),
        "target": target, "train_length": length,
        "gpu": {"key": gpu, **asdict(card)}, "gpus": gpus, "master": master, "usable_gb": card.memory_gb * USABLE,
        "flops_per_token": fpt, "flops_per_token_6n": 6 * shape.matmul_params,
        "weights_bf16_gb": shape.params * 2 / GB,
        "memory_per_gpu": {"no_checkpointing": mem[False], "checkpointing": mem[True]},
        "tokens": tokens, "mfu": mfu, "hours": seconds / 3600, "gpu_hours": seconds * gpus / 3600,
        "recommendation": asdict(setting),
    }


def render(result: dict, console) -> None:
    """Rich tables for a person."""
    from rich.table import Table

    rec, gpu = result["recommendation"], result["gpu"]
    head = Table(title=f"ctxstretch plan: {result['model']} → {result['target']:,} tokens on "
                       f"{result['gpus']} × {gpu['name']}", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("parameters", f"{result['params'] / 1e9:.3f} B ({result['params']:,})")
    head.add_row("weights in bf16", f"{result['weights_bf16_gb']:.2f} GB")
    head.add_row("train length (0.3 × target)", f"{result['train_length']:,} tokens per row")
    head.add_row("FLOPs per token", f"{result['flops_per_token']:.3e} (6N = {result['flops_per_token_6n']:.3e}, "
                 "+ 12·L·T·d attention)")
    head.add_row("time", f"{result['hours']:,.1f} h wall, {result['gpu_hours']:,.0f} GPU-h for "
                 f"{result['tokens']:.3g} tokens at {result['mfu']:.0%} MFU"
                 f"{' (+33% recompute)' if rec['checkpointing'] else ''}")
    head.add_row("GPU peak", f"{gpu['bf16_tflops']:g} TFLOPS bf16, {gpu['memory_gb']:g} GB ({gpu['source']})")
    console.print(head)
    sharding = f"sharded over {result['gpus']}" if rec["sharded"] else "replicated"
    mem = Table(title=f"memory per GPU (GB; {result['master']} master weights, states {sharding}, "
                      f"{result['train_length'] // rec['cp']:,} tokens per GPU)")
    for col in ("", "weights", "grads", "AdamW", "activations", "logits", "total"):
        mem.add_column(col, justify="right" if col else "left")
    for label, key in (("no checkpointing", "no_checkpointing"), ("checkpointing", "checkpointing")):
        m = result["memory_per_gpu"][key]
        mem.add_row(label, *(f"{m[k]:.1f}" for k in ("weights_gb", "grads_gb", "optimizer_gb", "activations_gb",
                                                      "logits_gb", "total_gb")))
    console.print(mem)
    verdict = "fits" if rec["fits"] else "does NOT fit even so; add GPUs, use bf16 master weights or offload"
    how = ("one process, no accelerate config" if rec["engine"] == "single-gpu" else
           f"accelerate config [cyan]{rec['engine']}[/] (`ctxstretch accelerate-config {rec['engine']}`)")
    console.print(f"[bold]recommended[/]: {how}, data parallel {rec['dp']} × context parallel "
                  f"{rec['cp']}, gradient checkpointing {'on' if rec['checkpointing'] else 'off'}; "
                  f"{rec['total_gb']:.1f} of {result['usable_gb']:.0f} usable GB per GPU — {verdict}.",
                  highlight=False)
