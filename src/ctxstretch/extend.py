"""`ctxstretch extend`: grow a model's window and prove it — evaluate the base, re-parameterise RoPE, train on short
rows carrying long positions (LongRecipe-style, Hu et al. 2024), evaluate again, write a report.

Default recipe (our choice, see README): ABF with the NTK rule for the new base, rows of 0.3·target tokens whose
positions are LongRecipe sentence-level skips over [0, target), 30% of rows left contiguous (so the original window
is kept), a mix of the model's kind of text (the embedded corpus) and passkey/needle rows at long range.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from pydantic import Field
from rich.console import Console
from rich.progress import Progress

from .config import ConfigError, Strict, TrainConfig, parse
from .data.mix import ROW_KINDS, RowMixer
from .data.sources import embedded_token_stream
from .eval.report import write_report
from .eval.suite import EvalConfig, EvalResult, evaluate
from .models import load, load_config, resolve, save
from .positions import METHODS as POSITION_METHODS
from .rope import METHODS as ROPE_METHODS
from .rope import apply_rope, original_window
from .train.loop import latest_checkpoint, resolve_device, train_stage


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
    method: str = Field("abf", description=f"rope method: {', '.join(ROPE_METHODS)}")
    rope_theta: float | None = Field(None, gt=0, description="explicit base for abf/ntk-fixed")
    positions: str = Field("longrecipe", description=f"position transform: {', '.join(POSITION_METHODS)}")
    train_length: int = Field(0, ge=0, description="tokens per training row; 0: 0.3x target")
    contiguous_share: float = Field(0.3, ge=0, le=1, description="share of rows kept at contiguous positions")
    mix: dict[str, float] = Field(
        default_factory=lambda: {"text": 0.4, "passkey": 0.25, "needle": 0.25, "text_copy": 0.1},
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return parse(ExtendConfig, data, str(path))


def prepare_out(out: Path, cfg: ExtendConfig, resume: bool, force: bool) -> None:
    """Refuse an existing run directory unless resuming (same config) or forced."""
    saved = out / "config.yaml"
    if out.exists() and any(out.iterdir()):
        if resume:
            if saved.exists() and yaml.safe_load(saved.read_text()) != cfg.model_dump(mode="json"):
                raise ConfigError(f"{out}: --resume with a different configuration than {saved}; rerun with the "
                                  "same settings, or use --force to start over")
            return
        if not force:
            raise ConfigError(f"{out} already exists; pass --resume to continue it or --force to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _eval_cached(directory: Path, fn) -> EvalResult:
    if (directory / "eval.json").exists():
        return EvalResult.load(directory)
    result = fn()
    result.save(directory)
    return result


def run_extend(cfg: ExtendConfig, out: Path, resume: bool = False, force: bool = False,
               console: Console | None = None) -> Path:
    """Run the whole extension; returns the path of `report.md`."""
    console = console or Console()
    t0 = time.time()
    path = resolve(cfg.model)
    config = load_config(path, cfg.trust_remote_code, cfg.allow_bin)
    window = original_window(config)
    if cfg.target == 0:
        cfg = cfg.model_copy(update={"target": 16 * window})
    if cfg.train_length == 0:
        cfg = cfg.model_copy(update={"train_length": min(cfg.target, max(window, int(0.3 * cfg.target)))})
    cfg.check(window)
    prepare_out(out, cfg, resume, force)
    device = resolve_device(cfg.train.device)
    cache = out / "cache"
    console.print(f"[bold]extend[/] {path} → window {window:,} → {cfg.target:,} ({cfg.method} rope, "
                  f"{cfg.positions} positions, rows of {cfg.train_length:,} tokens, {cfg.train.steps} steps)")
    base_model, tokenizer = load(path, device, cfg.trust_remote_code, cfg.allow_bin)
    with Progress(console=console) as progress:
        base = _eval_cached(out / "base", lambda: evaluate(base_model, tokenizer, cfg.eval, window, cfg.target,
                                                           cache, progress))
    base_model = None  # free it before loading the model to extend

    new_config = load_config(path, cfg.trust_remote_code, cfg.allow_bin)
    rope = apply_rope(new_config, cfg.method, cfg.target, cfg.rope_theta)
    console.print(f"rope: {json.dumps(rope)}")
    model, _ = load(path, device, cfg.trust_remote_code, cfg.allow_bin, config=new_config)
    if cfg.train.steps > 0:
        stream = embedded_token_stream(tokenizer, "train", cache)
        rows = RowMixer(tokenizer, stream, name="extend", seed=cfg.seed, length=cfg.train_length,
                        batch=cfg.train.batch_size, mix=cfg.mix, positions=cfg.positions, target=cfg.target,
                        contiguous_share=cfg.contiguous_share)
        resume_train = resume and latest_checkpoint(out) is not None
        if cfg.lora_rank:
            model = with_lora(model, cfg.lora_rank, cfg.lora_train_embeddings_norms)
        model = train_stage(model, rows, cfg.train, out, resume=resume_train, name="extend")
        if cfg.lora_rank:
            model = model.merge_and_unload()  # a plain model again: the output needs no peft
    save(model, tokenizer, out / "model")
    with torch.no_grad(), Progress(console=console) as progress:
        ext = _eval_cached(out / "extended", lambda: evaluate(model, tokenizer, cfg.eval, window, cfg.target,
                                                              cache, progress))
    minutes = (time.time() - t0) / 60
    with (out / "metrics.jsonl").open("a") as log:
        log.write(json.dumps({"eval": "base", **base.summary()}) + "\n")
        log.write(json.dumps({"eval": "extended", **ext.summary(), "wall_minutes": round(minutes, 2)}) + "\n")
    header = [f"- model: `{cfg.model}` (window {window:,}) → target {cfg.target:,}",
              f"- rope: `{json.dumps(rope)}`",
              f"- training: {cfg.train.steps} steps × {cfg.train.batch_size} rows × {cfg.train_length:,} tokens, "
              f"positions `{cfg.positions}`, lr {cfg.train.lr}",
              f"- wall time: {minutes:.1f} min on {device}",
              "- re-run: `ctxstretch extend --config config.yaml --out DIR`"]
    report = write_report(out, "ctxstretch extend", header, {"base": base, "extended": ext}, window,
                          checks=target_checks(base, ext, window, cfg.target))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    console.print(f"[green]done[/] in {minutes:.1f} min: {report}")
    return report


def with_lora(model, rank: int, train_embeddings_norms: bool):
    """Wrap `model` with peft LoRA adapters on every attention and MLP projection (Hu et al., 2021); optionally
    make embeddings and norms trainable too (LongLoRA, Chen et al., 2023, §3.3)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora_rank needs peft: pip install 'ctxstretch[peft]'") from None
    targets = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                      if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    if train_embeddings_norms:
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "norm" in name:
                p.requires_grad_(True)
    return model


