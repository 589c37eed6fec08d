import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ctxstretch.rope import METHODS, RopeError, abf_theta, apply_rope, current_rope, ntk_fixed_theta, rope_parameters


def cfg(window=256, theta=10000.0):
    return LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                       max_position_embeddings=window, rope_parameters={"rope_type": "default", "rope_theta": theta})


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_frequencies_and_runs(method):
    c = cfg()
    params = apply_rope(c, method, 2048)
    assert c.max_position_embeddings == (256 if method == "ntk" else 2048)  # dynamic NTK scales beyond the window
    assert "rope_theta" in params and c.rope_parameters == params
    rot = LlamaRotaryEmbedding(c)
    x = torch.zeros(1, 4, 32)
    cos, sin = rot(x, torch.tensor([[0, 1, 1000, 2047]]))
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()


def test_dynamic_ntk_scales_rows_beyond_the_original_window():
    """A row reaching the target sees a larger base than the unscaled model (not switched off below the target)."""
    base, dyn = cfg(), cfg()
    apply_rope(dyn, "ntk", 2048)
    x, pos = torch.zeros(1, 4, 32), torch.arange(2048)[None]
    cos_base, _ = LlamaRotaryEmbedding(base)(x, pos)
    rot = LlamaRotaryEmbedding(dyn)
    cos_dyn, _ = rot(x, pos)
    assert not torch.allclose(cos_base, cos_dyn)
    short_base, _ = LlamaRotaryEmbedding(base)(x, pos[:, :256])
    short_dyn, _ = LlamaRotaryEmbedding(dyn)(x, pos[:, :256])
    torch.testing.assert_close(short_base, short_dyn)  # inside the window nothing changes


def test_abf_stretches_the_slowest_frequency_by_the_target_ratio_and_keeps_the_fastest():
    """The NTK rule's point: at 16× the window the slowest rotation turns 16× slower (its wavelength covers the
    target as the original covered the window) while the fastest, which resolves neighbouring tokens, is kept."""
    c = cfg()
    base = LlamaRotaryEmbedding(cfg()).inv_freq
    p = apply_rope(c, "abf", 4096)
    new = LlamaRotaryEmbedding(c).inv_freq
    assert p["rope_type"] == "default"
    assert torch.allclose(new[0], base[0]) and torch.allclose(new[-1], base[-1] / 16, rtol=1e-5)
    assert rope_parameters(cfg(), "abf", 4096, theta=5e5)["rope_theta"] == 5e5


def test_ntk_fixed_matches_longrecipe_llama3_figure():
    # LongRecipe reports 48.9M for Llama-3 (theta 500k, d 128, 8k -> 80k)
    assert ntk_fixed_theta(500000, 8192, 81920, 128) / 1e6 == pytest.approx(48.9, rel=0.01)


@pytest.mark.parametrize("rule", [abf_theta, ntk_fixed_theta])
def test_base_rules_keep_the_base_at_the_window_and_grow_with_the_target(rule):
    thetas = [rule(10000, 256, n, 32) for n in (256, 512, 1024, 4096)]
    assert thetas[0] == pytest.approx(10000) and all(a < b for a, b in zip(thetas, thetas[1:], strict=False))
    assert ntk_fixed_theta(10000, 256, 4096, 32) >= abf_theta(10000, 256, 4096, 32)  # LongRecipe's is the larger


def test_linear_scales_inverse_frequencies_by_factor():
    c = cfg()
    base = LlamaRotaryEmbedding(cfg()).inv_freq
    apply_rope(c, "pi", 1024)
    scaled = LlamaRotaryEmbedding(c).inv_freq
    assert torch.allclose(scaled, base / 4)


def test_yarn_keeps_high_frequencies_and_stretches_low_ones():
    c = cfg()
    base = LlamaRotaryEmbedding(cfg()).inv_freq
    apply_rope(c, "yarn", 4096)
    y = LlamaRotaryEmbedding(c).inv_freq
    assert torch.allclose(y[0], base[0])  # fastest frequency untouched
    assert torch.allclose(y[-1], base[-1] / 16, rtol=1e-4)  # slowest interpolated by the full factor


def test_errors():
    with pytest.raises(RopeError, match="must exceed"):
        rope_parameters(cfg(), "abf", 256)
    with pytest.raises(RopeError, match="unknown rope method"):
        rope_parameters(cfg(), "xpos", 1024)

    class NoRope:
        model_type = "gpt2"

    with pytest.raises(RopeError, match="no rotary"):
        current_rope(NoRope())
    c = cfg()
    apply_rope(c, "pi", 1024)
    with pytest.raises(RopeError, match="already uses"):
        apply_rope(c, "yarn", 4096)
    assert math.isfinite(abf_theta(1e4, 8, 16, 4))
