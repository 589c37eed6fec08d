"""Short-context regression: what extension cost on inputs that fit the base window.

Long-context recipes report this next to their long-context gains (Xiong et al., 2023, "Effective Long-Context
Scaling of Foundation Models", §3.2, short-task results; Peng et al., 2023, YaRN, §4.4): held-out loss on rows of
the model's own original window, and optionally lm-evaluation-harness tasks (the `[lmeval]` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..data.readers import read_documents
from ..data.sources import EMBEDDED, embedded_token_stream, tokenize_documents

LMEVAL_MISSING = "lm-evaluation-harness tasks need the lm_eval package: pip install 'ctxstretch[lmeval]'"


def short_text_stream(tokenizer, source: str = EMBEDDED, cache_dir: Path | None = None) -> np.ndarray:
    """Held-out text as one token array: the embedded corpus' held-out split, or a user source (file, folder,
    JSONL/Parquet/Arrow, saved dataset; see data/readers.py), each document followed by EOS."""
    if source == EMBEDDED:
        return embedded_token_stream(tokenizer, "heldout", cache_dir)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return tokenize_documents(tokenizer, (d.text for d in read_documents(source)), eos)


def short_context_loss(losses_of: Callable[[np.ndarray, int, int], np.ndarray], stream: np.ndarray, window: int,
                       rows: int = 16, source: str = EMBEDDED) -> dict:
    """Mean next-token loss (nats/token) over `rows` consecutive held-out rows of `window` tokens;
    `losses_of(stream, length, rows)` gives the per-token losses, shape (rows, length - 1)
    (`perplexity.token_losses` of a model, or an engine's).

    Returns {"length": window, "rows": rows used, "tokens": tokens scored, "loss": nats/token, "source": ...}."""
    if len(stream) < window:
        raise ConfigError(f"short-context text '{source}' has {len(stream):,} tokens, fewer than one row of "
                          f"{window:,}; give more text")
    losses = losses_of(stream, window, rows)
    return {"length": window, "rows": int(losses.shape[0]), "tokens": int(losses.size),
            "loss": float(losses.mean()), "source": str(source)}


def require_lm_eval():
    """The `lm_eval` module, or a one-line error naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(LMEVAL_MISSING) from None
    return lm_eval


def lm_eval_args(tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
                 batch_size: int = 1) -> dict:
    """Keyword arguments for `lm_eval.simple_evaluate` besides the model (lm-evaluation-harness 0.4)."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ConfigError("--lm-eval-tasks: give at least one task, e.g. hellaswag,arc_easy")
    return {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
            "log_samples": False}


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 1) -> dict:
    """Score an in-memory model on lm-evaluation-harness tasks; {task: {metric: value}} (numeric metrics only)."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, **lm_eval_args(tasks, limit, batch_size=batch_size))
    return metrics_of(out)


def metrics_of(out: dict) -> dict[str, dict[str, float]]:
    """The numeric metrics of `simple_evaluate`'s result, per task ("acc,none" → "acc"; stderr dropped)."""
    res: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, bool) or not isinstance(value, int | float) or name.endswith("_stderr"):
                continue
            res.setdefault(task, {})[name] = float(value)
    return res
