"""LongSkywork (Zhao et al., 2024). Only the outline of the paper is public; every number here is our choice.

1. Continual pretraining with NTK-aware RoPE scaling (the ABF base by the NTK rule) on CIP rows: chunks of a few
   documents interleaved, each document's chunks in order, so continuing one document means looking far back.
2. Standard SFT: short instruction rows inside the original window (for the embedded model: its retrieval and
   copy tasks, loss on the answers).
3. Long-context SFT (the paper's key finding: ~200 iterations after standard SFT suffice): SynL rows — synthetic
   lengthy tables with look-up, extremum, count and two-hop questions — at the target length.
"""

from __future__ import annotations

from pydantic import Field

from .base import RecipeParams, share
from .config import PipelineConfig, RopeConfig, StageConfig

SHORT_SFT_MIX = {"passkey": 0.4, "needle": 0.4, "text_copy": 0.2}


class LongSkyworkParams(RecipeParams):
    cip_share: float = Field(0.5, ge=0, le=1, description="share of CIP rows in the pretraining mix (rest: mix)")
    cip_k: int = Field(4, ge=1, description="documents interleaved per CIP row")
    sft_fraction: float = Field(0.2, ge=0, le=1, description="standard SFT steps as a share of the main stage's")
    long_sft_fraction: float = Field(0.2, ge=0, le=1, description="long SFT steps as a share of the main stage's "
                                     "(the paper's ~200 iterations, scaled)")
    sft_lr_ratio: float = Field(0.2, gt=0, description="SFT LRs as a share of the main LR")


def pipeline(p: LongSkyworkParams, window: int) -> PipelineConfig:
    total = sum(p.mix.values())
    mix = {"cip": p.cip_share, **{k: (1 - p.cip_share) * v / total for k, v in p.mix.items()}}
    sft_lr = p.lr * p.sft_lr_ratio
    stages = [
        StageConfig(name="cpt", positions="full", data=p.data(mix=mix, cip_k=p.cip_k), train=p.train(),
                    lora_rank=p.lora_rank),
        StageConfig(name="sft", positions="full", train_length=window, data=p.data(mix=SHORT_SFT_MIX),
                    train=p.train(share(p.steps, p.sft_fraction), sft_lr, min_lr_ratio=0.0), lora_rank=p.lora_rank,
                    evaluate=True),
        StageConfig(name="long-sft", positions="full", data=p.data(mix={"synl": 1.0}),
                    train=p.train(share(p.steps, p.long_sft_fraction), sft_lr, min_lr_ratio=0.0),
                    lora_rank=p.lora_rank),
    ]
    return PipelineConfig(name="longskywork", description=__doc__.splitlines()[0], rope=RopeConfig(method="abf"),
                          stages=[s for s in stages if s.train.steps > 0], **p.run_settings())


def claims(outs: dict, base, window: int, target: int) -> list[tuple[str, bool, str]]:
    """§4: the SynL long-SFT stage improves long-context retrieval over the SFT model it starts from."""
    sky = outs.get("longskywork")
    if not (sky and "sft" in sky.stage_results):
        return []
    before, after = sky.at("heldout", target, sky.stage_results["sft"]), sky.at("heldout", target)
    if before is None or after is None:
        return []
    return [(f"the SynL long-SFT stage raises held-out retrieval @ {target:,} of the SFT model", after > before,
             f"{before:.0%} → {after:.0%}")]
