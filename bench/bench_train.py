"""Training step on CPU: our `train_stage` against a raw forward + backward + AdamW loop (overhead ratio), and
packed rows against one-document-per-row padded rows on mixed-length documents (useful tokens/s ratio).

    nice -n 10 python bench/bench_train.py [--model DIR] [--steps 8] [--length 512] [--batch 4] [--repeats 2]

Both sides run the same model (default: the embedded one) from the same weights on the same rows, bf16 autocast,
sdpa, one process. Throughput is taken over the optimizer steps only (model loading and the final checkpoint
excluded). The share of this CPU's bf16 matmul peak (`ctxstretch.hardware.matmul_peak`, measured in the same run)
counts the model's training FLOPs per token (`ctxstretch.plan.flops_per_token`: 6·N + attention), recomputation
not counted as useful work.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ctxstretch.config import TrainConfig  # noqa: E402
from ctxstretch.data.packing import ROW_FIELDS, Rows, pack_rows  # noqa: E402
from ctxstretch.hardware import matmul_peak  # noqa: E402
from ctxstretch.masking import mask_for_model  # noqa: E402
from ctxstretch.models import load, resolve  # noqa: E402
from ctxstretch.plan import flops_per_token, read_shape  # noqa: E402
from ctxstretch.train.loop import param_groups, train_stage  # noqa: E402
from ctxstretch.train.loss import row_mean_loss  # noqa: E402


def mixed_docs(n_tokens: int, vocab: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """Documents with log-normal lengths (median ~150 tokens, capped at one row), `n_tokens` in all."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        k = int(min(length, max(16, rng.lognormal(5.0, 0.9))))
        docs.append(rng.integers(1, vocab, size=k))
        total += k
    return docs


def as_batches(rows, batch: int) -> list[dict[str, torch.Tensor]]:
    d = {k: torch.from_numpy(v) for k, v in rows.as_dict().items()}
    return [{k: v[i:i + batch] for k, v in d.items()} for i in range(0, len(rows) - batch + 1, batch)]


def padded_rows(docs, length: int, pad_id: int) -> Rows:
    """The baseline: one document per row, padded to `length` (documents are at most one row long here)."""
    rows = [pack_rows([d], length, pad_id=pad_id) for d in docs]
    return Rows(*(np.concatenate([getattr(r, k) for r in rows]) for k in (*ROW_FIELDS, "pad")))


def ours(model, batches, steps: int) -> float:
    """Seconds per optimizer step of `train_stage` (from its own tokens/s metric)."""
    cfg = TrainConfig(steps=steps, batch_size=len(batches[0]["input_ids"]), lr=1e-4, warmup_steps=0,
                      log_every=steps, checkpoint_every=10_000, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        train_stage(model, lambda i: batches[i % len(batches)], cfg, Path(tmp), name="bench")
        rec = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1])
    return batches[0]["input_ids"].numel() / rec["tokens_per_s"]


def raw(model, batches, steps: int) -> float:
    """Seconds per optimizer step of the plainest loop: forward, loss, backward, AdamW."""
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                           attention_mask=mask_for_model(model, b["segment_ids"]), use_cache=False).logits
        loss = row_mean_loss(logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--length", type=int, default=512, help="tokens per row")
    ap.add_argument("--batch", type=int, default=4, help="rows per step")
    ap.add_argument("--repeats", type=int, default=2, help="best of N (alternating ours/raw)")
    ap.add_argument("--model", default="embedded", help="local HF model directory, or 'embedded'")
    args = ap.parse_args()

    base, tok = load(resolve(args.model))
    vocab, pad = base.config.vocab_size, tok.pad_token_id or 0
    docs = mixed_docs(args.steps * args.batch * args.length * 2, vocab, args.length)
    packed = pack_rows(docs, args.length, pad_id=pad)
    padded = padded_rows(docs, args.length, pad)
    fresh = lambda: copy.deepcopy(base)  # noqa: E731

    t_ours = t_raw = t_pack = t_pad = float("inf")
    pb, db = as_batches(packed, args.batch), as_batches(padded, args.batch)
    for _ in range(args.repeats):
        t_ours = min(t_ours, ours(fresh(), pb, args.steps))
        t_raw = min(t_raw, raw(fresh(), pb, args.steps))
        t_pack = min(t_pack, ours(fresh(), pb, args.steps))
        t_pad = min(t_pad, ours(fresh(), db, args.steps))

    tokens = args.batch * args.length
    useful_pack = (~packed.pad).sum() / packed.pad.size * tokens / t_pack
    useful_pad = (~padded.pad).sum() / padded.pad.size * tokens / t_pad
    peak = matmul_peak("bf16")
    flops = flops_per_token(read_shape(args.model), args.length)
    table = Table(title=f"training step, CPU ({args.batch} × {args.length} tokens, {args.model}, bf16 autocast)")
    for col in ("measure", "value", "target"):
        table.add_column(col)
    table.add_row("train_stage tokens/s", f"{tokens / t_ours:,.0f}", "")
    table.add_row("raw fwd+bwd+AdamW tokens/s", f"{tokens / t_raw:,.0f}", "")
    table.add_row("overhead ratio (ours / raw throughput)", f"{t_raw / t_ours:.3f}", "≥ 0.95")
    table.add_row(f"train_stage share of the bf16 matmul peak ({peak / 1e9:,.0f} GFLOP/s)",
                  f"{tokens / t_ours * flops / peak:.1%}", "≥ 35%")
    table.add_row("packed: real-token share, useful tokens/s",
                  f"{(~packed.pad).mean():.1%}, {useful_pack:,.0f}", "")
    table.add_row("padded (1 doc/row): real-token share, useful tokens/s",
                  f"{(~padded.pad).mean():.1%}, {useful_pad:,.0f}", "")
    table.add_row("packing ratio (useful tokens/s)", f"{useful_pack / useful_pad:.2f}", "≥ 1.3")
    Console().print(table)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}")


if __name__ == "__main__":
    main()
