"""Rope parity across engines: does vLLM read a model's `rope_parameters` the way transformers does?

Both engines score the same held-out token sequence; at every position we compare the next-token distribution's
top-1 logprob (|Δ|), the logprob of the actual next token (|Δ|), and whether the top-1 tokens agree, per position
bucket: inside the original window ([0, L0)) and each doubling beyond it. A rope type read differently shows as
a gap that the default rope (same weights, same kernels' numerics) does not have."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.sources import embedded_token_stream
from ..models import load, load_config
from ..rope import apply_rope, original_window
from ..train.loss import CHUNK_TOKENS, final_hidden, supports_chunked_head
from .perplexity import default_buckets
from .vllm_client import PromptScores, VllmEngine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# an engine pair "agrees" when every bucket keeps within these; measured on SmolLM2-135M where the engines agree:
# fp32 mean |Δ| of the next-token logprob 5e-6 to 7e-6 with 100% top-1 agreement, bf16 0.042 with 96.5%
TOLERANCE = {"float32": (0.01, 0.99), "bfloat16": (0.1, 0.95)}  # (mean |Δ token logprob|, top-1 agreement)


@dataclass
class Bucket:
    """The comparison over positions [lo, hi) of one sequence of `length` tokens."""

    length: int
    lo: int
    hi: int
    n: int
    max_top: float  # max |Δ| of the top-1 logprob (nats)
    mean_top: float  # mean |Δ| of the top-1 logprob
    mean_tok: float  # mean |Δ| of the logprob of the actual next token
    agree: float  # share of positions whose top-1 tokens are the same
    nan: int = 0  # positions where vLLM gave NaN logprobs (the gaps above leave them out)


@torch.no_grad()
def hf_scores(model, ids: np.ndarray) -> PromptScores:
    """transformers' top-1 token, its logprob and the actual token's logprob at the prediction of tokens 1..T-1 of
    `ids` (T,), in the same form as `VllmEngine.score`; the LM head runs in chunks of tokens."""
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    if supports_chunked_head(model):
        hidden = final_hidden(model, input_ids=x, attention_mask=torch.ones_like(x))[0, :-1]
        head = model.get_output_embeddings()
        parts = [F.log_softmax(head(hidden[s:s + CHUNK_TOKENS]).float(), -1) for s in range(0, len(hidden),
                                                                                          CHUNK_TOKENS)]
        logprobs = torch.cat(parts)
    else:
        logprobs = F.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1].float(), -1)
    top_lp, top = logprobs.max(-1)
    tok_lp = logprobs.gather(1, x[0, 1:, None])[:, 0]
    return PromptScores(top.numpy(), top_lp.numpy(), tok_lp.numpy())


def compare(hf: PromptScores, vl: PromptScores, length: int, window: int) -> list[Bucket]:
    """Per bucket of `perplexity.default_buckets(length, window)`: the gaps between the two engines' scores.
    Entry i of either score is the prediction made at position i (of token i+1)."""
    top_gap, tok_gap = np.abs(hf.top_lp - vl.top_lp), np.abs(hf.tok_lp - vl.tok_lp)
    same, nan = hf.top == vl.top, np.isnan(vl.top_lp) | np.isnan(vl.tok_lp)
    out = []
    for lo, hi in default_buckets(length - 1, window):
        ok = ~nan[lo:hi]
        top, tok = top_gap[lo:hi][ok], tok_gap[lo:hi][ok]
        stats = (top.max(), top.mean(), tok.mean()) if ok.any() else (np.inf, np.inf, np.inf)
        out.append(Bucket(length, lo, hi, hi - lo, *map(float, stats), float((same[lo:hi] & ok).mean()),
                          int((~ok).sum())))
    return out


def verdict(buckets: list[Bucket], dtype: str, window: int) -> str:
    """One line: whether the engines agree inside and beyond the original window, within `TOLERANCE[dtype]`."""
    gap, share = TOLERANCE[dtype]
    bad = [b for b in buckets if b.mean_tok > gap or b.agree < share or b.nan]
    if not bad:
        return f"agree: every bucket within mean |Δ logprob| ≤ {gap} and top-1 agreement ≥ {share:.0%} ({dtype})"
    inside = [b for b in bad if b.hi <= window]
    worst = max(bad, key=lambda b: b.mean_tok)
    where = "inside and beyond" if inside and len(inside) < len(bad) else "inside" if inside else "beyond"
    nans = sum(b.nan for b in buckets)
    nan_note = (f"; vLLM gave NaN logprobs at {nans:,} positions from {min(b.lo for b in buckets if b.nan):,} on "
                "(past its rotary table; for the default rope that ends at max_position_embeddings, which "
                "config.json can raise to the longest length served)") if nans else ""
    return (f"DIFFER {where} the original window ({window:,}): worst mean |Δ logprob| {worst.mean_tok:.3g}, top-1 "
            f"agreement {worst.agree:.1%} at positions {worst.lo:,}–{worst.hi:,} of {worst.length:,}{nan_note}; "
            "vLLM does not read this rope configuration as transformers does")


def unscaled_window(config) -> int:
    """The window before scaling: `rope.original_window`, except that a linear (PI) rope written without
    `original_max_position_embeddings` keeps it only as max_position_embeddings / factor."""
    params = config.rope_parameters
    if params.get("rope_type") == "linear" and not params.get("original_max_position_embeddings"):
        return int(round(config.max_position_embeddings / float(params["factor"])))
    return original_window(config)


def check_parity(model_dir: Path, lengths: list[int] | None = None, dtype: str = "float32",
                 vllm_env_dir: Path | None = None, log_path: Path | None = None,
                 hf_overrides: dict | None = None) -> tuple[list[Bucket], str]:
    """Compare transformers (this environment) with vLLM (its own) on one held-out sequence per length (default:
    twice the original window). Returns the buckets of every length and the verdict. `hf_overrides`: config
    fields vLLM should read differently from config.json (none: the model as it would be served)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}")
    model_dir = Path(model_dir)
    window = unscaled_window(load_config(model_dir))
    lengths = sorted(set(lengths or [2 * window]))
    if min(lengths) < 2:
        raise ConfigError(f"--lengths: parity needs sequences of at least 2 tokens, got {min(lengths)}")
    model, tokenizer = load(model_dir, "cpu", dtype=DTYPES[dtype])
    stream = embedded_token_stream(tokenizer, "heldout")
    stream = np.tile(stream, -(-max(lengths) // len(stream)))  # longer than the held-out text: it repeats
    seqs = [stream[:n] for n in lengths]
    hf = [hf_scores(model, s) for s in seqs]
    del model  # one engine in memory at a time
    with VllmEngine(model_dir, max(lengths) + 1, dtype, vllm_env_dir, log_path, hf_overrides=hf_overrides) as engine:
        vl = engine.score(seqs, allow_nan=True)
    buckets = [b for n, h, v in zip(lengths, hf, vl, strict=True) for b in compare(h, v, n, window)]
    return buckets, verdict(buckets, dtype, window)


def parity_record(model_dir: Path, dtype: str = "float32", vllm_env_dir: Path | None = None,
                  log_path: Path | None = None) -> dict:
    """`check_parity` at its default length, as `EvalResult.parity` keeps it (a run's final check)."""
    buckets, said = check_parity(model_dir, None, dtype, vllm_env_dir, log_path)
    return {"dtype": dtype, "verdict": said, "buckets": [dataclasses.asdict(b) for b in buckets]}


def table(buckets: list[Bucket]) -> list[str]:
    """A markdown table of the buckets."""
    lines = ["| length | positions | n | max Δ top-1 logprob | mean Δ top-1 logprob | mean Δ token logprob | top-1 "
             "agreement | NaN in vLLM |", "|---|---|---|---|---|---|---|---|"]
    for b in buckets:
        lines.append(f"| {b.length:,} | {b.lo:,}–{b.hi:,} | {b.n:,} | {b.max_top:.2e} | {b.mean_top:.2e} | "
                     f"{b.mean_tok:.2e} | {b.agree:.1%} | {b.nan:,} |")
    return lines


def rope_variant(model_dir: Path, out_dir: Path, method: str, target: int, base_window: int | None = None) -> Path:
    """A copy of `model_dir` whose config.json carries `rope.apply_rope(method, target)` (the weights and every
    other file are symlinks). `base_window` first sets the window the variant extends (a smaller one makes
    parity checks at short lengths cover positions beyond it); `method` "default" keeps the original rope."""
    model_dir, out_dir = Path(model_dir).absolute(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (out_dir / f.name).exists():
            os.symlink(f, out_dir / f.name)
    raw = json.loads((model_dir / "config.json").read_text())
    if base_window:
        raw["max_position_embeddings"] = int(base_window)
    if method != "default":
        config = load_config(model_dir)
        config.max_position_embeddings = raw["max_position_embeddings"]
        raw["rope_parameters"] = apply_rope(config, method, target)
        raw["max_position_embeddings"] = config.max_position_embeddings
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return out_dir
