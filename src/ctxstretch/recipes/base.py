"""What every recipe takes (model, target, budget) and the pieces recipes share."""

from __future__ import annotations

from pydantic import Field

from ..config import Strict, TrainConfig
from ..eval.suite import EvalConfig

# The base model's kind of data. For the embedded model that is its own pretraining mix (the corpus plus the
# retrieval and copy rows `ctxstretch tiny build` trained it on); retrieval probes use training seeds, disjoint
# from the evaluation's.
BASE_MIX = {"text": 0.4, "passkey": 0.25, "needle": 0.25, "text_copy": 0.1}


class RecipeParams(Strict):
    """The knobs shared by every recipe; a preset YAML sets these (plus the recipe's own) under `recipe: NAME`."""

    recipe: str = Field(..., description="recipe name (see `ctxstretch train --list`)")
    model: str = Field("embedded", description="local HF model directory, or 'embedded'")
    target: int = Field(0, ge=0, description="target window in tokens; 0: 16x the model's window")
    steps: int = Field(200, ge=0, description="optimizer steps of the main (long) stage; other stages scale with it")
    batch_size: int = Field(4, ge=1, description="rows per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the main stage")
    warmup_steps: int = Field(20, ge=0)
    checkpoint_every: int = Field(25, ge=1)
    mix: dict[str, float] = Field(default_factory=lambda: dict(BASE_MIX),
                                  description="row kinds of the main stage (the base model's kind of data)")
    lora_rank: int = Field(0, ge=0, description="LoRA rank on every training stage (0: full fine-tuning)")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = 0
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    trust_remote_code: bool = False
    allow_bin: bool = False

    def train(self, steps: int | None = None, lr: float | None = None, **kw) -> TrainConfig:
        """The main stage's optimiser settings, optionally with fewer steps or another LR."""
        steps = self.steps if steps is None else steps
        return TrainConfig(steps=steps, batch_size=self.batch_size, lr=self.lr if lr is None else lr,
                           warmup_steps=min(self.warmup_steps, steps // 5), checkpoint_every=self.checkpoint_every,
                           seed=self.seed, device=self.device, **kw)

    def common(self) -> dict:
        """The pipeline fields every recipe passes through unchanged."""
        return dict(model=self.model, target=self.target, eval=self.eval, seed=self.seed, device=self.device,
                    trust_remote_code=self.trust_remote_code, allow_bin=self.allow_bin)


def share(steps: int, fraction: float) -> int:
    """`fraction` of `steps`: 0 when either is 0, else at least one step."""
    return max(1, round(steps * fraction)) if steps > 0 and fraction > 0 else 0


def split(steps: int, parts: int) -> list[int]:
    """`steps` divided into `parts` non-negative shares that sum to `steps` (the last ones get the remainder)."""
    return [steps * (i + 1) // parts - steps * i // parts for i in range(parts)]
