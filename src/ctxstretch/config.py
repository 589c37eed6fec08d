"""Typed configuration: one pydantic model per concept; unknown keys are errors that suggest the nearest key."""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(ValueError):
    """A problem with what the user gave us, phrased for them: one line naming the file/field and the fix.
    The CLI prints it as `error: …` and exits with code 2."""


class ConfigError(UserError):
    """A configuration problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _suggest_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(known))}"
                    raise ConfigError(f"unknown key '{key}' in {cls.__name__}{hint}")
        return data


def check_out_dir(out, force: bool) -> None:
    """Refuse an existing, non-empty output path unless `force` (the caller then replaces it)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} already exists; pass --force to overwrite it")
    check_writable(out)


def check_writable(out) -> None:
    """Refuse an output path that cannot be created: its nearest existing ancestor is a file or not writable."""
    parent = out if out.is_dir() else next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: cannot create it ({parent} is not a writable folder); choose another --out")


TRACKERS = ("tensorboard", "trackio", "wandb")  # accelerate trackers behind `log_with`


class TrainConfig(Strict):
    """One training stage."""

    steps: int = Field(200, ge=0, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of the peak (cosine)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    precision: str = Field("auto", pattern="^(auto|bf16|fp32)$", description="bf16 autocast or fp32")
    param_dtype: str = Field("fp32", pattern="^(fp32|bf16)$",
                             description="dtype of the trained weights: fp32 (under bf16 autocast where precision "
                             "is bf16), or bf16 with fp32 master weights and AdamW state held by DeepSpeed's bf16 "
                             "mode (needs a DeepSpeed launch with mixed_precision bf16, e.g. the deepspeed_bf16 "
                             "accelerate config on one GPU); the saved model carries the trained dtype")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing: recompute each decoder "
                                         "layer in the backward (derived: on past a pretrained model's window)")
    activation_offload: bool = Field(False, description="keep the activations saved for the backward in pinned "
                                     "CPU memory (torch.autograd.graph.save_on_cpu); CUDA only, refused on a CPU")
    checkpoint_every: int = Field(100, ge=1, description="save a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="call the stage's evaluation hook every N steps (0: never)")
    seed: int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    attn_implementation: str | None = Field(None, pattern="^(sdpa|eager|flash_attention_2)$",
                                            description="attention kernel for training (None: the model's own)")
    fused_loss: str = Field("none", pattern="^(none|liger)$",
                            description="liger: liger-kernel fused linear cross-entropy (no full logits; GPU)")
    torch_compile: bool = Field(False, description="torch.compile the model for training")
    log_with: list[str] = Field(default_factory=list,
                                description="accelerate trackers beside metrics.jsonl: tensorboard, trackio, wandb")

    @field_validator("log_with")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        """An unknown tracker, or one whose package is missing, is refused before anything runs."""
        for name in names:
            if name not in TRACKERS:
                raise ConfigError(f"unknown tracker '{name}'; choose from {', '.join(TRACKERS)}")
            if importlib.util.find_spec(name) is None and not (
                    name == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None):
                raise ConfigError(f"tracker {name} needs the {name} package: pip install {name}")
        return names


def parse(model: type[BaseModel], data: dict[str, Any], where: str) -> BaseModel:
    """Validate `data` into `model`, turning pydantic's report into one line naming the field."""
    try:
        return model.model_validate(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):  # our own message (e.g. an unknown key with its did-you-mean)
            raise ConfigError(f"{where}: {cause}" if field == "(root)" else f"{where}: in '{field}': {cause}") from None
        raise ConfigError(f"{where}: field '{field}': {err['msg']}") from None
