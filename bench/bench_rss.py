"""Memory stays flat over a long run: thousands of `train_stage` steps on the embedded model (tiny rows, checkpoints
and metrics written as in a real run), resident set size sampled as it goes.

    nice -n 10 python bench/bench_rss.py [--steps 2000] [--length 32] [--batch 2] [--threads 1]

RSS is read from psutil when installed, else /proc/self/status (VmRSS); the peak from VmHWM where available.
"Growth" compares the end with the sample after warm-up (10% of the steps): allocator caches, the optimizer state
and the first checkpoint are in place by then, so anything still rising is a leak.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ctxstretch.config import TrainConfig  # noqa: E402
from ctxstretch.data.mix import RowMixer  # noqa: E402
from ctxstretch.tiny import MODEL_DIR  # noqa: E402
from ctxstretch.train.loop import train_stage  # noqa: E402

MB = 1024 * 1024


def _proc_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return _proc_status("VmRSS") or 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--length", type=int, default=32, help="tokens per row")
    ap.add_argument("--batch", type=int, default=2, help="rows per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    samples: dict[int, int] = {}
    start = rss()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    loaded = rss()
    stream = np.random.default_rng(0).integers(0, len(tok), 200_000).astype(np.uint16)
    rows = RowMixer(tok, stream, name="rss", seed=0, length=args.length, batch=args.batch,
                    mix={"text": 1, "random_copy": 1}, positions="longrecipe", target=4096, contiguous_share=0.3)
    every = max(1, args.steps // 20)

    def batch_fn(index: int):
        if index % every == 0 or index == 1:  # before step `index`: the state after `index` steps
            samples[index] = rss()
        return rows(index)

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=1e-4, warmup_steps=10, checkpoint_every=250,
                      keep_checkpoints=2, log_every=10, precision="fp32", device="cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctxstretch-rss-") as run:
        train_stage(model, batch_fn, cfg, Path(run), name="rss")
        end = rss()
        lines = sum(1 for _ in (Path(run) / "metrics.jsonl").open())
    wall = time.perf_counter() - t0
    peak = _proc_status("VmHWM")

    warm = min((i for i in samples if i >= args.steps // 10), default=0)
    mid = min(samples, key=lambda i: abs(i - args.steps // 2))
    table = [("interpreter + imports", start), ("embedded model loaded", loaded),
             ("after 1 step", samples[1]), (f"after {warm} steps (warm)", samples[warm]),
             (f"after {mid} steps (middle)", samples[mid]), (f"after {args.steps} steps (end)", end)]
    later = np.array([(i, v) for i, v in sorted(samples.items()) if i >= warm], dtype=float)
    slope = np.polyfit(later[:, 0], later[:, 1] / MB, 1)[0] * 1000 if len(later) > 1 else float("nan")
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
          f"{torch.__version__}, {args.threads} thread(s), {date.today()}")
    print(f"{args.steps} steps × {args.batch} rows × {args.length} tokens on the embedded model in {wall:.0f} s "
          f"({wall / args.steps * 1000:.1f} ms/step); {lines} metric lines, checkpoints every 250 steps\n")
    print("| point | RSS (MB) |\n|---|---:|")
    for name, value in table:
        print(f"| {name} | {value / MB:.1f} |")
    print(f"| growth, warm → end | {(end - samples[warm]) / MB:+.1f} |")
    print(f"| trend after warm-up (least squares over {len(later)} samples) | {slope:+.2f} MB per 1,000 steps |")
    if peak:
        print(f"| peak (VmHWM) | {peak / MB:.1f} |")


if __name__ == "__main__":
    main()
