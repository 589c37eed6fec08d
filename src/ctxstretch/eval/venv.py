"""Virtual environments of their own for tools whose pins conflict with ours (lm-evaluation-harness, vLLM), and
the offline, network-less way their subprocesses run.

An environment is built once under the user cache dir from a fixed list of steps: `python -m venv`, then one
`pip install` per requirement (CPU torch first, so nothing pulls a CUDA one), then any extra pip commands. A
marker written last names those steps, so a killed build is rebuilt from scratch and a finished one is reused."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError

MARKER = ".ctxstretch-ready"
BLACKHOLE = "http://127.0.0.1:9"  # the discard port: any HTTP(S) attempt fails at once
INDEX_DOWN = ("No matching distribution found", "Could not find a version that satisfies", "Network is unreachable",
              "Failed to establish a new connection", "Temporary failure in name resolution", "Max retries exceeded")


class IndexUnreachable(ConfigError):
    """An environment could not be built because pip could not reach the package index."""


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/ctxstretch` (default ~/.cache/ctxstretch)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ctxstretch"


def last_line(text: str) -> str:
    """The last meaningful line of tool output: the last error-looking line, else the last non-noise line."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines()]
    noise = ("it/s]", "%|", "is ignored: it is neither")  # progress bars, pip's find-links chatter
    lines = [ln for ln in lines if ln and not any(x in ln for x in noise)]
    errors = [ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def steps_of(requirements: tuple[str, ...], extra: tuple[tuple[str, ...], ...] = ()) -> list[list[str]]:
    """The pip arguments of a build after `python -m venv`: one install per requirement, then `extra`."""
    return [["install", "-q", req] for req in requirements] + [list(e) for e in extra]


def is_ready(env_dir: Path, steps: list[list[str]]) -> bool:
    """Whether `env_dir` holds a finished build of exactly `steps`."""
    marker = env_dir / MARKER
    return (env_dir / "bin" / "python").exists() and marker.exists() and marker.read_text() == _marker_text(steps)


def _marker_text(steps: list[list[str]]) -> str:
    # an install-only build keeps the plain requirement list (the format of environments built before extras)
    if all(s[:2] == ["install", "-q"] and len(s) == 3 for s in steps):
        return "\n".join(s[2] for s in steps)
    return "\n".join(" ".join(s) for s in steps)


def build_env(env_dir: Path, steps: list[list[str]], what: str, fallback: str) -> Path:
    """The python of the environment at `env_dir`, (re)built with `steps` (pip arguments) unless already finished.

    Builds run under a file lock beside the folder (another process may be building it right now). `what` names
    the environment in messages ("the lm-eval environment"); `fallback` ends each failure's line with what else
    the user can do. Failures raise `IndexUnreachable` (pip could not reach the index) or `ConfigError`."""
    env_dir = Path(env_dir)
    python = env_dir / "bin" / "python"
    if is_ready(env_dir, steps):
        return python
    try:
        env_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(env_dir.parent / f"{env_dir.name}.lock", "w")  # held until the build is done
    except OSError as e:
        raise ConfigError(f"{env_dir}: cannot create {what} ({e.strerror}); set XDG_CACHE_HOME to a writable "
                          f"folder or {fallback}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_ready(env_dir, steps):
            return python
        from rich.console import Console

        shutil.rmtree(env_dir, ignore_errors=True)  # a killed build left no marker: start over
        cmds = [[sys.executable, "-m", "venv", str(env_dir)]] + [[str(python), "-m", "pip", *s] for s in steps]
        with Console(stderr=True).status(f"building {what} in {env_dir} (once, a minute or more)"):
            for cmd in cmds:
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    out = done.stdout + done.stderr
                    cls = IndexUnreachable if any(s in out for s in INDEX_DOWN) else ConfigError
                    raise cls(f"building {what} failed at `{' '.join(cmd[2:])}`: {last_line(out)}; check that pip "
                              f"can reach the package index, or {fallback}")
        (env_dir / MARKER).write_text(_marker_text(steps))
    return python


def no_network_prefix(loopback: bool = False) -> list[str]:
    """A command prefix that runs its command with no network at all (`unshare -n`, or `-rn` for a non-root user),
    or [] where that does not work here. `loopback`: bring 127.0.0.1 up inside (for tools whose processes talk
    to each other over it)."""
    inner = ["sh", "-c", 'ip link set lo up && exec "$@"', "sh"] if loopback else []
    if loopback and not shutil.which("ip"):
        return []
    for cmd in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, *inner, "true"], capture_output=True).returncode == 0:
            return [*cmd, *inner]
    return []


def offline_env(**extra: str) -> dict[str, str]:
    """This process' environment for a tool in its own venv: our Python paths removed, the hub, datasets and
    transformers offline, HTTP(S) sent to a closed local port, and `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "HTTP_PROXY": BLACKHOLE, "HTTPS_PROXY": BLACKHOLE, "http_proxy": BLACKHOLE, "https_proxy": BLACKHOLE,
            "NO_PROXY": "", "no_proxy": ""}
    return env | extra
