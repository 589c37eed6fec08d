"""Loss by position on held-out text: how well a model uses context at each distance into its window."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def default_buckets(length: int, base_window: int) -> list[tuple[int, int]]:
    """[0, L0), then doubling ranges up to `length`: (0,256), (256,512), …, (L/2, L)."""
    edges = [0, base_window]
    while edges[-1] < length:
        edges.append(min(length, edges[-1] * 2))
    return list(zip(edges[:-1], edges[1:], strict=False))


@torch.no_grad()
def token_losses(model, stream: np.ndarray, length: int, rows: int, batch_size: int = 1) -> np.ndarray:
    """Per-token loss (nats) at positions 1..length-1 for `rows` consecutive held-out rows, shape (rows, length-1)."""
    if len(stream) < length:
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than one row of {length}")
    rows = min(rows, len(stream) // length)
    device = next(model.parameters()).device
    data = torch.tensor(np.asarray(stream[: rows * length], dtype=np.int64).reshape(rows, length))
    out = []
    for i in range(0, rows, batch_size):
        ids = data[i : i + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(loss.cpu().numpy())
    return np.concatenate(out)


def loss_by_bucket(losses: np.ndarray, buckets: list[tuple[int, int]]) -> dict[str, float]:
    """Mean loss per position range; the loss at column j predicts token j+1."""
    res = {}
    for lo, hi in buckets:
        cols = losses[:, max(0, lo - 1) : hi - 1]
        if cols.size:
            res[f"{lo}-{hi}"] = float(cols.mean())
    return res
