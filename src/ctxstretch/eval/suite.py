"""The evaluation every model gets: the held-out probe families (`data/families.py`: no training row kind shares
their template, filler or task — the headline numbers), the in-format passkey and needle grids over lengths ×
depths, loss by position on held-out text, and the short-context regression (loss on rows of the base window;
optional lm-evaluation-harness tasks).
Works on any local model; the held-out text is the embedded corpus' held-out split tokenised with that model's
tokenizer (or, for the short-context loss, a user source)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial as partial_fn
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator
from rich.progress import Progress

from ..config import Strict
from ..data.families import HELD_OUT
from ..data.probes import ProbeBuilder
from ..data.ruler import RulerBuilder
from ..data.sources import embedded_token_stream
from ..rundir import EvalDir
from . import lmeval_ruler
from .chat import chat_check
from .heldout import heldout_scores
from .lmeval_ruler import DEFAULT_LIMIT
from .lmeval_ruler import TASKS as RULER_TASKS
from .passkey import Grid, retrieval_grid
from .perplexity import default_buckets, loss_by_bucket, reset_dynamic_rope, token_losses
from .ruler import ruler_scores
from .short import require_lm_eval, run_lm_eval, short_context_loss, short_text_stream


class EvalConfig(Strict):
    """What to measure. Lengths default to doublings from the base window up to the target."""

    lengths: list[int] = Field(default_factory=list, description="probe lengths in tokens; empty: doublings")
    heldout: list[str] = Field(default_factory=lambda: list(HELD_OUT),
                               description="held-out probe families to score (the report's headline); empty: none")
    heldout_depths: list[float] = Field([0.1, 0.5, 0.9], description="depths of the held-out probes")
    heldout_trials: int = Field(8, ge=1, description="held-out probes per (family, length, depth)")
    depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    trials: int = Field(4, ge=1, description="probes per (length, depth) cell")
    needle: bool = True
    ruler: list[str] = Field(default_factory=list, description="RULER-style tasks to score (see data/ruler.py)")
    loss_rows: int = Field(8, ge=0, description="held-out rows for loss by position (0: skip)")
    short_rows: int = Field(16, ge=0, description="held-out rows of the base window for the short-context loss "
                            "(0: skip)")
    short_text: str = Field("embedded", description="held-out short text: 'embedded' or a file/folder/dataset")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks: its "
                                     "corpus-free RULER tasks (run at `lengths` in lm-eval's own environment) or "
                                     "short-context ones (need the [lmeval] extra); empty: none")
    lm_eval_limit: int | None = Field(None, ge=1, description="examples per lm-eval task and length (None: "
                                      f"{DEFAULT_LIMIT} for lm-eval's RULER tasks, all for the others)")
    lm_eval_lengths: list[int] = Field(default_factory=list, description="lengths of lm-eval's RULER tasks; empty: "
                                       "the evaluation lengths")
    lm_eval_optional: bool = Field(False, description="when lm-eval's environment cannot be built (no package "
                                   "index), note it in the report and go on instead of stopping")
    batch_size: int = Field(2, ge=1)
    chat: bool = Field(True, description="ask a few chat questions with known answers (models with a chat "
                       "template only)")
    precision: str = Field("fp32", pattern="^(auto|bf16|fp32)$",
                           description="bf16 autocast or fp32 (auto: bf16 where it is native)")
    backend: str = Field("transformers", pattern="^(transformers|vllm)$", description="inference engine of a run's "
                         "evaluations: transformers, or vllm in its own environment (`ctxstretch backend setup "
                         "vllm`), which also checks the final model's rope parity between the two")
    seed: int = 0

    @property
    def ruler_tasks(self) -> list[str]:
        """lm-eval's corpus-free RULER tasks among `lm_eval_tasks`: they run in lm-eval's own environment."""
        return [t for t in self.lm_eval_tasks if t in RULER_TASKS]

    @property
    def in_process_tasks(self) -> list[str]:
        """The other lm-eval tasks: run in this process on the model (the [lmeval] extra)."""
        return [t for t in self.lm_eval_tasks if t not in RULER_TASKS]

    @field_validator("heldout")
    @classmethod
    def _known_families(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in HELD_OUT]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a held-out family; choose from {', '.join(HELD_OUT)}")
        return names


def doublings(base_window: int, target: int) -> list[int]:
    """base_window, 2·base_window, … below target, then target."""
    if base_window <= 0:
        raise ValueError(f"base window must be positive, got {base_window}")
    out, n = [], base_window
    while n < target:
        out.append(n)
        n *= 2
    return [*out, target]


def standalone_lengths(window: int) -> list[int]:
    """Probe lengths for a model evaluated on its own (`ctxstretch eval`, no target): doublings from a quarter of its
    window (at least 64 tokens) to twice it (at least 512) — inside the window and just past it."""
    return doublings(max(64, window // 4), max(window * 2, 512))


@dataclass
class EvalResult:
    passkey: Grid
    needle: Grid | None
    losses: np.ndarray | None  # (rows, length-1) per-token loss
    buckets: dict[str, float]
    window: int = 0  # the evaluated model's original window, for plots and fits
    ruler: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> length -> accuracy
    short: dict | None = None  # short-context loss: {"length", "rows", "tokens", "loss", "source"}
    lm_eval: dict[str, dict[str, float]] | None = None  # lm-eval task -> metric -> value
    heldout: dict[str, dict[int, dict]] = field(default_factory=dict)  # family -> length -> {correct, n, token_acc}
    external: dict[str, dict[int, float]] = field(default_factory=dict)  # lm-eval RULER task -> length -> score
    chat: dict | None = None  # eval.chat.chat_check's answers (None: no chat template, or not asked)
    parity: dict | None = None  # rope parity transformers vs vLLM: {"dtype", "verdict", "buckets": [...]}
    external_samples: int | None = None  # lm-eval samples per (task, length); None: all of them
    external_note: str | None = None  # why lm-eval's RULER tasks did not run, when they were optional

    def summary(self) -> dict:
        s = {"passkey": self.passkey.by_length(), "loss_by_position": self.buckets}
        if self.heldout:
            s["heldout"] = self.heldout
        if self.external:
            s["external_ruler"] = self.external
        if self.needle is not None:
            s["needle"] = self.needle.by_length()
        if self.ruler:
            s["ruler"] = self.ruler
        if self.short is not None:
            s["short_context"] = self.short
        if self.lm_eval is not None:
            s["lm_eval"] = self.lm_eval
        if self.chat is not None:
            s["chat"] = {"passed": self.chat["passed"], "asked": self.chat["asked"]}
        if self.parity is not None:
            s["parity"] = self.parity["verdict"]
        return s

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = {"passkey": self.passkey.to_json(), "needle": self.needle.to_json() if self.needle else None,
                "loss_by_position": self.buckets, "window": self.window,
                "ruler": {t: {str(n): a for n, a in per.items()} for t, per in self.ruler.items()},
                "short_context": self.short, "lm_eval": self.lm_eval,
                "heldout": {f: {str(n): t for n, t in per.items()} for f, per in self.heldout.items()},
                "external_ruler": {t: {str(n): v for n, v in per.items()} for t, per in self.external.items()},
                "external_samples": self.external_samples, "external_note": self.external_note,
                "chat": self.chat, "parity": self.parity}
        EvalDir(directory).json.write_text(json.dumps(data, indent=1))
        if self.losses is not None:
            np.save(directory / "token_losses.npy", self.losses.astype(np.float32), allow_pickle=False)

    @classmethod
    def load(cls, directory: Path) -> EvalResult:
        data = json.loads(EvalDir(directory).json.read_text())

        def grid(d):
            return Grid(d["kind"], d["lengths"], d["depths"], np.array(d["acc"]), d["trials"]) if d else None

        lp = directory / "token_losses.npy"
        losses = np.load(lp, allow_pickle=False) if lp.exists() else None
        ruler = {t: {int(n): a for n, a in per.items()} for t, per in data.get("ruler", {}).items()}
        heldout = {f: {int(n): t for n, t in per.items()} for f, per in data.get("heldout", {}).items()}
        external = {t: {int(n): v for n, v in per.items()} for t, per in data.get("external_ruler", {}).items()}
        return cls(grid(data["passkey"]), grid(data["needle"]), losses, data["loss_by_position"],
                   data.get("window", 0), ruler, data.get("short_context"), data.get("lm_eval"), heldout, external,
                   data.get("chat"), data.get("parity"), data.get("external_samples"), data.get("external_note"))


def evaluate(model, tokenizer, cfg: EvalConfig, base_window: int, target: int, cache_dir: Path | None = None,
             progress: Progress | None = None, partial: Path | None = None,
             losses_of: Callable[..., np.ndarray] | None = None) -> EvalResult:
    """Run the grids, the loss-by-position sweep and the short-context regression on `model` (already on its
    device, in eval mode). partial: a file of finished held-out cells of this model (resumes a killed run).
    losses_of(stream, length, rows, batch_size): per-token losses of `rows` rows of `length` tokens (default: this
    model's, `perplexity.token_losses`; an inference engine gives its own prompt log-probabilities)."""
    in_process = cfg.in_process_tasks  # RULER runs in lm-eval's own venv
    if in_process:
        require_lm_eval()  # fail in the first second, not after the grids
    losses_of = losses_of or partial_fn(token_losses, model)
    heldout = embedded_token_stream(tokenizer, "heldout", cache_dir)
    short_stream = heldout
    if cfg.short_rows and cfg.short_text != "embedded":
        short_stream = short_text_stream(tokenizer, cfg.short_text)  # read first: a bad path fails before the grids
    builder = ProbeBuilder(tokenizer, heldout)
    lengths = cfg.lengths or doublings(base_window, target)
    kw = dict(trials=cfg.trials, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)
    held = heldout_scores(model, tokenizer, lengths, tuple(cfg.heldout), tuple(cfg.heldout_depths),
                          cfg.heldout_trials, cfg.seed, cfg.batch_size, progress, partial) if cfg.heldout else {}
    passkey = retrieval_grid(model, builder, "passkey", lengths, cfg.depths, **kw)
    needle = retrieval_grid(model, builder, "needle", lengths, cfg.depths, **kw) if cfg.needle else None
    losses, buckets = None, {}
    if cfg.loss_rows:
        length = max(lengths)
        losses = losses_of(heldout, length, cfg.loss_rows, 1)
        buckets = loss_by_bucket(losses, default_buckets(length, base_window))
    ruler = {}
    if cfg.ruler:
        ruler = ruler_scores(model, RulerBuilder(builder), lengths, tuple(cfg.ruler), trials=cfg.trials,
                             seed=cfg.seed, batch_size=cfg.batch_size, progress=progress)
    short = None
    if cfg.short_rows:
        reset_dynamic_rope(model)  # the window's rows with the model's own frequencies, not the last long row's
        short = short_context_loss(partial_fn(losses_of, batch_size=cfg.batch_size), short_stream, base_window,
                                   cfg.short_rows, cfg.short_text)
    lm = run_lm_eval(model, tokenizer, in_process, cfg.lm_eval_limit) if in_process else None
    chat = chat_check(model, tokenizer) if cfg.chat else None
    return EvalResult(passkey, needle, losses, buckets, base_window, ruler, short, lm, held, chat=chat)


def prepare_external(cfg: EvalConfig, lengths: list[int]) -> tuple[list[int], str | None]:
    """Before any model is evaluated: the lengths of lm-eval's RULER tasks (`cfg.lm_eval_lengths`, else the
    evaluation's `lengths`), with their environment made ready, and why they cannot run when they are optional and
    it cannot be built (None otherwise)."""
    ruler_lengths = cfg.lm_eval_lengths or lengths
    tasks = cfg.ruler_tasks
    return ruler_lengths, lmeval_ruler.prepare(tasks, ruler_lengths, cfg.lm_eval_optional) if tasks else None


def add_external(result: EvalResult, model_dir: Path, cfg: EvalConfig, lengths: list[int], out_dir: Path,
                 note: str | None = None, precision: str = "fp32") -> None:
    """lm-eval's RULER scores of the model saved at `model_dir` into `result` (`cfg.ruler_tasks` at `lengths`), or
    `note`: why they could not run (`prepare_external`). precision: the evaluation's (bf16: lm-eval loads the
    model in bf16, as our own evaluation holds it; otherwise in the dtype its config.json names)."""
    if note is not None:
        result.external_note = note
    elif cfg.ruler_tasks:
        limit = cfg.lm_eval_limit or DEFAULT_LIMIT
        result.external = lmeval_ruler.run_ruler(model_dir, cfg.ruler_tasks, lengths, limit, out_dir,
                                                 dtype="bfloat16" if precision == "bf16" else "auto")
        result.external_samples = limit
