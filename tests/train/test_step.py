"""The one-GPU extras of a training stage: regional compilation compiles each decoder layer, not the whole model."""

from __future__ import annotations

import pytest


def test_torch_compile_compiles_each_decoder_layer_in_place(tokenizer):
    """Every decoder layer gets its own compiled call (one graph, reused), the model itself stays eager (so
    transformers builds no dense causal mask for it) and parameter names are unchanged."""
    from ctxstretch.config import ConfigError, TrainConfig
    from ctxstretch.train.step import compile_layers, prepare_extras
    from tests.conftest import micro_llama

    model = micro_llama(tokenizer)
    names = [n for n, _ in model.named_parameters()]
    prepare_extras(model, TrainConfig(torch_compile=True))
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model._compiled_call_impl is None and model.lm_head._compiled_call_impl is None
    assert [n for n, _ in model.named_parameters()] == names
    bare = micro_llama(tokenizer)
    bare._no_split_modules = None
    with pytest.raises(ConfigError, match="names no decoder layer class"):
        compile_layers(bare)
