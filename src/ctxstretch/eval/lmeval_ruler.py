"""lm-evaluation-harness 0.4.13's corpus-free RULER tasks, run offline on a local model, beside our own probes.

lm-eval lives in a virtual environment of its own (its pins may conflict with ours) and is run as a subprocess:
`python -m lm_eval --model hf ...` with the hub, datasets and transformers offline, NLTK's download suppressed, and
(where `unshare -n` works) no network namespace at all. The tasks build their prompts with the model's own
tokenizer (`tokenizer=` in the model args, which lm-eval hands to the task generators), sized so that prompt plus
generation fit each requested length; `max_length` is set above the longest length so that nothing is truncated.

Facts of 0.4.13 this module relies on (read in lm_eval/tasks/ruler): a sample of length L reports metric "L,none";
lengths not asked for read -1; `--limit` takes the first N documents of the concatenation over lengths, so with a
limit each length runs as its own invocation; below a task's floor the niah generators raise, while ruler_vt loops
forever after printing "Num noises: 0" (watched for here); essay/QA tasks download corpora and are not offered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ..config import ConfigError
from .venv import IndexUnreachable as IndexUnreachable  # raised by ensure_env
from .venv import build_env, cache_root, last_line, no_network_prefix, offline_env, steps_of

TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
# the shortest length each task can build with the embedded 4,096-token vocabulary (SmolLM2's needs no more);
# measured with lm-eval 0.4.13: niah_multikey_3 fails at 256, ruler_vt hangs at 960 and works at 1,024
MIN_LENGTH = {"niah_single_1": 256, "niah_multikey_2": 256, "niah_multikey_3": 512, "ruler_vt": 1024,
              "ruler_cwe": 256, "ruler_fwe": 256}
LMEVAL = "lm-eval[hf,ruler]==0.4.13"
REQUIREMENTS = ("torch==2.13.0", LMEVAL)  # CPU torch first, so lm-eval does not pull a CUDA one
PYTHON_VAR = "CTXSTRETCH_LMEVAL_PYTHON"
DEFAULT_LIMIT = 4  # samples per task and length when none is given: a spot check beside our own probes
MARGIN = 256  # max_length above the longest length: the niah gen_prefix (~30 tokens) is not counted in the length
_FETCH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "offline mode", "ConnectionError", "Couldn't reach",
          "Network is unreachable", "urlopen error", "LocalEntryNotFoundError")


def default_env_dir() -> Path:
    """`$XDG_CACHE_HOME/ctxstretch/lmeval-venv` (default ~/.cache/…)."""
    return cache_root() / "lmeval-venv"


def ensure_env(env_dir: Path | None = None) -> Path:
    """The python executable of a virtual environment holding `LMEVAL` on CPU torch 2.13.

    `$CTXSTRETCH_LMEVAL_PYTHON` (when `env_dir` is not given) names an existing interpreter to use instead. Else the
    environment at `env_dir` (default `default_env_dir()`) is reused when its marker (written last) names the same
    requirements, and otherwise (re)built from scratch under a file lock: about a minute, once."""
    if env_dir is None and os.environ.get(PYTHON_VAR):
        python = Path(os.environ[PYTHON_VAR])
        if not (python.is_file() and os.access(python, os.X_OK)):
            raise ConfigError(f"${PYTHON_VAR}={python}: no such executable; point it at a python with "
                              f"{LMEVAL} installed, or unset it to build one")
        return python
    return build_env(Path(env_dir or default_env_dir()), steps_of(REQUIREMENTS), "the lm-eval environment",
                     f"set ${PYTHON_VAR} to an interpreter that has {LMEVAL}")


def check_tasks(tasks: list[str], lengths: list[int]) -> None:
    """Refuse unknown tasks (naming the valid ones), non-positive lengths, and lengths below a task's floor."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown lm-eval RULER task(s) {', '.join(unknown) or '(none given)'}; choose from the "
                          f"corpus-free tasks that run offline: {', '.join(TASKS)}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
        raise ConfigError(f"lm-eval RULER lengths must be positive integers, got {lengths!r}")
    for task in tasks:
        if min(lengths) < MIN_LENGTH[task]:
            raise ConfigError(f"lm-eval task {task} cannot build a {min(lengths):,}-token prompt (template, needles "
                              f"and answer); its lengths must be ≥ {MIN_LENGTH[task]:,} (≥ 256 for all, ≥ 512 for "
                              "niah_multikey_3, ≥ 1,024 for ruler_vt)")


def prepare(tasks: list[str], lengths: list[int], optional: bool = False) -> str | None:
    """Check `tasks` at `lengths` and make lm-eval's environment ready before any other work (a first build takes
    about a minute). None when ready; when the package index cannot be reached to build it and `optional`, the
    one-line reason instead (shown in the report); otherwise a one-line `ConfigError`."""
    check_tasks(tasks, lengths)
    try:
        ensure_env()
    except IndexUnreachable as e:
        if not optional:
            raise
        return f"{e} (lm-eval's RULER tasks are optional in this run)"
    return None


def _check(model_dir: Path, tasks: list[str], lengths: list[int], limit: int | None, batch_size: int) -> None:
    """Refuse bad arguments up front, one line each."""
    check_tasks(tasks, lengths)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"lm-eval limit must be a positive integer or None, got {limit!r}")
    if batch_size < 1:
        raise ConfigError(f"lm-eval batch size must be ≥ 1, got {batch_size}")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir}: no config.json; pass a local Hugging Face model directory")
    if any(c in str(model_dir) for c in ",="):
        raise ConfigError(f"{model_dir}: lm-eval's --model_args cannot hold a path with ',' or '='; move or "
                          "symlink the model to a plain path")


