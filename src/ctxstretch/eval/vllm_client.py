"""Drive one model in vLLM from this environment: `vllm_worker.py` runs as a subprocess of the vLLM
environment's python, with no network but its own loopback (`unshare -n` where that works; the hub offline and
HTTP(S) sent to a closed port everywhere), and answers JSON requests over a pipe."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import vllm_env
from .venv import last_line, no_network_prefix, offline_env

WORKER = Path(__file__).with_name("vllm_worker.py")
LOAD_TIMEOUT_S = 900.0  # a 135M model loads in about a minute on 2 busy cores
KV_CACHE_GB = "4"
_BROKEN = ("No module named", "ImportError", "undefined symbol", "does not exist", "cannot open shared object")


class VllmError(vllm_env.VllmUnavailable):
    """vLLM failed to start, load the model, or answer."""


@dataclass
class PromptScores:
    """vLLM's teacher-forced view of one prompt's last positions: for each scored token j, the top-1 token at its
    prediction (`top`, its logprob `top_lp`) and the logprob of token j itself (`tok_lp`), all shape (n,)."""

    top: np.ndarray
    top_lp: np.ndarray
    tok_lp: np.ndarray


class VllmEngine:
    """One model served by a vLLM worker process; use as a context manager (the worker stops on exit).

    `max_model_len`: the longest prompt plus generation, in tokens (may exceed the model's configured window).
    `dtype`: vLLM's dtype ("bfloat16" or "float32" on CPU). `hf_overrides`: config fields to read differently
    from config.json."""

    def __init__(self, model_dir: Path, max_model_len: int, dtype: str = "bfloat16", vllm_env_dir: Path | None = None,
                 log_path: Path | None = None, load_timeout_s: float = LOAD_TIMEOUT_S,
                 hf_overrides: dict | None = None):
        python = vllm_env.find_python(vllm_env_dir)
        self.model_dir = Path(model_dir).absolute()
        self.max_model_len = int(max_model_len)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="ctxstretch-vllm-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        env = offline_env(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GB),
                          VLLM_ALLOW_LONG_MAX_MODEL_LEN="1",  # probes beyond the configured window are the point
                          VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", NO_PROXY="127.0.0.1,localhost,::1",
                          no_proxy="127.0.0.1,localhost,::1")
        with open(self.log_path, "w") as log:  # -P: this folder's modules (venv.py, …) must not shadow the stdlib
            self._proc = subprocess.Popen([*no_network_prefix(loopback=True), str(python), "-P", str(WORKER)],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                          text=True, start_new_session=True)
        self.load_seconds = self._ask({"op": "load", "model": str(self.model_dir), "dtype": dtype,
                                       "max_model_len": self.max_model_len, "hf_overrides": hf_overrides or {}},
                                      load_timeout_s, loading=True)["seconds"]

    def score(self, prompts: list[np.ndarray], tail: int = 0, allow_nan: bool = False) -> list[PromptScores]:
        """Teacher-forced top-1 and token logprobs of each prompt's last `tail` tokens (all but the first when 0).
        Each prompt takes one token more than its length (vLLM generates one). NaN logprobs (positions past those
        vLLM computes rotary embeddings for) raise VllmError unless `allow_nan`."""
        self._check_lengths(prompts, 1)
        rows = self._ask({"op": "score", "prompts": [np.asarray(p).tolist() for p in prompts], "tail": tail})["rows"]
        out = [PromptScores(np.array(r["top"], dtype=np.int64), np.array(r["top_lp"]), np.array(r["tok_lp"]))
               for r in rows]
        for ids, s in zip(prompts, out, strict=True):
            if not allow_nan and (bad := np.flatnonzero(np.isnan(s.top_lp) | np.isnan(s.tok_lp))).size:
                at = len(ids) - len(s.top) + int(bad[0]) - 1  # the position whose prediction is NaN
                raise VllmError(f"vLLM gave NaN logprobs from position {at:,} of a {len(ids):,}-token prompt: it "
                                "computes rotary embeddings only up to its reading of the model's window; evaluate "
                                f"at shorter lengths (`ctxstretch check-parity {self.model_dir}` shows where)")
        return out

    def generate(self, prompts: list[np.ndarray], max_tokens: int, stop: list[int] | None = None) -> list[list[int]]:
        """Greedy continuations of each prompt: up to `max_tokens` token ids, ending early at a token of `stop`."""
        self._check_lengths(prompts, max_tokens)
        return self._ask({"op": "generate", "prompts": [np.asarray(p).tolist() for p in prompts],
                          "max_tokens": int(max_tokens), "stop": list(stop or [])})["tokens"]

    def close(self) -> None:
        """Stop the worker (and the engine process it spawned)."""
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._kill()

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_lengths(self, prompts: list[np.ndarray], extra: int = 0) -> None:
        longest = max((len(p) for p in prompts), default=0) + extra
        if longest > self.max_model_len:
            raise VllmError(f"a {longest:,}-token request exceeds the engine's max_model_len {self.max_model_len:,}; "
                            "start the engine with a larger one")

    def _ask(self, request: dict, timeout_s: float | None = None, loading: bool = False) -> dict:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except OSError:
            raise self._failure(loading) from None
        while True:
            ready, _, _ = select.select([self._proc.stdout], [], [], 1.0)
            if ready:
                line = self._proc.stdout.readline()
                if not line:
                    raise self._failure(loading)
                reply = json.loads(line)
                if not reply.get("ok"):
                    raise self._failure(loading, reply.get("error"))
                return reply
            if self._proc.poll() is not None:
                raise self._failure(loading)
            if deadline is not None and time.monotonic() > deadline:
                self._kill()
                raise VllmError(f"vLLM did not load {self.model_dir} within {timeout_s:.0f} s; log: {self.log_path}")

    def _failure(self, loading: bool, error: str | None = None) -> VllmError:
        """One line: what failed in the worker and what to do about it."""
        if self._proc.poll() is None and not loading:
            return VllmError(f"vLLM: {error}; log: {self.log_path}")
        self.close()
        log = self.log_path.read_text(errors="replace")
        cause = error or last_line(log)
        if any(s in log or s in (error or "") for s in _BROKEN):
            return VllmError(f"the vLLM environment cannot run vLLM ({cause}); rebuild it with `{vllm_env.SETUP}` "
                             f"or point --vllm-env at a working one (log: {self.log_path})")
        return VllmError(f"vLLM could not load {self.model_dir}: {cause}; log: {self.log_path}")
