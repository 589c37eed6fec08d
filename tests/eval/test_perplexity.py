import numpy as np
import pytest

from ctxstretch.eval.perplexity import default_buckets, fit_power_law, loss_by_bucket, loss_vs_context


def test_power_law_fit_recovers_known_parameters():
    c = [256, 512, 1024, 2048, 4096, 8192, 16384]
    y = [(25.4 / x) ** 0.45 + 1.56 for x in c]  # Llama 2 Long 7B's published fit
    fit = fit_power_law(c, y)
    assert fit["rmse"] < 2e-3
    assert fit["gamma"] == pytest.approx(1.56, abs=0.02)
    assert fit["beta"] == pytest.approx(0.45, abs=0.05)


def test_fit_refuses_flat_or_short_input():
    with pytest.raises(ValueError):
        fit_power_law([1, 2], [3.0, 2.0])
    with pytest.raises(ValueError):
        fit_power_law([1, 2, 4], [1.0, 2.0, 3.0])


def test_buckets_and_context_losses():
    assert default_buckets(4096, 256) == [(0, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096)]
    losses = np.tile(np.arange(1, 4096, dtype=float), (2, 1))  # loss at column j = j + 1
    b = loss_by_bucket(losses, [(0, 256), (2048, 4096)])
    assert b["0-256"] == pytest.approx(np.arange(1, 256).mean())
    assert loss_vs_context(losses, [4096])[4096] == pytest.approx(np.arange(2048, 4096).mean())


def test_a_dynamic_rope_model_scores_its_window_with_its_own_frequencies(tokenizer):
    """transformers' dynamic rope keeps a long row's rescaling for a following row of exactly the window;
    `reset_dynamic_rope` gives the model its own frequencies back (what a fresh model scores)."""
    import torch
    from transformers import LlamaForCausalLM

    from ctxstretch.eval.perplexity import reset_dynamic_rope, token_losses
    from ctxstretch.rope import apply_rope
    from tests.conftest import micro_llama

    model = micro_llama(tokenizer, window=32)
    apply_rope(model.config, "ntk", 128)
    assert model.config.rope_parameters["rope_type"] == "dynamic"
    model = LlamaForCausalLM(model.config).eval()  # the rotary embedding built from the dynamic configuration
    stream = np.random.default_rng(0).integers(0, len(tokenizer), size=4096)
    with torch.no_grad():
        fresh = token_losses(model, stream, 32, 2)
        model(input_ids=torch.tensor(stream[None, :128]))  # a long row rescales the frequencies
        stale = token_losses(model, stream, 32, 2)
        reset_dynamic_rope(model)
        again = token_losses(model, stream, 32, 2)
    assert not np.allclose(stale, fresh) and np.allclose(again, fresh)
