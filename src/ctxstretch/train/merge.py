"""Weight merging (LongRecipe, Hu et al., 2024, §4.4): `θ = λ·θ_original + (1 − λ)·θ_extended`, keeping the extended
model's configuration — its rope parameters and window — so the merged model is still a long-context model."""

from __future__ import annotations

import torch

from ..config import ConfigError


@torch.no_grad()
def linear_merge(extended: torch.nn.Module, original: torch.nn.Module, weight: float) -> torch.nn.Module:
    """Replace `extended`'s parameters in place by `weight`·original + (1 − weight)·extended; return `extended`.

    Both models must have the same architecture (same parameter names and shapes); buffers such as rotary
    frequencies are left as the extended model computes them."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"merge weight {weight} must lie in [0, 1] (the share of the original model)")
    theirs = dict(original.named_parameters())
    for name, param in extended.named_parameters():
        other = theirs.get(name)
        if other is None or other.shape != param.shape:
            got = "missing" if other is None else tuple(other.shape)
            raise ConfigError(f"cannot merge: parameter {name} is {tuple(param.shape)} in the extended model but "
                              f"{got} in the original; merge models of the same architecture")
        param.mul_(1.0 - weight).add_(other.to(param.device, param.dtype), alpha=weight)
    return extended
