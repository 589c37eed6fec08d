"""An external suite beside ours: lm-evaluation-harness's corpus-free RULER tasks, run offline on a saved model.

lm-eval lives in its own virtual environment (its pins need not match ours) and is reached across a process
boundary: `python -m lm_eval --model hf ...` with the hub and datasets offline. The tasks build their prompts with
the model's own tokenizer (`tokenizer=DIR`), one length per call (`--metadata '{"max_seq_lengths": [n]}'`; each
length is 500 generated samples, of which `--limit` keeps the first), and `max_length` leaves room for the prompt and
the answer so nothing is truncated. Note: lm-eval loads that tokenizer with `trust_remote_code=True` itself; a
plain model directory carries no code, so nothing runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
VERSION = "0.4.13"
MIN_LENGTH = 256  # shorter prompts hold no haystack for the RULER templates
GEN_MARGIN = 256  # tokens of max_length beyond the prompt: the longest RULER answer budget (cwe/fwe: 120)


def default_env() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ctxstretch" / f"lmeval-{VERSION}"


def ensure_env(env: Path | None = None) -> Path:
    """The Python of a virtual environment holding lm-eval (built on first use; `CTXSTRETCH_LMEVAL_PYTHON` names an
    existing one instead). A marker written last tells a finished build from a killed one."""
    if os.environ.get("CTXSTRETCH_LMEVAL_PYTHON"):
        return Path(os.environ["CTXSTRETCH_LMEVAL_PYTHON"])
    env = env or default_env()
    python, marker = env / "bin" / "python", env / ".ctxstretch-ready"
    if marker.exists():
        return python
    torch = os.environ.get("CTXSTRETCH_LMEVAL_TORCH", "torch==2.13.0")
    steps = [[sys.executable, "-m", "venv", "--clear", str(env)],
             [str(python), "-m", "pip", "install", "-q", torch],
             [str(python), "-m", "pip", "install", "-q", f"lm-eval[ruler,hf]=={VERSION}"]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise ConfigError(f"building the lm-eval environment in {env} failed at `{' '.join(cmd[-2:])}`: "
                              f"{_last_line(done.stderr)}; set CTXSTRETCH_LMEVAL_PYTHON to a Python with lm-eval")
    marker.write_text(VERSION)
    return python


def check_tasks(tasks: list[str], lengths: list[int]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"'{unknown[0]}' is not a corpus-free lm-eval RULER task; choose from {', '.join(TASKS)}")
    short = [n for n in lengths if n < MIN_LENGTH]
    if short:
        raise ConfigError(f"lm-eval RULER lengths must be ≥ {MIN_LENGTH} tokens, got {short[0]}")


def command(python: Path, model_dir: Path, task: str, length: int, limit: int, out: Path, dtype: str) -> list[str]:
    """The lm_eval command line for one task at one length."""
    args = f"pretrained={model_dir},tokenizer={model_dir},max_length={length + GEN_MARGIN},dtype={dtype}"
    return [str(python), "-m", "lm_eval", "--model", "hf", "--model_args", args, "--tasks", task,
            "--metadata", json.dumps({"max_seq_lengths": [length]}), "--limit", str(limit), "--batch_size", "1",
            "--output_path", str(out)]


def parse_results(path: Path, task: str, length: int) -> float:
    """The score of `task` at `length` from an lm-eval results JSON (metrics are named by length: '512,none')."""
    results = json.loads(path.read_text())["results"].get(task, {})
    value = results.get(f"{length},none")
    if not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{path}: lm-eval reported no score for {task} at {length} tokens")
    return float(value)


def run_ruler(model_dir: Path, tasks: list[str], lengths: list[int], limit: int, out_dir: Path,
              python: Path | None = None, dtype: str = "float32") -> dict[str, dict[int, float]]:
    """Score of every task at every length (`limit` samples each); raw lm-eval output kept under `out_dir`."""
    check_tasks(tasks, lengths)
    python = python or ensure_env()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    scores: dict[str, dict[int, float]] = {t: {} for t in tasks}
    for task in tasks:
        for n in lengths:
            out = out_dir / f"{task}-{n}"
            done = subprocess.run(command(python, model_dir, task, n, limit, out, dtype), capture_output=True,
                                  text=True, env=env)
            found = sorted(out.rglob("results_*.json"))
            if done.returncode or not found:
                raise ConfigError(f"lm-eval {task} at {n} tokens failed: {_last_line(done.stderr)}")
            scores[task][n] = parse_results(found[-1], task, n)
    return scores


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("WARNING: Location")]
    return lines[-1][:300] if lines else "no output"
