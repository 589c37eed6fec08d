"""Inference backends for evaluation: `transformers` (any local HF directory, CPU or GPU; the default) and `vllm`
(vLLM in its own environment, driven across a process boundary: eval/vllm_client.py)."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError

BACKENDS = ("transformers", "vllm")


def check_backend(name: str, vllm_env: Path | None = None) -> str:
    """`name` if evaluation can run on it; otherwise a one-line ConfigError (unknown name, no vLLM environment).
    Checks files only: it answers in milliseconds."""
    if name not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend '{name}'; choose from {', '.join(BACKENDS)}")
    if name == "vllm":
        from .vllm_env import find_python

        find_python(vllm_env)
    return name
