"""Peak memory of ONE training step per token, against the row length: a model (default the embedded one), one
`train_stage` step (forward + backward + AdamW, default settings: bf16 autocast, sdpa) on one row, each cell in a
fresh process.

    nice -n 10 python bench/bench_memory.py [--lengths 4096,8192,16384,32768,65536] [--kinds one,packed,padded]
    nice -n 10 python bench/bench_memory.py --model ~/.cache/ctxstretch/smollm2/model --checkpointing \
        --lengths 4096,8192,16384 --kinds one --mmap-threshold 65536 --steps 2

`--mmap-threshold N` starts each cell with glibc's `MALLOC_MMAP_THRESHOLD_=N` (and `MALLOC_TRIM_THRESHOLD_=0`):
allocations of N bytes or more are mmapped and go back to the OS when freed. Without it glibc raises the threshold
as large blocks are freed, and tensors of a few MB to 32 MB (a 135M model's activations at 4K–16K tokens) are
carved from heap arenas that fragment: peak RSS then measures the allocator, not the tensors (SmolLM2 at 8K: 5.7 GB
with glibc's default, 2.4 GB with the threshold fixed).

Row kinds: `one` — one document over the whole row; `packed` — `--docs` documents (default 2) packed in the row,
positions restarting per document; `padded` — an SFT row: one document over half the row with the loss on its
last 64 tokens, then padding in its own segment (label IGNORE). Peak RSS is the child's VmHWM (see
`bench_rss.py`); "step" is peak minus the RSS just before the step (model loaded, row built), per token of the
row. Flat bytes/token across lengths = memory linear in T.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from bench_rss import _proc_status, rss  # noqa: E402

from ctxstretch.config import TrainConfig  # noqa: E402
from ctxstretch.models import load, resolve  # noqa: E402
from ctxstretch.train.loop import train_stage  # noqa: E402

IGNORE = -100
MB = 1024 * 1024


def make_row(kind: str, length: int, vocab: int, docs: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """One training row of `kind` (see the module docstring); fields (1, length) int64."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (length,), generator=g)
    labels, seg, pos = ids.clone(), torch.zeros(length, dtype=torch.long), torch.arange(length)
    if kind == "packed":
        bounds = torch.linspace(0, length, docs + 1).long().tolist()
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            seg[s:e], pos[s:e], labels[s] = i, torch.arange(e - s), IGNORE
    elif kind == "padded":
        n = length // 2
        ids[n:], labels[: n - 64], labels[n:] = 0, IGNORE, IGNORE
        seg[n:], pos[n:] = 1, torch.arange(length - n)
    elif kind != "one":
        raise ValueError(f"unknown row kind {kind}")
    return {k: v[None] for k, v in
            {"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos}.items()}


def cell(kind: str, length: int, docs: int, threads: int, model_dir: str = "embedded",
         checkpointing: bool = False, steps: int = 1) -> dict[str, float]:
    """Run one step in this process; return peak RSS, RSS before the step and wall seconds."""
    torch.set_num_threads(threads)
    model, _ = load(resolve(model_dir))
    row = make_row(kind, length, model.config.vocab_size, docs)
    cfg = TrainConfig(steps=steps, batch_size=1, lr=1e-4, warmup_steps=0, log_every=1, checkpoint_every=10_000,
                      device="cpu", gradient_checkpointing=checkpointing)
    before = rss()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctxstretch-mem-") as run:
        train_stage(model, lambda i: row, cfg, Path(run), name="mem")
        loss = json.loads((Path(run) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    return {"peak": float(_proc_status("VmHWM") or rss()), "before": float(before),
            "seconds": time.perf_counter() - t0, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536",
                    help="row lengths in tokens (a 65,536-token cell takes 5-15 min on one thread)")
    ap.add_argument("--kinds", default="one,packed,padded")
    ap.add_argument("--docs", type=int, default=2, help="documents per packed row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--model", default="embedded", help="a local model directory, or 'embedded'")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing (a real model's "
                    "default for rows past its window)")
    ap.add_argument("--steps", type=int, default=1, help="training steps per cell: 2 measures the steady state, "
                    "where AdamW's state (allocated at the first step) is alive during the backward")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="start each cell with glibc's "
                    "MALLOC_MMAP_THRESHOLD_ set to this many bytes (0: glibc's default, dynamic)")
    ap.add_argument("--cell", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell[0], int(args.cell[1]), args.docs, args.threads, args.model,
                              args.checkpointing, args.steps)))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    kinds = args.kinds.split(",")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
          f"{datetime.date.today().isoformat()}; model {args.model}, {args.steps} train_stage step(s), batch 1, "
          "bf16 autocast, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {args.docs} documents per packed row, "
          f"glibc mmap threshold {args.mmap_threshold or 'default'}\n")
    print("| row kind | T | peak RSS (MB) | step (MB) | step bytes/token | peak bytes/token | s | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in kinds:
        for t in lengths:  # one cell at a time, each in a fresh process
            cmd = [sys.executable, __file__, "--cell", kind, str(t), "--docs", str(args.docs),
                   "--threads", str(args.threads), "--model", args.model, "--steps", str(args.steps),
                   *(["--checkpointing"] if args.checkpointing else [])]
            env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold), "MALLOC_TRIM_THRESHOLD_": "0"}
                                    if args.mmap_threshold else {})}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"| {kind} | {t:,} | failed (rc {done.returncode}) | | | | | |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            step = r["peak"] - r["before"]
            print(f"| {kind} | {t:,} | {r['peak'] / MB:,.0f} | {step / MB:,.0f} | {step / t:,.0f} | "
                  f"{r['peak'] / t:,.0f} | {r['seconds']:.1f} | {r['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
