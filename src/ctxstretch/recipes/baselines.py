"""The baselines every recipe is compared with, under the same interface and budget:
`full` (ABF + training on full-length rows), `pose` (Zhu et al., 2023) and `randpos` (Ruoss et al., 2023) position
transforms at 0.3·L, `pi` (Chen et al., 2023) and `yarn` (Peng et al., 2023) rope with full-length training, and
`pi-free` / `ntk-free` / `yarn-free`: rope changes (linear, dynamic NTK, YaRN) with no training at all."""

from __future__ import annotations

from pydantic import Field

from ..eval.perplexity import far_bucket
from .base import RecipeParams
from .config import PipelineConfig, RopeConfig, StageConfig

ROPES = {"full": "abf", "pose": "abf", "randpos": "abf", "pi": "pi", "yarn": "yarn", "pi-free": "pi",
         "ntk-free": "ntk", "yarn-free": "yarn"}
POSITIONS = {"pose": "pose", "randpos": "randpos"}


class BaselineParams(RecipeParams):
    length_fraction: float = Field(0.3, gt=0, le=1, description="row length as a share of the target (pose/randpos)")

    def main_length(self, target: int) -> int:
        return int(self.length_fraction * target) if self.recipe in POSITIONS else target


def pipeline(p: BaselineParams, window: int) -> PipelineConfig:
    name = p.recipe
    stages = []
    if not name.endswith("-free"):
        positions = POSITIONS.get(name, "full")
        stages.append(StageConfig(name="train", positions=positions, data=p.data(mix=p.mix), train=p.train(),
                                  length_fraction=p.length_fraction if positions != "full" else 1.0,
                                  lora_rank=p.lora_rank))
    return PipelineConfig(name=name, description=f"baseline: {name}", rope=RopeConfig(method=ROPES[name]),
                          stages=stages, **p.run_settings())


def claims(outs: dict, base, window: int, target: int) -> list[tuple[str, bool, str]]:
    """Llama 2 Long §4.1: ABF beats position interpolation on long-context loss at the same budget."""
    abf, pi, far = outs.get("full"), outs.get("pi"), far_bucket(base, target)
    if not (abf and pi and far):
        return []
    a, b = abf.result.buckets[far], pi.result.buckets[far]
    return [(f"ABF beats PI on loss at positions {far} (same continual-pretraining budget)", a < b,
             f"ABF {a:.3f} vs PI {b:.3f}")]
