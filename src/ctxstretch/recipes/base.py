"""What every recipe takes (model, target, budget) and the pieces recipes share."""

from __future__ import annotations

from pydantic import Field

from ..config import TrainConfig
from ..defaults import derive
from ..rope import default_target
from ..train.parallel import resolve_device
from .config import DataConfig, RunSettings

# The base model's kind of data. For the embedded model that is its own pretraining mix (the corpus plus the
# retrieval and copy rows `ctxstretch tiny build` trained it on); retrieval probes use training seeds, disjoint
# from the evaluation's.
BASE_MIX = {"text": 0.4, "passkey": 0.25, "needle": 0.25, "text_copy": 0.1}
# A pretrained model's kind of data: its kind of text, short documents interleaved into long rows (CIP), a little
# span repetition; never an evaluation probe's format.
PRETRAINED_MIX = {"text": 0.7, "cip": 0.2, "text_copy": 0.1}


class RecipeParams(RunSettings):
    """The knobs shared by every recipe; a preset YAML sets these (plus the recipe's own) under `recipe: NAME`."""

    recipe: str = Field(..., description="recipe name (see `ctxstretch train --list`)")
    steps: int | None = Field(None, ge=0, description="optimizer steps of the main (long) stage; other stages scale "
                              "with it (None: derived from the model, see ctxstretch.defaults)")
    batch_size: int | None = Field(None, ge=1, description="rows per optimizer step (None: derived)")
    lr: float | None = Field(None, gt=0, description="peak learning rate of the main stage (None: derived)")
    warmup_steps: int | None = Field(None, ge=0, description="warm-up steps (None: derived)")
    gradient_checkpointing: bool | None = Field(None, description="activation checkpointing (None: derived)")
    precision: str = Field("auto", pattern="^(auto|bf16|fp32)$", description="bf16 autocast or fp32 (auto: derived)")
    checkpoint_every: int = Field(25, ge=1)
    mix: dict[str, float] | None = Field(None, description="row kinds of the main stage (None: the base model's kind "
                                         "of data — the embedded model's own mix, or text + CIP for a pretrained one)")
    text: list[str] = Field(default_factory=list, description="training text sources (empty: 'embedded' for the "
                            "embedded model, 'stdlib' package-level documents for a pretrained one)")
    lora_rank: int = Field(0, ge=0, description="LoRA rank on every training stage (0: full fine-tuning)")

    def main_length(self, target: int) -> int:
        """Tokens per row of the main stage (recipes training on shorter rows override this)."""
        return target

    def resolved(self, window: int) -> tuple[RecipeParams, str]:
        """Every derived setting filled in (`ctxstretch.defaults`); returns (params, the rule used)."""
        embedded = self.model == "embedded"
        target = self.target or default_target(window)
        given = self.model_dump()
        fill, rule = derive(self.model, self.main_length(target), resolve_device(self.device), given, embedded,
                            window, trust_remote_code=self.trust_remote_code)
        fill |= {"mix": self.mix or dict(BASE_MIX if embedded else PRETRAINED_MIX),
                 "text": self.text or ["embedded" if embedded else "stdlib"]}
        return self.model_copy(update=fill), rule

    def data(self, **kw) -> DataConfig:
        """A stage's data from this recipe's text sources."""
        return DataConfig(text=self.text, **kw)

    def train(self, steps: int | None = None, lr: float | None = None, **kw) -> TrainConfig:
        """The main stage's optimiser settings, optionally with fewer steps or another LR (after `resolved`)."""
        steps = self.steps if steps is None else steps
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr if lr is None else lr,
                           warmup_steps=min(self.warmup_steps, steps // 5), checkpoint_every=self.checkpoint_every,
                           gradient_checkpointing=self.gradient_checkpointing, precision=self.precision,
                           seed=self.seed, device=self.device, **kw)


def share(steps: int, fraction: float) -> int:
    """`fraction` of `steps`: 0 when either is 0, else at least one step."""
    return max(1, round(steps * fraction)) if steps > 0 and fraction > 0 else 0


def split(steps: int, parts: int) -> list[int]:
    """`steps` divided into `parts` non-negative shares that sum to `steps` (the last ones get the remainder)."""
    return [steps * (i + 1) // parts - steps * i // parts for i in range(parts)]
