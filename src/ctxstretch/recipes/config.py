"""A recipe as data: a model, a rope re-parameterisation and a list of stages — train (the default), build data
(`build:`) or merge (`merge:`) — run in order (`pipeline.Run`). YAML in, one-line errors out."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, model_validator

from ..config import ConfigError, Strict, TrainConfig, parse
from ..data.builders import REGISTRY as BUILDERS
from ..data.builders import BuilderArgs, builder, builder_args
from ..data.mix import ROW_KINDS
from ..data.sources import CORPORA
from ..eval.suite import EvalConfig
from ..positions import METHODS as POSITION_METHODS
from ..rope import METHODS as ROPE_METHODS
from ..rope import default_target
from ..train.loop import shared_settings
from ..train.parallel import resolve_device


class RopeConfig(Strict):
    """How RoPE is re-parameterised before the first stage (transformers' rope configuration)."""

    method: str = Field("abf", description=f"one of {', '.join(ROPE_METHODS)}")
    theta: float | None = Field(None, gt=0, description="explicit base for abf/ntk-fixed")


class DataConfig(Strict):
    """Where a training stage's rows come from (see `ctxstretch.data.mix` for the row kinds)."""

    text: list[str] = Field(default_factory=lambda: ["embedded"],
                            description="text sources: 'embedded', 'stdlib' (package-level documents) or local "
                            "files/folders (txt, jsonl, parquet, arrow, a saved HF dataset)")
    text_field: str = "text"
    mix: dict[str, float] = Field(default_factory=lambda: {"text": 1.0},
                                  description=f"row kinds and weights: {', '.join(ROW_KINDS)}")
    long_threshold: int = Field(0, ge=0, description="documents of at least this many tokens are 'long' (0: none)")
    long_weight: float = Field(1.0, gt=0, description="how much more often long documents are drawn")
    cip_k: int = Field(4, ge=1, description="documents interleaved per CIP row")
    cip_chunk: int = Field(0, ge=0, description="CIP chunk length in tokens (0: row length / 8)")
    select: str = Field("all", pattern="^(all|impactful)$",
                        description="'impactful': keep only sentences with impactful tokens (LongRecipe §4.1)")
    scorer: str | None = Field(None, description="model scoring impactful tokens (none: the digit heuristic)")
    dataset: str | None = Field(None, description="a `ctxstretch data` output dir, or '@STAGE' for a build stage's")


class BuildConfig(Strict):
    """A data-building stage: runs a `ctxstretch data` builder into `stages/NAME/data`."""

    kind: str = Field(..., description=f"one of {', '.join(sorted(BUILDERS))}")
    args: dict = Field(default_factory=dict, description="the builder's keyword arguments")

    def builder_args(self, *, model: str, length: int, seed: int, device: str = "cpu", where: str | None = None
                     ) -> BuilderArgs:
        """The builder's arguments, validated: `args` over what the stage fills in (the run's tokenizer `model` and
        `seed`, the stage's row `length`, the run's `device` for builders that run a model; text sources default to
        the embedded corpus)."""
        spec = builder(self.kind)
        run = {"device": device} if "device" in spec.args.model_fields else {}
        filled = {"model": model, "seed": seed, **run, **spec.args.for_stage(length), **self.args}
        return builder_args(self.kind, filled, where)


class MergeConfig(Strict):
    """θ = weight·θ_original + (1 − weight)·θ_current, keeping the current rope configuration."""

    weight: float = Field(0.5, ge=0, le=1, description="share of the original model")


class StageConfig(Strict):
    """One stage: train (default), build data (`build`) or merge (`merge`); `stages.STAGES[kind]` runs it."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = Field(default_factory=DataConfig)
    positions: str = Field("full", description=f"position transform: {', '.join(POSITION_METHODS)}")
    train_length: int = Field(0, ge=0, description="tokens per row; 0: length_fraction × target")
    length_fraction: float = Field(1.0, gt=0, le=1, description="row length as a share of the stage's target")
    target: int = Field(0, ge=0, description="positions cover [0, target); 0: the pipeline's target")
    contiguous_share: float = Field(0.0, ge=0, le=1, description="share of rows kept at contiguous positions")
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora_rank: int = Field(0, ge=0, description="LoRA rank via peft (0: full fine-tuning)")
    lora_train_embeddings_norms: bool = True
    build: BuildConfig | None = None
    merge: MergeConfig | None = None
    evaluate: bool = Field(False, description="evaluate the model after this stage")

    @model_validator(mode="after")
    def _one_kind(self) -> StageConfig:
        if self.build and self.merge:
            raise ConfigError(f"stage '{self.name}' sets both 'build' and 'merge'; a stage either builds data or "
                              "merges: give each its own stage")
        return self

    @property
    def kind(self) -> str:
        return "build" if self.build else "merge" if self.merge else "train"


class RunSettings(Strict):
    """What a whole run takes besides its recipe: the model, the target, the evaluation and where it runs."""

    model: str = Field("embedded", description="local HF model directory, or 'embedded'")
    target: int = Field(0, ge=0, description="target window in tokens; 0: 16x the model's window")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    trust_remote_code: bool = False
    allow_bin: bool = False

    def run_settings(self) -> dict:
        """These fields as keyword arguments (to pass a recipe's settings into its pipeline unchanged)."""
        return {name: getattr(self, name) for name in RunSettings.model_fields}


class PipelineConfig(RunSettings):
    """A whole recipe; `config.yaml` in the run directory is this, resolved (lengths filled in)."""

    name: str = "custom"
    description: str = ""
    rope: RopeConfig = Field(default_factory=RopeConfig)
    stages: list[StageConfig] = Field(default_factory=list)

    def resolved(self, window: int) -> PipelineConfig:
        """Fill in the target, every stage's target and row length, and the run's device and seed where a stage does
        not set its own; refuse impossible settings."""
        target = self.target or default_target(window)
        if self.rope.method not in ROPE_METHODS:
            raise ConfigError(f"rope.method '{self.rope.method}' is unknown; choose one of {', '.join(ROPE_METHODS)}")
        if target <= window:
            raise ConfigError(f"target {target} must be larger than the model's window ({window}); "
                              f"try target: {default_target(window)}")
        stages, names, built = [], set(), set()
        for i, s in enumerate(self.stages):
            where = f"stages[{i}] ({s.name})"
            if s.name in names:
                raise ConfigError(f"{where}: two stages are named '{s.name}'; give each stage its own name")
            names.add(s.name)
            st = s.target or target
            length = s.train_length or min(st, max(window, int(s.length_fraction * st)))
            if st > target:
                raise ConfigError(f"{where}: target {st} exceeds the pipeline's target {target}")
            if length > st:
                raise ConfigError(f"{where}: train_length {length} exceeds the stage's target {st}")
            if s.positions not in POSITION_METHODS:
                raise ConfigError(f"{where}: positions '{s.positions}' is unknown; "
                                  f"choose one of {', '.join(POSITION_METHODS)}")
            if s.kind == "train":
                check_data(s.data, where, built)
            run_wide = {k: getattr(self, k) for k in ("device", "seed") if k not in s.train.model_fields_set}
            if "device" not in run_wide and not same_device(s.train.device, self.device):
                raise ConfigError(f"{where}: train.device '{s.train.device}' is not the run's device "
                                  f"'{self.device}'; one run loads, trains and evaluates on one device: set "
                                  "'device' at the top level instead")
            s = s.model_copy(update={"target": st, "train_length": length,
                                     "train": s.train.model_copy(update=run_wide)})
            if s.build:
                if s.build.kind not in BUILDERS:
                    raise ConfigError(f"{where}: build kind '{s.build.kind}' is unknown; choose one of "
                                      f"{', '.join(sorted(BUILDERS))}")
                s.build.builder_args(model=self.model, length=length, seed=s.train.seed, where=f"{where}: build.args")
                built.add(s.name)
            stages.append(s)
        check_shared(stages)
        return self.model_copy(update={"target": target, "stages": stages})


def check_shared(stages: list[StageConfig]) -> None:
    """A run's training stages share one Accelerator: one precision, one set of trackers."""
    train = [s for s in stages if s.kind == "train"]
    shared = [shared_settings(s.train) for s in train]
    for key in shared[0] if shared else ():
        if len({str(one[key]) for one in shared}) > 1:
            shown = ", ".join(f"{s.name}: {getattr(s.train, key)}" for s in train)
            raise ConfigError(f"stages: train.{key} differs between training stages ({shown}); a run trains with "
                              f"one {key} — set the same value on every stage")


def same_device(a: str, b: str) -> bool:
    """Whether two device choices (auto, cpu, cuda) name the same device here."""
    try:
        return a == b or resolve_device(a) == resolve_device(b)
    except ValueError:  # cuda asked for where there is none: not the same as what runs
        return False


def check_data(data: DataConfig, where: str, built: set[str]) -> None:
    """Refuse a stage's data settings that cannot work, before anything runs (`built`: the earlier build stages)."""
    unknown = sorted(set(data.mix) - set(ROW_KINDS))
    if unknown or not any(v > 0 for v in data.mix.values()):
        raise ConfigError(f"{where}: data.mix must weight some of: {', '.join(ROW_KINDS)}"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if any(v < 0 for v in data.mix.values()):
        raise ConfigError(f"{where}: data.mix weights must not be negative")
    if data.mix.get("dataset") and not data.dataset:
        raise ConfigError(f"{where}: data.mix uses 'dataset' rows but data.dataset is not set")
    if data.dataset:
        if data.dataset.startswith("@"):
            if data.dataset[1:] not in built:
                raise ConfigError(f"{where}: data.dataset '{data.dataset}' names no earlier build stage")
        elif not Path(data.dataset).is_dir():
            raise ConfigError(f"{where}: data.dataset '{data.dataset}' is not a directory; build it with "
                              "`ctxstretch data … --out DIR`")
    for src in data.text:
        if src not in CORPORA and not Path(src).exists():
            raise ConfigError(f"{where}: data.text source '{src}' does not exist")


def load_yaml(path: Path) -> dict:
    """A YAML mapping, with one-line errors naming the file and line."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_pipeline(data: dict, where: str) -> PipelineConfig:
    return parse(PipelineConfig, data, where)
