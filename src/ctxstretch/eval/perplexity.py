"""Loss by position on held-out text: how well a model uses context at each distance into its window."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..train.loss import chunked_token_losses, final_hidden, supports_chunked_head


def default_buckets(length: int, base_window: int) -> list[tuple[int, int]]:
    """[0, L0), then doubling ranges up to `length`: (0,256), (256,512), …, (L/2, L)."""
    edges = [0, min(base_window, length)]
    while edges[-1] < length:
        edges.append(min(length, edges[-1] * 2))
    return list(zip(edges[:-1], edges[1:], strict=False))


def reset_dynamic_rope(model) -> None:
    """Give a dynamic-rope model (`rope_type: dynamic`) back its own frequencies. transformers' dynamic rope keeps the
    largest rescaling any row has asked for and resets it only for a row shorter than the original window, so rows
    of exactly the window after a longer one would be scored with the long row's frequencies; one token resets it.
    Anything else (other ropes, an inference engine's client) is left as it is."""
    rope = getattr(getattr(model, "config", None), "rope_parameters", None) or {}
    if not isinstance(model, torch.nn.Module) or rope.get("rope_type") != "dynamic":
        return
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))


@torch.no_grad()
def token_losses(model, stream: np.ndarray, length: int, rows: int, batch_size: int = 1) -> np.ndarray:
    """Per-token loss (nats) at positions 1..length-1 for `rows` consecutive held-out rows, shape (rows, length-1).

    Peak memory is linear in `length`: the LM head runs over chunks of tokens (`train.loss.chunked_token_losses`)."""
    if len(stream) < length:
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than one row of {length}")
    rows = min(rows, len(stream) // length)
    device = next(model.parameters()).device
    data = torch.tensor(np.asarray(stream[: rows * length], dtype=np.int64).reshape(rows, length))
    chunked = supports_chunked_head(model)
    out = []
    for i in range(0, rows, batch_size):
        ids = data[i : i + batch_size].to(device)
        if chunked:  # the head in chunks of tokens: never (rows, length, V) fp32 logits
            hidden = final_hidden(model, input_ids=ids, attention_mask=torch.ones_like(ids))
            loss = chunked_token_losses(model.get_output_embeddings(), hidden[:, :-1], ids[:, 1:])
        else:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(loss.cpu().numpy())
    return np.concatenate(out)


def far_bucket(result, target: int) -> str | None:
    """The name of `result`'s loss bucket that ends at `target` (see `default_buckets`), if it has one."""
    return next((k for k in result.buckets if k.endswith(f"-{target}")), None)


def loss_by_bucket(losses: np.ndarray, buckets: list[tuple[int, int]]) -> dict[str, float]:
    """Mean loss per position range; the loss at column j predicts token j+1."""
    res = {}
    for lo, hi in buckets:
        cols = losses[:, max(0, lo - 1) : hi - 1]
        if cols.size:
            res[f"{lo}-{hi}"] = float(cols.mean())
    return res


def loss_vs_context(losses: np.ndarray, contexts: list[int]) -> dict[int, float]:
    """Loss of tokens that see about `c` tokens of context: mean loss at positions [c/2, c), per c in `contexts`."""
    return {c: float(losses[:, max(0, c // 2 - 1) : c - 1].mean()) for c in contexts if c - 1 <= losses.shape[1]}


def fit_power_law(contexts: list[int], losses: list[float]) -> dict[str, float]:
    """Fit Llama 2 Long's `loss(c) = (alpha / c) ** beta + gamma` (Xiong et al., 2023, §4.1).

    For each gamma on a grid below the smallest loss, log(loss - gamma) is linear in log(c); keep the best fit.
    Returns alpha, beta, gamma and the root-mean-square error in nats."""
    c = np.asarray(contexts, dtype=float)
    y = np.asarray(losses, dtype=float)
    if len(c) < 3:
        raise ValueError("a power-law fit needs at least three context lengths")
    best = None
    for gamma in np.linspace(0.0, y.min() - 1e-3, 400):
        slope, intercept = np.polyfit(np.log(c), np.log(y - gamma), 1)
        beta = -slope
        if beta <= 0:
            continue
        alpha = float(np.exp(intercept / beta))
        rmse = float(np.sqrt(np.mean(((alpha / c) ** beta + gamma - y) ** 2)))
        if best is None or rmse < best["rmse"]:
            best = {"alpha": alpha, "beta": float(beta), "gamma": float(gamma), "rmse": rmse}
    if best is None:
        raise ValueError("loss does not fall with context length; no power law to fit")
    return best
