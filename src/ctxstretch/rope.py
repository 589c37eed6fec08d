"""RoPE methods → transformers' rope configuration (`config.rope_parameters`). Nothing here patches attention.

Methods: `abf` (a new `rope_theta`, Xiong et al. 2023), `ntk-fixed` (LongRecipe, Hu et al. 2024: the dynamic-NTK
base evaluated once at the target), `pi` (linear, Chen et al. 2023), `ntk` (dynamic), `yarn` (Peng et al. 2023),
`llama3`.
"""

from __future__ import annotations

from typing import Any

from .config import UserError

METHODS = ("abf", "ntk-fixed", "pi", "ntk", "yarn", "llama3")


class RopeError(UserError):
    """The model cannot take the requested rope method."""


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def current_rope(config) -> dict[str, Any]:
    """The model's complete rope dict (with `rope_theta`); raises RopeError for models without RoPE."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        kind = getattr(config, "model_type", "unknown")
        raise RopeError(f"model type '{kind}' has no rotary position embedding (RoPE); ctxstretch extends RoPE "
                        "models only (Llama, Qwen, Mistral, …)")
    return dict(params)


def original_window(config) -> int:
    """The window the model was trained on (before any earlier scaling)."""
    params = current_rope(config)
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


DEFAULT_STRETCH = 16  # a target of 0 means this many times the model's window


def default_target(window: int) -> int:
    """The target window when none is given: DEFAULT_STRETCH × the model's window."""
    return DEFAULT_STRETCH * window


def abf_theta(theta: float, base_window: int, target: int, dim: int) -> float:
    """ABF default base: the NTK rule `theta · (L/L0)^(d/(d-2))` (our choice of default)."""
    return theta * (target / base_window) ** (dim / (dim - 2))


def ntk_fixed_theta(theta: float, base_window: int, target: int, dim: int) -> float:
    """LongRecipe's base: dynamic NTK at the target, `theta · (f·L/L0 − (f−1))^(d/(d−2))`, f = L/L0."""
    f = target / base_window
    return theta * (f * target / base_window - (f - 1)) ** (dim / (dim - 2))


def rope_parameters(config, method: str, target: int, theta: float | None = None) -> dict[str, Any]:
    """The complete rope dict for extending `config` to `target` tokens with `method`."""
    if method not in METHODS:
        raise RopeError(f"unknown rope method '{method}'; choose one of {', '.join(METHODS)}")
    old = current_rope(config)
    if old.get("rope_type", "default") not in ("default", None):
        raise RopeError(f"the model already uses rope_type '{old['rope_type']}'; extend from its unscaled base")
    base_theta, l0, dim = float(old["rope_theta"]), original_window(config), head_dim(config)
    if target <= l0:
        raise RopeError(f"target {target} must exceed the model's window {l0}")
    factor = target / l0
    if method == "abf":
        return {"rope_type": "default", "rope_theta": float(theta or abf_theta(base_theta, l0, target, dim))}
    if method == "ntk-fixed":
        return {"rope_type": "default", "rope_theta": float(theta or ntk_fixed_theta(base_theta, l0, target, dim))}
    scaled: dict[str, Any] = {"rope_theta": float(theta or base_theta), "factor": factor}
    if method == "pi":
        return {"rope_type": "linear", **scaled}
    if method == "ntk":
        return {"rope_type": "dynamic", **scaled}
    if method == "yarn":
        return {"rope_type": "yarn", **scaled, "original_max_position_embeddings": l0}
    return {"rope_type": "llama3", **scaled, "original_max_position_embeddings": l0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def apply_rope(config, method: str, target: int, theta: float | None = None) -> dict[str, Any]:
    """Write the method's rope dict and the new window into `config` together; return the dict.

    Dynamic NTK is the exception: transformers scales the base only for sequences longer than
    `max_position_embeddings`, so that stays the original window (raising it to the target would switch the
    scaling off everywhere below the target)."""
    params = rope_parameters(config, method, target, theta)
    config.rope_parameters = params
    if params["rope_type"] != "dynamic":
        config.max_position_embeddings = int(target)
    return params