def command(python: Path, model_dir: Path, tasks: list[str], lengths: list[int], limit: int | None, out: Path,
            dtype: str = "auto", batch_size: int = 1) -> list[str]:
    """The lm_eval command line: the local tokenizer builds the prompts, `max_length` leaves room past them."""
    model_args = f"pretrained={model_dir},tokenizer={model_dir},max_length={max(lengths) + MARGIN},dtype={dtype}"
    cmd = [str(python), "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", ",".join(tasks),
           "--metadata", json.dumps({"max_seq_lengths": lengths}), "--batch_size", str(batch_size),
           "--output_path", str(out)]
    return cmd + (["--limit", str(limit)] if limit is not None else [])


def scores_from_results(results: dict, tasks: list[str], lengths: list[int], source: str = "lm-eval results"
                        ) -> dict[str, dict[int, float]]:
    """task -> length -> score from an lm-eval results JSON (`results[task]["<length>,none"]`; -1 = no samples)."""
    scores: dict[str, dict[int, float]] = {}
    for task in tasks:
        per = results.get("results", {}).get(task)
        if per is None:
            raise ConfigError(f"{source}: no results for task {task}; rerun, and see lm_eval.log beside it")
        scores[task] = {}
        for n in lengths:
            value = per.get(f"{n},none")
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{source}: task {task} has no score at length {n} ({value!r}); the task built no "
                                  "sample of that length: raise the length or the limit")
            scores[task][n] = float(value)
    return scores


def _diagnose(log: str, code: int | None, log_path: Path) -> str:
    """One line: what went wrong in an lm_eval run and what to do about it."""
    last = last_line(log)
    if "No module named lm_eval" in log:
        return f"the lm-eval interpreter has no lm_eval ({last}); unset ${PYTHON_VAR} or install lm-eval into it"
    if "Could not generate any sample" in log:
        return f"{last}; use longer lengths"
    if any(s in log for s in _FETCH):
        return (f"an lm-eval task tried to fetch data offline ({last}); only the corpus-free tasks "
                f"{', '.join(TASKS)} run here")
    return f"lm_eval exited with code {code}: {last}; full log in {log_path}"


def _run_one(cmd: list[str], env: dict, cwd: Path, log_path: Path, deadline: float | None) -> None:
    """Run `cmd` with its output in `log_path`; stop it on a known hang, truncation, timeout or error."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    problem = None
    while proc.poll() is None:
        time.sleep(0.5)
        text = log_path.read_text(errors="replace")
        if "Num noises: 0" in text:
            problem = ("lm-eval's ruler_vt cannot fit its shortest chain at this length with this tokenizer and "
                       "would loop forever; use longer lengths")
        elif "Left truncation applied" in text:
            problem = "lm-eval truncated a prompt (max_length too small); report this as a bug in lmeval_ruler.py"
        elif deadline is not None and time.monotonic() > deadline:
            problem = f"lm_eval ran past the timeout; raise timeout_s or lower the limit (log: {log_path})"
        if problem:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ConfigError(problem)
    if proc.returncode != 0:
        raise ConfigError(_diagnose(log_path.read_text(errors="replace"), proc.returncode, log_path))


def run_ruler(model_dir: Path, tasks: list[str], lengths: list[int], limit: int | None, out_dir: Path,
              python: Path | None = None, batch_size: int = 1, dtype: str = "auto",
              timeout_s: float | None = None) -> dict[str, dict[int, float]]:
    """Score `tasks` at each of `lengths` with lm-eval's RULER on the local model at `model_dir`: task -> length ->
    mean string-match score in [0, 1] over the first `limit` samples (all 500 per length when None).

    Outputs (lm-eval's results JSON, command.json and lm_eval.log) go under `out_dir/len<L>/`. `python` defaults
    to `ensure_env()`. `timeout_s` bounds the lm_eval runs (not a first environment build). Failures raise
    `ConfigError` with one line."""
    model_dir = Path(model_dir).absolute()
    lengths = list(lengths)
    _check(model_dir, list(tasks), lengths, limit, batch_size)
    python = Path(python) if python is not None else ensure_env()
    if not python.is_file():
        raise ConfigError(f"{python}: no such interpreter for lm-eval; pass python=None to build its environment")
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    out_dir = Path(out_dir).absolute()
    # --limit takes the first N documents across all lengths: with a limit, each length is its own invocation
    groups = [sorted(set(lengths))] if limit is None else [[n] for n in sorted(set(lengths))]
    scores: dict[str, dict[int, float]] = {t: {} for t in tasks}
    with tempfile.TemporaryDirectory(prefix="ctxstretch-nltk-") as nltk_dir:
        # present but empty: prepare_niah.py downloads punkt_tab at import unless it finds one; only the essay
        # haystack (not offered here) uses it
        (Path(nltk_dir) / "tokenizers" / "punkt_tab").mkdir(parents=True)
        env = offline_env(NLTK_DATA=nltk_dir)
        prefix = no_network_prefix()
        for group in groups:
            run_dir = out_dir / f"len{'-'.join(map(str, group))}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            cmd = [*prefix, *command(python, model_dir, list(tasks), group, limit, run_dir, dtype, batch_size)]
            (run_dir / "command.json").write_text(json.dumps(cmd, indent=1))
            _run_one(cmd, env, run_dir, run_dir / "lm_eval.log", deadline)
            found = sorted(run_dir.glob("**/results_*.json"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise ConfigError(f"lm_eval finished but wrote no results JSON under {run_dir}; see its lm_eval.log")
            data = json.loads(found[-1].read_text())
            for task, per in scores_from_results(data, list(tasks), group, str(found[-1])).items():
                scores[task].update(per)
    return scores
