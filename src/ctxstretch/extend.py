"""`ctxstretch extend`: grow a model's window and prove it — evaluate the base, re-parameterise RoPE, train on short
rows carrying long positions (LongRecipe-style, Hu et al. 2024), evaluate again, write a report.

Default recipe (chosen by held-out scores, see README): LongRecipe's fixed dynamic-NTK base for the new rope, rows
of 0.3·target tokens whose positions are LongRecipe sentence-level skips over [0, target), 30% of rows left
contiguous (so the original window is kept), and a mix of the model's kind of text (the embedded corpus) with
span-repetition rows — no rows in any evaluation probe's format.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from rich.console import Console

from .config import ConfigError, Strict, TrainConfig, parse
from .data.mix import ROW_KINDS
from .eval.heldout import pooled_token
from .eval.suite import EvalConfig, EvalResult
from .models import load_config, resolve
from .positions import METHODS as POSITION_METHODS
from .recipes.pipeline import DataConfig, PipelineConfig, RopeConfig, StageConfig, load_yaml, run_pipeline
from .rope import METHODS as ROPE_METHODS
from .rope import original_window

# Chosen on the held-out families (README "Results"): plain text plus span-repetition rows, no probe templates.
DEFAULT_MIX = {"text": 0.6, "text_copy": 0.2, "random_copy": 0.2}


class ExtendTrainConfig(TrainConfig):
    """The training stage of `extend`, with the default recipe's budget (sized for the embedded model on a CPU)."""

    steps: int = Field(200, ge=0, description="optimizer steps (0: training-free)")
    batch_size: int = Field(4, ge=1, description="rows per micro-batch")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    checkpoint_every: int = Field(25, ge=1, description="save a resumable checkpoint every N steps")


class ExtendConfig(Strict):
    """Everything `extend` runs; written to `config.yaml` and re-runnable with `--config`."""

    model: str = Field("embedded", description="local HF model directory, or 'embedded'")
    target: int = Field(0, ge=0, description="target window in tokens; 0: 16x the model's window")
    method: str = Field("ntk-fixed", description=f"rope method: {', '.join(ROPE_METHODS)}")
    rope_theta: float | None = Field(None, gt=0, description="explicit base for abf/ntk-fixed")
    positions: str = Field("longrecipe", description=f"position transform: {', '.join(POSITION_METHODS)}")
    train_length: int = Field(0, ge=0, description="tokens per training row; 0: 0.3x target")
    contiguous_share: float = Field(0.3, ge=0, le=1, description="share of rows kept at contiguous positions")
    mix: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_MIX),
        description=f"row kinds and weights: {', '.join(ROW_KINDS)}")
    train: ExtendTrainConfig = Field(default_factory=ExtendTrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    lora_rank: int = Field(0, ge=0, description="LoRA rank via peft (0: full fine-tuning)")
    lora_train_embeddings_norms: bool = Field(True, description="with LoRA, also train embeddings and norms "
                                              "(LongLoRA's finding: needed for long context)")
    trust_remote_code: bool = False
    allow_bin: bool = False
    seed: int = 0

    def check(self, window: int) -> None:
        """Refuse impossible settings up front, with the fix."""
        if self.method not in ROPE_METHODS:
            raise ConfigError(f"method '{self.method}' is unknown; choose one of {', '.join(ROPE_METHODS)}")
        if self.positions not in POSITION_METHODS:
            raise ConfigError(f"positions '{self.positions}' is unknown; choose one of {', '.join(POSITION_METHODS)}")
        if self.target <= window:
            raise ConfigError(f"--target {self.target} must be larger than the model's window ({window}); "
                              f"try --target {window * 16}")
        if self.train_length > self.target:
            raise ConfigError(f"--train-length {self.train_length} exceeds --target {self.target}")
        if any(k not in ROW_KINDS for k in self.mix) or not any(v > 0 for v in self.mix.values()):
            raise ConfigError(f"mix must weight some of: {', '.join(ROW_KINDS)}")


def load_extend_config(path: Path) -> ExtendConfig:
    return parse(ExtendConfig, load_yaml(path), str(path))


def as_pipeline(cfg: ExtendConfig) -> PipelineConfig:
    """`extend` is a one-stage pipeline: the rope change, then one training stage named `extend`."""
    stage = StageConfig(name="extend", positions=cfg.positions, train_length=cfg.train_length,
                        contiguous_share=cfg.contiguous_share, data=DataConfig(mix=cfg.mix),
                        train=TrainConfig(**cfg.train.model_dump()), lora_rank=cfg.lora_rank,
                        lora_train_embeddings_norms=cfg.lora_train_embeddings_norms)
    return PipelineConfig(name="extend", model=cfg.model, target=cfg.target,
                          rope=RopeConfig(method=cfg.method, theta=cfg.rope_theta),
                          stages=[stage] if cfg.train.steps > 0 else [], eval=cfg.eval, seed=cfg.seed,
                          device=cfg.train.device, trust_remote_code=cfg.trust_remote_code, allow_bin=cfg.allow_bin)


def run_extend(cfg: ExtendConfig, out: Path, resume: bool = False, force: bool = False,
               console: Console | None = None) -> Path:
    """Run the whole extension; returns the path of `report.md`."""
    window = original_window(load_config(resolve(cfg.model), cfg.trust_remote_code, cfg.allow_bin))
    if cfg.target == 0:
        cfg = cfg.model_copy(update={"target": 16 * window})
    if cfg.train_length == 0:
        cfg = cfg.model_copy(update={"train_length": min(cfg.target, max(window, int(0.3 * cfg.target)))})
    cfg.check(window)
    return run_pipeline(as_pipeline(cfg), out, resume=resume, force=force, console=console,
                        saved_config=cfg.model_dump(mode="json"), title="ctxstretch extend",
                        checks=lambda r, w, t: target_checks(r["base"], r["extended"], w, t))


def target_checks(base: EvalResult, ext: EvalResult, window: int, target: int) -> list[tuple[str, bool, str]]:
    """The default recipe's claims, measured on the held-out families (pooled answer-token accuracy)."""
    b, e = pooled_token(base.heldout), pooled_token(ext.heldout)
    checks = []
    if window in b and window in e:
        (mb, _, _), (me, _, ne) = b[window], e[window]
        ratio = me / mb if mb else float("inf")
        checks.append((f"held-out retrieval inside the original window ({window:,}) keeps ≥ 90% of the base's",
                       ratio >= 0.9, f"{me:.2f} vs base {mb:.2f} ({ratio:.0%}; {ne} probes each)"))
        far = max((n for n in e if n <= 8 * window), default=None)
        if far and far > window:
            mf = e[far][0]
            own = mf / me if me else 0.0
            checks.append((f"held-out retrieval @ {far:,} ({far // window}× the window) ≥ 80% of the extended model's "
                           "own in-window score", own >= 0.8, f"{mf:.2f} vs {me:.2f} ({own:.0%})"))
    buckets = ext.buckets
    first, last = f"0-{window}", next((k for k in buckets if k.endswith(f"-{target}")), None)
    if first in buckets and last:
        ratio = buckets[last] / buckets[first]
        checks.append((f"extended loss at {last} ≤ 1.1× its loss at {first}", ratio <= 1.1, f"{ratio:.2f}×"))
    return checks
