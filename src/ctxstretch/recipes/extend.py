"""`ctxstretch extend`: grow a model's window and prove it — evaluate the base, re-parameterise RoPE, train on short
rows carrying long positions (LongRecipe-style, Hu et al. 2024), evaluate again, write a report.

Default recipe (chosen by held-out scores, see README): LongRecipe's fixed dynamic-NTK base for the new rope, rows
of 0.3·target tokens (0.5·target for the embedded model: more real distance in each row held up better on the
held-out families) whose positions are LongRecipe sentence-level skips over [0, target), 30% of rows left
contiguous (so the original window is kept), and a mix of the model's kind of text (the embedded corpus) with
span-repetition rows — no rows in any evaluation probe's format. A pretrained model trains on real long documents
(`--text`, default the standard library as package-level documents), long ones drawn more often, short ones made
long by chunk interleaving (CIP), with LR, steps, rows per step and precision derived from the model
(`ctxstretch.defaults`).

As a recipe module: `ExtendConfig` holds its parameters (the command's flags; `config.yaml` of a run),
`resolve_extend` derives what is left unset, `pipeline` turns them into a one-stage `PipelineConfig`, `claims` are
the recipe's claims checked in the run's report, and `run` is the `Run` that `ctxstretch.extend` executes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field
from rich.console import Console

from ..config import Strict, TrainConfig, parse
from ..data.mix import ROW_KINDS
from ..defaults import TIMED_LENGTHS, cpu_step_seconds, derive
from ..eval.heldout import pooled_token, ratio_interval
from ..eval.lmeval_ruler import DEFAULT_LIMIT, MIN_LENGTH
from ..eval.perplexity import far_bucket
from ..eval.suite import EvalConfig, EvalResult
from ..models import EMBEDDED, load_config, resolve
from ..plan import GPUS, flops_per_token, memory_for, read_shape
from ..positions import METHODS as POSITION_METHODS
from ..rope import METHODS as ROPE_METHODS
from ..rope import default_target, original_window
from ..rundir import RunDir
from ..train.parallel import resolve_device
from .base import PRETRAINED_MIX, RecipeParams
from .config import DataConfig, PipelineConfig, RopeConfig, StageConfig, load_yaml
from .pipeline import Run

# Chosen on the held-out families (README "Results"; bench/RESULTS.md, third round): plain text and span-repetition
# rows, no probe templates. 60% span repetition held 81-86% of the in-window score at 8x (108 probes per cell) where
# 40% held 72-75%; 80% reached further still but lost text loss at far positions and the base's in-window passkey.
# A pretrained model trains on `base.PRETRAINED_MIX`: its kind of text, long documents drawn more often, short ones
# interleaved into long rows (CIP).
DEFAULT_MIX = {"text": 0.4, "text_copy": 0.3, "random_copy": 0.3}
GPU_ASSUMED_FLOPS = GPUS["h100"].bf16_tflops * 1e12
# The external suite of every report: lm-eval's own single-needle, multi-key and variable-tracking RULER tasks.
EXTERNAL_TASKS = ("niah_single_1", "niah_multikey_2", "ruler_vt")
ROW_SHARE = 0.3  # training rows as a share of the target: LongRecipe's 30%
# The embedded model: rows of half the target scored higher on the held-out families at every length (README
# "Results": 0.46 vs 0.41 at 8x, 0.65 vs 0.57 inside the window) for 1.7x the training tokens.
EMBEDDED_ROW_SHARE = 0.5
LONG_WEIGHT = 3.0  # documents of at least one row's length are drawn this much more often (Llama 2 Long §4)


# The knobs `extend` has both as a command (`ExtendConfig`) and as a recipe (`ExtendParams`), defined once.
RopeMethod = Annotated[str, Field("ntk-fixed", description=f"rope method: {', '.join(ROPE_METHODS)}")]
RopeTheta = Annotated[float | None, Field(None, gt=0, description="explicit base for abf/ntk-fixed")]
Positions = Annotated[str, Field("longrecipe", description=f"position transform: {', '.join(POSITION_METHODS)}")]
TrainLength = Annotated[int, Field(0, ge=0, description="tokens per training row; 0: 0.3x target (LongRecipe), "
                                   "0.5x for the embedded model")]
ContiguousShare = Annotated[float, Field(0.3, ge=0, le=1, description="share of rows kept at contiguous positions")]
TextField = Annotated[str, Field("text", description="the text column of jsonl/parquet/arrow sources")]


class ExtendTrainConfig(TrainConfig):
    """The training stage of `extend`; unset (None) budget fields are derived from the model (`ctxstretch.defaults`)."""

    steps: int | None = Field(None, ge=0, description="optimizer steps (0: training-free; None: derived)")
    batch_size: int | None = Field(None, ge=1, description="rows per micro-batch (None: derived)")
    lr: float | None = Field(None, gt=0, description="peak learning rate (None: derived)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up steps (None: derived)")
    gradient_checkpointing: bool | None = Field(None, description="activation checkpointing (None: derived)")
    checkpoint_every: int = Field(10, ge=1, description="save a resumable checkpoint every N steps")
    seed: int | None = Field(None, description="seed of the training rows and order (None: the run's `seed`)")


class ExtendConfig(Strict):
    """Everything `extend` runs; written to `config.yaml` and re-runnable with `--config`."""

    model: str = Field("embedded", description="local HF model directory, or 'embedded'")
    target: int = Field(0, ge=0, description="target window in tokens; 0: 16x the model's window")
    method: RopeMethod
    rope_theta: RopeTheta
    positions: Positions
    train_length: TrainLength
    contiguous_share: ContiguousShare
    mix: dict[str, float] | None = Field(
        None, description=f"row kinds and weights: {', '.join(ROW_KINDS)} (None: the default for the model)")
    text: list[str] = Field(default_factory=list, description="training text: 'embedded', 'stdlib' or files/folders "
                            "(txt, jsonl, parquet, arrow, a saved HF dataset); empty: the default for the model")
    text_field: TextField
    train: ExtendTrainConfig = Field(default_factory=ExtendTrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    lora_rank: int = Field(0, ge=0, description="LoRA rank via peft (0: full fine-tuning)")
    lora_train_embeddings_norms: bool = Field(True, description="with LoRA, also train embeddings and norms "
                                              "(LongLoRA's finding: needed for long context)")
    trust_remote_code: bool = False
    allow_bin: bool = False
    seed: int = 0


def load_extend_config(path: Path) -> ExtendConfig:
    return parse(ExtendConfig, load_yaml(path), str(path))


def pipeline(cfg: ExtendConfig) -> PipelineConfig:
    """`extend` is a one-stage pipeline: the rope change, then one training stage named `extend` (none when
    training-free)."""
    embedded = cfg.model == EMBEDDED
    data = DataConfig(mix=cfg.mix, text=cfg.text, text_field=cfg.text_field,
                      long_threshold=0 if embedded else cfg.train_length, long_weight=1.0 if embedded else LONG_WEIGHT)
    stage = StageConfig(name="extend", positions=cfg.positions, train_length=cfg.train_length,
                        contiguous_share=cfg.contiguous_share, data=data,
                        train=TrainConfig(**cfg.train.model_dump()), lora_rank=cfg.lora_rank,
                        lora_train_embeddings_norms=cfg.lora_train_embeddings_norms)
    return PipelineConfig(name="extend", model=cfg.model, target=cfg.target,
                          rope=RopeConfig(method=cfg.method, theta=cfg.rope_theta),
                          stages=[stage] if cfg.train.steps > 0 else [], eval=cfg.eval, seed=cfg.seed,
                          device=cfg.train.device, trust_remote_code=cfg.trust_remote_code, allow_bin=cfg.allow_bin)


def resolve_extend(cfg: ExtendConfig, saved: ExtendConfig | None = None) -> tuple[ExtendConfig, str]:
    """Fill in every derived setting (target, row length, data, training budget); returns (config, the rule used).
    saved: the run directory's config when resuming — its derived values are kept (a CPU's measured speed varies)."""
    window = original_window(load_config(resolve(cfg.model), cfg.trust_remote_code, cfg.allow_bin))
    if cfg.target == 0:
        cfg = cfg.model_copy(update={"target": default_target(window)})
    if cfg.train_length == 0:
        cfg = cfg.model_copy(update={"train_length": row_length(cfg.model, window, cfg.target)})
    embedded = cfg.model == EMBEDDED
    cfg = cfg.model_copy(update={"mix": cfg.mix or dict(DEFAULT_MIX if embedded else PRETRAINED_MIX),
                                 "text": cfg.text or ["embedded" if embedded else "stdlib"]})
    t = cfg.train
    fill, rule = derive(cfg.model, cfg.train_length, resolve_device(t.device), t.model_dump(), embedded, window,
                        saved.train.model_dump() if saved is not None else None, cfg.trust_remote_code)
    # the training seed: train.seed when given, else the run's, written down (config.yaml says what ran)
    seed = cfg.seed if t.seed is None else t.seed
    cfg = cfg.model_copy(update={"train": t.model_copy(update=fill | {"seed": seed})})
    if not embedded and not cfg.eval.model_fields_set & {"precision", "heldout_trials", "trials"}:
        # a pretrained model: bf16 where native; on a CPU one probe per cell (a 32K probe of a 135M model: ~5 min)
        cpu = resolve_device(t.device) == "cpu"
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
            "precision": "auto", **({"heldout_trials": 1, "trials": 1} if cpu else {})})})
        rule += "; evaluation in bf16 where native" + (", 1 probe per cell on a CPU" if cpu else "")
    if "lm_eval_tasks" not in cfg.eval.model_fields_set:
        external, said = external_suite(cfg.target, one_sample=not embedded and resolve_device(t.device) == "cpu")
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=external)})
        rule += f"; {said}"
    pipeline(cfg).resolved(window)  # the pipeline's own checks (data sources, lengths), before anything runs
    return cfg, rule


def row_length(model: str, window: int, target: int) -> int:
    """Tokens per training row unless given: `ROW_SHARE` of the target (`EMBEDDED_ROW_SHARE` for the embedded
    model), never shorter than the original window nor longer than the target."""
    share = EMBEDDED_ROW_SHARE if model == EMBEDDED else ROW_SHARE
    return min(target, max(window, int(share * target)))


def external_suite(target: int, one_sample: bool) -> tuple[dict, str]:
    """The external check every `extend` report carries unless told otherwise: lm-evaluation-harness's RULER tasks
    `EXTERNAL_TASKS` at a quarter of the target and at the target (each no shorter than the tasks' floor), a few
    samples per cell (one for a pretrained model on a CPU, where a 32K sample takes minutes); optional, so a machine
    that cannot build lm-eval's environment still gets its report, with the reason in it.
    Returns (the evaluation settings, the rule as printed)."""
    floor = max(MIN_LENGTH[t] for t in EXTERNAL_TASKS)
    if target < floor:
        return {"lm_eval_tasks": []}, f"no lm-eval RULER tasks (they need ≥ {floor:,} tokens)"
    lengths = sorted({max(floor, target // 4), target})
    limit = 1 if one_sample else DEFAULT_LIMIT
    return ({"lm_eval_tasks": list(EXTERNAL_TASKS), "lm_eval_lengths": lengths, "lm_eval_limit": limit,
             "lm_eval_optional": True},
            f"lm-eval RULER {', '.join(EXTERNAL_TASKS)} at {' and '.join(f'{n:,}' for n in lengths)} "
            f"({limit} sample{'s' if limit > 1 else ''} each)")


def dry_run(cfg: ExtendConfig, rule: str) -> list[str]:
    """What `extend --dry-run` prints: the resolved settings, the stage, and the time and memory estimate."""
    t, shape = cfg.train, read_shape(cfg.model)
    device = resolve_device(t.device)
    length, ckpt = cfg.train_length, bool(t.gradient_checkpointing)
    fpt = flops_per_token(shape, length)
    rows = t.steps * t.batch_size * t.grad_accum
    if device == "cpu":
        seconds = rows * cpu_step_seconds(cfg.model, length, ckpt, t.precision, cfg.trust_remote_code)
        speed = (f"from this model's {t.precision} training step timed on this CPU at "
                 f"{' and '.join(f'{n:,}' for n in TIMED_LENGTHS)} tokens")
    else:
        seconds = rows * length * fpt * (4 / 3 if ckpt else 1) / (GPU_ASSUMED_FLOPS * 0.4)
        speed = "at 40% MFU of an H100's 989 TFLOP/s (see `ctxstretch plan` for other GPUs)"
    mem = memory_for(shape, length * t.batch_size, 1, "fp32", False, ckpt, 1)
    mem_gb = mem["total_gb"]  # the LM head runs in chunks: one chunk's logits, not the row's
    return [f"settings: {rule}",
            f"model {cfg.model} ({shape.params / 1e6:,.0f}M parameters, window {shape.window:,}) → {cfg.target:,}, "
            f"rope {cfg.method}",
            f"stage extend: {t.steps} steps × {t.batch_size * t.grad_accum} rows × {length:,} tokens, positions "
            f"{cfg.positions} over {cfg.target:,}, lr {t.lr:.3g}, warm-up {t.warmup_steps}, {t.precision}, "
            f"checkpointing {'on' if ckpt else 'off'}",
            "data: " + ", ".join(cfg.text) + "; mix " + ", ".join(f"{k} {v:g}" for k, v in (cfg.mix or {}).items()),
            f"estimate: training {seconds / 3600:.2f} h {speed}; memory ≈ {mem_gb:.1f} GB (fp32 weights + grads + "
            f"AdamW {mem['weights_gb'] + mem['grads_gb'] + mem['optimizer_gb']:.1f} GB, activations "
            f"{mem['activations_gb']:.1f} GB); evaluation not included",
            "config:", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip()]


def run(cfg: ExtendConfig, out: Path, *, resume: bool = False, force: bool = False,
        console: Console | None = None) -> Run:
    """The run of `cfg` into `out`, every derived setting filled in (when resuming, the run directory's own
    derived values are kept); `.execute()` it."""
    console = console or Console()
    saved = RunDir(out).config
    cfg, rule = resolve_extend(cfg, load_extend_config(saved) if resume and saved.exists() else None)
    console.print(f"settings: {rule}")
    return Run(pipeline(cfg), out, resume=resume, force=force, console=console,
               saved_config=cfg.model_dump(mode="json"), title="ctxstretch extend", claims=claims,
               rerun="ctxstretch extend --config config.yaml --out DIR")


def claims(results: dict[str, EvalResult], window: int, target: int) -> list[tuple[str, bool, str]]:
    """The default recipe's claims on one run's evaluations (`base`, `extended`), measured on the held-out families
    (pooled answer-token accuracy) and on the loss by position."""
    base, ext = results["base"], results["extended"]
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
            lo, hi = ratio_interval(e[far], e[window])
            checks.append((f"held-out retrieval @ {far:,} ({far // window}× the window) ≥ 80% of the extended model's "
                           "own in-window score", own >= 0.8,
                           f"{mf:.2f} vs {me:.2f} ({own:.0%}; 95% interval {lo:.0%}–{hi:.0%})"))
    buckets = ext.buckets
    first, last = f"0-{window}", far_bucket(ext, target)
    if first in buckets and last:
        ratio = buckets[last] / buckets[first]
        checks.append((f"extended loss at {last} ≤ 1.1× its loss at {first}", ratio <= 1.1, f"{ratio:.2f}×"))
    return checks


class ExtendParams(RecipeParams):
    """`extend` as a recipe (`recipe: extend` in a YAML, `ctxstretch compare --recipes extend,...`): the same
    pipeline as the command, under the recipe interface and the budget `compare` gives every recipe. Its evaluation
    is the run's (`eval:`), so a comparison scores every recipe alike."""

    method: RopeMethod
    rope_theta: RopeTheta
    positions: Positions
    train_length: TrainLength
    contiguous_share: ContiguousShare
    text_field: TextField
    checkpoint_every: int = Field(10, ge=1, description="save a resumable checkpoint every N steps")

    def main_length(self, target: int) -> int:
        return self.train_length or target

    def resolved(self, window: int) -> tuple[ExtendParams, str]:
        target = self.target or default_target(window)
        fill = {"train_length": self.train_length or row_length(self.model, window, target),
                "mix": self.mix or (dict(DEFAULT_MIX) if self.model == EMBEDDED else None)}
        return super(ExtendParams, self.model_copy(update=fill)).resolved(window)


def from_params(p: ExtendParams, window: int) -> PipelineConfig:
    """The pipeline of `extend` for recipe parameters (after `ExtendParams.resolved`)."""
    cfg = ExtendConfig(model=p.model, target=p.target, method=p.method, rope_theta=p.rope_theta, positions=p.positions,
                       train_length=p.train_length, contiguous_share=p.contiguous_share, mix=p.mix, text=p.text,
                       text_field=p.text_field, train=ExtendTrainConfig(**p.train().model_dump()), eval=p.eval,
                       lora_rank=p.lora_rank, trust_remote_code=p.trust_remote_code, allow_bin=p.allow_bin,
                       seed=p.seed)
    return pipeline(cfg).model_copy(update={"description": __doc__.splitlines()[0]})
