"""The evaluation suite (`suite.evaluate`) on a model served by vLLM: the same held-out families, passkey, needle and
RULER-style probes, scored the same way, plus loss by position, the short-context loss and the chat check.

Probes are scored teacher-forced, as on the transformers backend: vLLM's prompt logprobs give the top-1 token at
every answer position, and a probe is solved when each is the answer token (which is exactly when greedy decoding
reproduces the answer). `EngineLM` hands those top-1 tokens to the scoring code in eval/passkey.py as logits, so
both backends run one scoring path. Loss by position is minus the logprob vLLM gives each prompt token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from ..config import ConfigError
from .suite import EvalConfig, EvalResult, doublings, evaluate
from .vllm_client import VllmEngine


class EngineLM:
    """The slice of a transformers causal LM that eval/passkey.answer_scores and eval/chat.chat_check call, answered
    by a vLLM engine.

    `model(input_ids=…, logits_to_keep=k).logits` is (batch, k, vocab): at each kept position vLLM's top-1 logprob
    at its top-1 token and -inf elsewhere, so its argmax is vLLM's greedy choice there (the last position, which
    predicts past the prompt, is all -inf). `generate` is greedy, ending at the model's EOS tokens."""

    def __init__(self, engine: VllmEngine, vocab_size: int, eos: list[int]):
        self.engine, self.vocab_size, self.eos = engine, vocab_size, eos
        self._device_anchor = torch.zeros(1)

    def parameters(self):
        yield self._device_anchor

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, logits_to_keep: int = 0, **_) -> _Output:
        k = logits_to_keep or input_ids.shape[1]
        rows = self.engine.score(list(input_ids.cpu().numpy()), tail=k - 1)
        logits = torch.full((input_ids.shape[0], k, self.vocab_size), float("-inf"))
        for b, row in enumerate(rows):
            at = torch.arange(k - 1 - len(row.top), k - 1)
            logits[b, at, torch.from_numpy(row.top)] = torch.from_numpy(row.top_lp).float()
        return _Output(logits)

    __call__ = forward

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_) -> torch.Tensor:
        """(1, n + new) like transformers' `generate` for one prompt: the prompt followed by its greedy tokens."""
        new = self.engine.generate([input_ids[0].cpu().numpy()], max_new_tokens, self.eos)[0]
        return torch.cat([input_ids.cpu(), torch.tensor([new], dtype=input_ids.dtype)], 1)


class _Output:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits


def model_facts(model_dir: Path) -> tuple[int, list[int]]:
    """(vocabulary size, EOS token ids) from config.json and generation_config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    gen_file = model_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    eos = gen.get("eos_token_id", text.get("eos_token_id"))
    return int(text["vocab_size"]), [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


def vllm_overrides(model_dir: Path, max_model_len: int) -> dict:
    """The config fields vLLM must read differently from config.json to compute `max_model_len` positions as
    transformers does. vLLM tabulates the default rope (ABF and fixed NTK included) for max_position_embeddings
    positions and gives NaN past them, while transformers computes any position: for that rope type, raise vLLM's
    reading to `max_model_len` (nothing else depends on it there). Other rope types derive their table from their own
    parameters and are left as written, except dynamic NTK past its window, which vLLM 0.32 does not compute
    (check-parity measures it: the unscaled base, and no table past max_position_embeddings): refused."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    window = int(config.get("max_position_embeddings") or 0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "dynamic" and 0 < window < max_model_len:
        raise ConfigError(f"{model_dir}: vLLM does not compute dynamic NTK rope past the {window:,}-token window "
                          "(it keeps the unscaled base and has no positions beyond); evaluate this model with "
                          "--backend transformers, or extend with --method ntk-fixed (the same base at the target, "
                          "which vLLM reads as transformers does)")
    if kind == "default" and 0 < window < max_model_len:
        return {"max_position_embeddings": int(max_model_len)}
    return {}


def token_losses(engine: VllmEngine, stream: np.ndarray, length: int, rows: int) -> np.ndarray:
    """Per-token loss (nats) at positions 1..length-1 of `rows` consecutive rows, shape (rows, length-1), as
    eval/perplexity.token_losses computes it on the transformers backend."""
    if len(stream) < length:
        raise ConfigError(f"held-out text has {len(stream):,} tokens, fewer than one row of {length:,}")
    rows = min(rows, len(stream) // length)
    data = np.asarray(stream[: rows * length], dtype=np.int64).reshape(rows, length)
    return np.stack([-s.tok_lp for s in engine.score(list(data))]).astype(np.float32)


def max_length(cfg: EvalConfig, base_window: int, target: int) -> int:
    """The engine's max_model_len for this evaluation: the longest probe or row, plus room for the chat answers."""
    from .chat import NEW_TOKENS

    lengths = cfg.lengths or doublings(base_window, target)
    return max([*lengths, base_window if cfg.short_rows else 0]) + 2 * NEW_TOKENS


def evaluate_vllm(engine: VllmEngine, tokenizer, cfg: EvalConfig, base_window: int, target: int,
                  cache_dir: Path | None = None, progress: Progress | None = None,
                  partial: Path | None = None) -> EvalResult:
    """`suite.evaluate` on `engine` (the model's tokenizer builds the probes here)."""
    if cfg.in_process_tasks:  # lm-eval's RULER runs in its own venv either way
        raise ConfigError("--lm-eval-tasks with --backend vllm: lm-evaluation-harness tasks run in-process on the "
                          "transformers backend only (its RULER tasks run in their own environment either way)")
    vocab, eos = model_facts(engine.model_dir)

    def losses_of(stream: np.ndarray, length: int, rows: int, batch_size: int = 1) -> np.ndarray:
        return token_losses(engine, stream, length, rows)  # the engine batches on its own

    return evaluate(EngineLM(engine, vocab, eos), tokenizer, cfg, base_window, target, cache_dir, progress, partial,
                    losses_of=losses_of)


def evaluate_dir(model_dir: Path, cfg: EvalConfig, base_window: int, target: int, vllm_env_dir: Path | None = None,
                 log_path: Path | None = None, progress: Progress | None = None,
                 dtype: str = "bfloat16") -> EvalResult:
    """Evaluate the local model at `model_dir` in vLLM (its tokenizer loads here); the engine stops at the end."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    longest = max_length(cfg, base_window, target)
    with VllmEngine(model_dir, longest, dtype, vllm_env_dir, log_path,
                    hf_overrides=vllm_overrides(model_dir, longest)) as engine:
        return evaluate_vllm(engine, tokenizer, cfg, base_window, target, progress=progress)
