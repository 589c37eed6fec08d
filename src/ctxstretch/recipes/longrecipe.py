"""LongRecipe (Hu et al., 2024): reach a target window L while training on rows of ~0.3·L tokens.

1. RoPE: fix the base before training to the dynamic-NTK base at the target (`ntk-fixed`, §4.1).
2. Impactful tokens (§4.1): keep the sentences that hold impactful tokens (model-scored when a scorer is given,
   otherwise the released code's heuristic: every sentence with a digit, about half of the others).
3. Position-index transformation (§4.2, Alg. 1): rows of 0.3·L kept tokens whose sentence-level position skips
   cover [0, L), computed on the kept text so the last position lands near L.
4. Replay (§4.3): a short sequential stage on general data at contiguous positions, LR a tenth, decayed to zero.
5. Merge (§4.4): θ = λ·θ_original + (1 − λ)·θ_replayed, λ = 0.5, keeping the extended rope configuration.
"""

from __future__ import annotations

from pydantic import Field

from .base import RecipeParams, share
from .config import MergeConfig, PipelineConfig, RopeConfig, StageConfig


class LongRecipeParams(RecipeParams):
    length_fraction: float = Field(0.3, gt=0, le=1, description="row length as a share of the target (paper: 0.3)")
    impactful: bool = Field(True, description="keep only sentences with impactful tokens (§4.1)")
    scorer: str | None = Field(None, description="model dir scoring impactful tokens (none: digit heuristic)")
    replay_fraction: float = Field(0.1, ge=0, le=1, description="replay steps as a share of the main stage's")
    replay_lr_ratio: float = Field(0.1, gt=0, description="replay LR as a share of the main LR (paper 5e-6/5e-5)")
    merge_weight: float = Field(0.5, ge=0, le=1, description="λ, the original model's share in the merge")

    def main_length(self, target: int) -> int:
        return int(self.length_fraction * target)


def pipeline(p: LongRecipeParams, window: int) -> PipelineConfig:
    extend = StageConfig(
        name="extend", positions="longrecipe", length_fraction=p.length_fraction, train=p.train(),
        data=p.data(mix=p.mix, select="impactful" if p.impactful else "all", scorer=p.scorer),
        lora_rank=p.lora_rank, evaluate=True)
    replay = StageConfig(
        name="replay", positions="full", train_length=window,
        data=p.data(mix={"text": 1.0}),
        train=p.train(share(p.steps, p.replay_fraction), p.lr * p.replay_lr_ratio, min_lr_ratio=0.0),
        lora_rank=p.lora_rank)
    merge = StageConfig(name="merge", merge=MergeConfig(weight=p.merge_weight))
    stages = [extend, replay, merge] if replay.train.steps > 0 else [extend, merge]
    return PipelineConfig(name="longrecipe", description=__doc__.splitlines()[0], rope=RopeConfig(method="ntk-fixed"),
                          stages=stages, **p.run_settings())


def claims(outs: dict, base, window: int, target: int) -> list[tuple[str, bool, str]]:
    """§5: LongRecipe reaches ≥ 95% of full-length training's long-context score in ≤ 35% of its cost (measured
    here on the held-out families; cost = estimated training FLOPs, which a shared machine's wall time would blur —
    wall time shown beside), for the merged model and before replay/merge."""
    lr, full = outs.get("longrecipe"), outs.get("full")
    if not (lr and full):
        return []
    checks = []
    f = full.at("heldout", target) or 0.0
    for label, res in (("merged", None), ("before replay/merge", lr.stage_results.get("extend"))):
        mine = lr.at("heldout", target, res) or 0.0
        ratio = mine / f if f else float("inf") if mine else 1.0
        cost = lr.flops / full.flops if full.flops else 0.0
        time_ratio = lr.wall_s / full.wall_s if full.wall_s else 0.0
        checks.append((f"LongRecipe ({label}) reaches ≥ 95% of full-length held-out retrieval @ {target:,} "
                       "in ≤ 35% of its training FLOPs", ratio >= 0.95 and cost <= 0.35,
                       f"{mine:.0%} vs {f:.0%} ({ratio:.0%}); FLOPs {cost:.0%} (wall time {time_ratio:.0%})"))
    return checks
