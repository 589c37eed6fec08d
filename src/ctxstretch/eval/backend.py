"""Inference backends for evaluation: `transformers` (any local HF directory, CPU or GPU; the default) and `vllm`
(GPU serving engine). Only the seam exists for vllm: choosing it checks the install and says what is missing."""

from __future__ import annotations

import importlib.util

from ..config import ConfigError

BACKENDS = ("transformers", "vllm")
VLLM_MISSING = "--backend vllm needs the vllm package and a GPU: pip install 'ctxstretch[vllm]' (or use transformers)"
VLLM_TODO = "--backend vllm: vllm is installed, but scoring through it is not implemented yet; use transformers"


def check_backend(name: str) -> str:
    """`name` if evaluation can run on it; otherwise a one-line ConfigError (unknown name, vllm missing)."""
    if name not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend '{name}'; choose from {', '.join(BACKENDS)}")
    if name == "vllm":
        # find_spec, not import: importing vllm initialises CUDA, which is slow and fails on CPU-only machines
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(VLLM_MISSING)
        raise ConfigError(VLLM_TODO)
    return name
