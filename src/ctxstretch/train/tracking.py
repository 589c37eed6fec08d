"""What a training stage reports besides `metrics.jsonl`: the loss by position bucket, and accelerate's trackers.

Loss by position: every scored token falls in the bucket of the position it is predicted from (`position_ids`, so
LongRecipe/PoSE rows that span the target window fill the far buckets). Buckets end at powers of two from 512:
`loss@512` covers positions 0–511, `loss@1K` 512–1,023, …, `loss@32K` 16,384–32,767. A logged step writes the mean
token loss of each bucket its rows reached — the loss@2K…loss@64K curve people watch during an extension.

Trackers (`log_with`): accelerate's TensorBoard, trackio and Weights & Biases integrations, writing under the
stage's `logs/` folder (TensorBoard) or their own local store (trackio's SQLite files; W&B in offline mode unless
`WANDB_MODE` says otherwise — nothing is sent anywhere by default)."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

EDGES = torch.tensor([2**k for k in range(9, 21)])  # 512 … 1M: a bucket's last position + 1


def start_trackers(accelerator: Accelerator, names: list[str], stage: str, hyper: dict) -> None:
    """Open the trackers of `accelerator` (built with `log_with=names`) as one run named after the stage."""
    if not names:
        return
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
    flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hyper.items()}
    accelerator.init_trackers(stage, config=flat)


def bucket_label(edge: int) -> str:
    return f"loss@{edge // 1024}K" if edge >= 1024 and edge % 1024 == 0 else f"loss@{edge}"


class PositionLoss:
    """Sums and counts of token losses per position bucket since the last logged step."""

    def __init__(self) -> None:
        self.stats = torch.zeros(2, len(EDGES) + 1, dtype=torch.float64)

    def add(self, token_loss: torch.Tensor, position_ids: torch.Tensor, scored: torch.Tensor) -> None:
        """token_loss, position_ids, scored (bool): (B, T) of this process's rows."""
        pos, loss = position_ids[scored].cpu(), token_loss[scored].detach().double().cpu()
        idx = torch.bucketize(pos, EDGES, right=True)
        self.stats[0].index_add_(0, idx, loss)
        self.stats[1].index_add_(0, idx, torch.ones_like(loss))

    def record(self, accelerator: Accelerator) -> dict[str, float]:
        """Mean loss per bucket reached since the last call (over all processes: every rank calls it at the same
        steps), then start again."""
        stats = self.stats
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), "sum").cpu()
        self.stats = torch.zeros_like(self.stats)
        labels = [bucket_label(int(e)) for e in EDGES] + [f"loss@>{int(EDGES[-1]) // 1024}K"]
        return {labels[i]: round(float(stats[0, i] / stats[1, i]), 5) for i in range(len(labels)) if stats[1, i] > 0}
