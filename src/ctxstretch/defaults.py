"""Training settings derived from the model and the target, so a pretrained model is not trained with the embedded
model's settings.

The rule (printed at the start of every `extend`):

- **The embedded model** keeps its tuned settings: LR 1e-3, 20 warm-up steps, 200 steps × 4 rows, no activation
  checkpointing at any row length (4.5M parameters: memory is no concern at that size, test and CI time is;
  README "Results").
- **A pretrained model** of N parameters: peak LR `2e-5 · sqrt(7e9 / N)`, capped at 2e-4 — Llama 2 Long's 2e-5 at
  7B, LongRecipe's 5e-5 lands at ~1.4B, 1.4e-4 for SmolLM2-135M (smaller models tolerate larger steps). Rows per
  step: on a GPU about 2^20 tokens (the papers' batch scale), on a CPU one row. Steps: on a GPU a 1e9-token budget
  (LongRecipe trains on ~30% of a full-length run's tokens: this is that order), on a CPU what fits in two hours,
  at least 10, the time of a step taken from the model's own training step timed on this machine at two short
  lengths (`cpu_step_seconds`). Warm-up: 5% of the steps, at
  least 2. Activation checkpointing on whenever the training rows are longer than the model's original window
  (`rope.original_window`: activations grow with the row, weights do not), off for rows within it.
- **Precision**: bf16 autocast where the hardware has native bf16 (a CUDA GPU that reports it, a CPU whose oneDNN
  build reports bf16 support), fp32 elsewhere. Weights stay fp32 under autocast (the optimizer's master copy).

Anything the user sets explicitly wins; a learning rate ≥ 1e-3 on a model of ≥ 100M parameters gets a warning
naming the derived value.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from .hardware import precision_for, train_step_seconds
from .models import load_config, resolve
from .plan import read_shape

DERIVED = ("steps", "batch_size", "lr", "warmup_steps", "gradient_checkpointing", "precision")

EMBEDDED_LR, EMBEDDED_STEPS, EMBEDDED_ROWS, EMBEDDED_WARMUP = 1e-3, 200, 4, 20
GPU_TOKENS_PER_STEP = 2**20
GPU_TOKEN_BUDGET = 1e9
CPU_HOURS = 2.0
# row lengths at which a model's CPU training step is timed (`cpu_step_seconds`): short enough to take seconds,
# far enough apart to separate the per-token cost from the attention's per-token-pair cost
TIMED_LENGTHS = (512, 2048)
MIN_CPU_STEPS = 10
RISKY_LR, RISKY_PARAMS = 1e-3, 100_000_000


@dataclass(frozen=True)
class TrainDefaults:
    lr: float
    warmup_steps: int
    batch_size: int
    steps: int
    gradient_checkpointing: bool
    precision: str  # bf16 | fp32
    rule: str  # one line: how these were derived

    def as_train(self) -> dict:
        """The fields of a TrainConfig these settings fill."""
        return {"lr": self.lr, "warmup_steps": self.warmup_steps, "batch_size": self.batch_size, "steps": self.steps,
                "gradient_checkpointing": self.gradient_checkpointing, "precision": self.precision}


def pretrained_lr(params: int) -> float:
    """2e-5 at 7B, scaled by 1/sqrt(N), capped at 2e-4."""
    return min(2e-4, 2e-5 * math.sqrt(7e9 / max(params, 1)))


def train_defaults(*, params: int, embedded: bool, train_length: int, device: str,
                   step_seconds: float | None = None, given_steps: int | None = None,
                   window: int = 0) -> TrainDefaults:
    """The derived settings (see the module docstring). step_seconds: the estimated time of one CPU optimizer step
    of one row (`cpu_step_seconds`), which sizes the steps of a pretrained model on a CPU; given_steps: the user's
    step count instead (the warm-up then follows it); window: the model's original window in tokens (0: unknown,
    checkpointing on)."""
    precision = precision_for(device)
    if embedded:
        return TrainDefaults(EMBEDDED_LR, EMBEDDED_WARMUP, EMBEDDED_ROWS, EMBEDDED_STEPS, False, precision,
                             "embedded model: its tuned settings (LR 1e-3, 200 steps × 4 rows, no activation "
                             "checkpointing at any length)")
    lr = pretrained_lr(params)
    if device == "cuda":
        rows = max(1, GPU_TOKENS_PER_STEP // train_length)
        per_step = f"{rows} rows ≈ 2^20 tokens per step"
    else:
        rows, per_step = 1, "1 row per step"
    if given_steps is not None:
        steps, budget = given_steps, f"{given_steps} steps as given"
    elif device == "cuda":
        steps, budget = max(MIN_CPU_STEPS, int(GPU_TOKEN_BUDGET // (rows * train_length))), "1e9 tokens"
    else:
        if step_seconds is None or step_seconds <= 0:
            raise ValueError("a pretrained model on a CPU needs step_seconds to size its steps")
        steps = max(MIN_CPU_STEPS, int(CPU_HOURS * 3600 // step_seconds))
        budget = f"steps that fit {CPU_HOURS:g} h at ~{step_seconds:.0f} s per step"
    warmup = warmup_for(steps, embedded)
    ckpt = not window or train_length > window
    where = f"{train_length:,}-token rows {'past' if ckpt else 'within'} the {window:,}-token window" if window else \
        "window unknown"
    rule = (f"pretrained model, {params / 1e6:,.0f}M parameters: LR 2e-5·sqrt(7e9/N) = {lr:.3g}, {per_step}, "
            f"{budget}, warm-up {warmup}, activation checkpointing {'on' if ckpt else 'off'} ({where}), "
            f"{precision}")
    return TrainDefaults(lr, warmup, rows, steps, ckpt, precision, rule)


def warmup_for(steps: int, embedded: bool) -> int:
    """Warm-up steps: the embedded model's 20 (at most a tenth of its steps); 5% of the steps, at least 2."""
    if embedded:
        return min(EMBEDDED_WARMUP, steps // 10)
    return max(2, steps // 20)


def lr_warning(lr: float, params: int, embedded: bool) -> str | None:
    """A warning for a learning rate that would wreck a pretrained model, naming the safer value."""
    if embedded or params < RISKY_PARAMS or lr < RISKY_LR:
        return None
    return (f"LR {lr:g} on a {params / 1e6:,.0f}M-parameter pretrained model will likely destroy what it knows; "
            f"the derived value is {pretrained_lr(params):.3g} (drop --lr to use it)")


@functools.cache
def cpu_step_fit(model: str, precision: str, trust_remote_code: bool = False) -> tuple[float, float]:
    """(a, b) with t(T) = a·T + b·T² seconds for one forward + backward of `model` on a T-token row on this CPU:
    the model's architecture (random weights, its own config) timed at `TIMED_LENGTHS` in `precision`, once per
    process. The matmul peak alone does not predict it: on a CPU with AMX (peak 2.3 TFLOP/s) SmolLM2-135M's 4,096-token
    forward + backward takes 12.9 s where 40% of that peak gives 7.3 s; this fit gives 13.3 s (bench/RESULTS.md)."""
    config = load_config(resolve(model), trust_remote_code, allow_bin=True)  # its weights are never read here
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    (t1, s1), (t2, s2) = ((n, train_step_seconds(net, n, precision, config.vocab_size)) for n in TIMED_LENGTHS)
    b = max(0.0, (s2 / t2 - s1 / t1) / (t2 - t1))  # the per-token time grows with the row only through attention
    return max(1e-9, s1 / t1 - b * t1), b


def cpu_step_seconds(model: str, length: int, checkpointing: bool, precision: str,
                     trust_remote_code: bool = False) -> float:
    """Estimated seconds of one CPU optimizer step on one row of `length` tokens: `cpu_step_fit` extrapolated,
    +1/3 with activation checkpointing (the forward runs twice)."""
    a, b = cpu_step_fit(model, precision, trust_remote_code)
    return (a * length + b * length**2) * (4 / 3 if checkpointing else 1)


def derive(model: str, train_length: int, device: str, given: dict, embedded: bool, window: int,
           saved: dict | None = None, trust_remote_code: bool = False) -> tuple[dict, str]:
    """The DERIVED settings `given` leaves unset (None, or "auto" precision): {field: value} and the rule used.
    window: the model's original window (`rope.original_window`), which decides activation checkpointing. saved:
    the values an earlier run of the same directory derived (kept on resume: a CPU's measured speed varies)."""
    unset = [k for k in DERIVED if given.get(k) in (None, "auto")]
    kept = {k: saved[k] for k in unset if saved and saved.get(k) not in (None, "auto")}
    if not set(unset) - set(kept):
        return kept, "kept from the run's config.yaml"
    shape = read_shape(model)
    step_s = None
    if device == "cpu" and not embedded and "steps" in unset:
        ckpt = given.get("gradient_checkpointing")
        precision = given.get("precision") if given.get("precision") in ("bf16", "fp32") else precision_for(device)
        step_s = cpu_step_seconds(model, train_length, train_length > window if ckpt is None else bool(ckpt),
                                  precision, trust_remote_code)
    d = train_defaults(params=shape.params, embedded=embedded, train_length=train_length, device=device,
                       step_seconds=step_s, given_steps=None if "steps" in unset else given["steps"], window=window)
    fill = {k: v for k, v in d.as_train().items() if k in unset} | kept
    warning = lr_warning(fill.get("lr", given.get("lr")) or 0.0, shape.params, embedded)
    return fill, d.rule + (f"\n[yellow]warning:[/] {warning}" if warning else "")