def target_checks(base: EvalResult, ext: EvalResult, window: int, target: int) -> list[tuple[str, bool, str]]:
    """The vertical slice's acceptance claims, measured."""
    b, e = base.passkey.by_length(), ext.passkey.by_length()
    far = max(b)  # the target itself unless the evaluation stopped short of it
    checks = [
        (f"base passkey @ {far:,} ≤ 20%", b[far] <= 0.2, f"{b[far]:.0%}"),
        (f"extended passkey @ {far:,} ≥ 90%", e[far] >= 0.9, f"{e[far]:.0%}"),
    ]
    inside = [n for n in b if n <= window]
    if inside:
        drop = max(b[n] - e[n] for n in inside)
        checks.append(("inside the base window, extended loses ≤ 5 points", drop <= 0.05,
                       f"largest loss {max(drop, 0) * 100:.0f} pts (extended − base: "
                       + ", ".join(f"{(e[n] - b[n]) * 100:+.0f}" for n in inside) + ")"))
    buckets = ext.buckets
    first, last = f"0-{window}", next((k for k in buckets if k.endswith(f"-{target}")), None)
    if first in buckets and last:
        ratio = buckets[last] / buckets[first]
        checks.append((f"extended loss at {last} ≤ 1.1× its loss at {first}", ratio <= 1.1, f"{ratio:.2f}×"))
    return checks
