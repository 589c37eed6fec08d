"""Llama 2 Long (Xiong et al., 2023, "Effective Long-Context Scaling of Foundation Models").

1. RoPE ABF (§4.1): raise the base frequency (the NTK rule θ·(L/L0)^(d/(d−2)) unless a base is given).
2. Continual pretraining (§4.2) at the target length on the base model's kind of data, long documents upsampled,
   optionally after a sequence-length curriculum (§4.4: stages of growing length, same total budget).
3. Self-instruct long QA (§3.3): the original short model writes question/answer pairs about a random chunk of a
   long document; each example is the whole document + question → answer, with loss on the answer plus LM loss on
   the long input (the paper's better option).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from ..rope import default_target
from .base import RecipeParams, share, split
from .config import BuildConfig, PipelineConfig, RopeConfig, StageConfig


class Llama2LongParams(RecipeParams):
    rope_theta: float | None = Field(None, gt=0, description="ABF base (none: the NTK rule; paper: 500,000)")
    long_weight: float = Field(4.0, gt=0, description="how much more often long documents are drawn")
    curriculum: list[float] = Field(default_factory=list,
                                    description="shares of the target for earlier, shorter stages, e.g. [0.25, 0.5]")
    sft_fraction: float = Field(0.2, ge=0, le=1, description="self-instruct SFT steps as a share of the main stage's")
    sft_lr_ratio: float = Field(0.2, gt=0, description="SFT LR as a share of the main LR")
    qa_count: int = Field(32, ge=1, description="self-instruct examples to generate")
    input_loss: bool = Field(True, description="LM loss on the long input as well as on the answer")

    @field_validator("curriculum")
    @classmethod
    def _shares_below_the_target(cls, shares: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in shares):  # the target's own stage comes last anyway
            raise ValueError(f"curriculum {shares}: give shares of the target in (0, 1), e.g. [0.25, 0.5]")
        return shares


def pipeline(p: Llama2LongParams, window: int) -> PipelineConfig:
    target = p.target or default_target(window)
    data = p.data(mix=p.mix, long_threshold=target // 2, long_weight=p.long_weight)
    # shares below the model's window train at the window (once)
    lengths = list(dict.fromkeys([max(window, int(f * target)) for f in p.curriculum] + [target]))
    steps = split(p.steps, len(lengths))  # the curriculum shares one budget; a stage left without steps is dropped
    stages = [StageConfig(name=f"cpt-{n}" if n < target else "cpt", target=n, positions="full", data=data,
                          train=p.train(s), lora_rank=p.lora_rank, evaluate=n == target)
              for n, s in zip(lengths, steps, strict=True) if s > 0 or n == target]
    sft_steps = share(p.steps, p.sft_fraction)
    if sft_steps > 0:  # no SFT: no self-instruct data either
        stages.append(StageConfig(name="qa-data", build=BuildConfig(kind="selfinstruct", args={
            "generator": p.model, "count": p.qa_count, "input_loss": p.input_loss})))
        stages.append(StageConfig(
            name="sft", positions="full", data=p.data(mix={"dataset": 1.0}, dataset="@qa-data"),
            train=p.train(sft_steps, p.lr * p.sft_lr_ratio, min_lr_ratio=0.0),
            lora_rank=p.lora_rank))
    return PipelineConfig(name="llama2-long", description=__doc__.splitlines()[0],
                          rope=RopeConfig(method="abf", theta=p.rope_theta), stages=stages, **p.run_settings())
