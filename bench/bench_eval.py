"""Evaluation throughput vs the raw forward (prefill) of the same model on the same lengths.

    python bench/bench_eval.py [--lengths 256,1k,4k] [--trials 2] [--repeats 3] [--model DIR] [--device cpu]
                               [--threads 1]

Evaluation = the real code path (probes built from held-out text, passkey + needle grids, every RULER task, exact
match scoring), timed end to end. Raw forward = `model(input_ids, logits_to_keep=1)` (a prefill) on the same
number of rows of the same length, in the same batches, on pre-built tensors. Each figure is the best of
`--repeats`, the two measured alternately. On CPU the clock is process CPU time with one thread by default, so a
shared machine's load does not skew the ratio (tokens per CPU-second); on CUDA it is wall time.
Target: eval tokens/s ≥ 0.9 × raw tokens/s.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from ctxstretch.cli.common import ints
from ctxstretch.data.probes import ProbeBuilder
from ctxstretch.data.ruler import TASKS, RulerBuilder
from ctxstretch.data.sources import embedded_token_stream
from ctxstretch.eval.passkey import retrieval_grid
from ctxstretch.eval.ruler import ruler_scores
from ctxstretch.models import load, resolve

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def run_eval(model, probes: ProbeBuilder, ruler: RulerBuilder, n: int, trials: int, batch: int) -> int:
    """One evaluation at length `n`; returns the number of probes scored."""
    for kind in ("passkey", "needle"):
        retrieval_grid(model, probes, kind, [n], DEPTHS, trials, batch_size=batch)
    ruler_scores(model, ruler, [n], TASKS, trials=trials, batch_size=batch)
    return (2 * len(DEPTHS) + len(TASKS)) * trials


@torch.no_grad()
def run_raw(model, ids: torch.Tensor, batch: int) -> None:
    """Prefill only, the same rows in the same batch size: the ceiling an evaluation can reach."""
    for i in range(0, len(ids), batch):
        model(input_ids=ids[i : i + batch], use_cache=False, logits_to_keep=1)
    if ids.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--lengths", default="256,1k,4k")
    ap.add_argument("--trials", type=int, default=2, help="probes per cell (depth or RULER task)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.device.startswith("cuda") else time.process_time

    model, tok = load(resolve(args.model), args.device)
    heldout = embedded_token_stream(tok, "heldout")
    probes = ProbeBuilder(tok, heldout)
    ruler = RulerBuilder(probes)
    print(f"# {platform.node()} {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, clock {clock.__name__}, {date.today()}")
    print("| length | probes | probes/s | eval tokens/s | raw forward tokens/s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in ints(args.lengths):
        run_eval(model, probes, ruler, n, 1, args.batch)  # warm-up (and probe-text caches)
        count = (2 * len(DEPTHS) + len(TASKS)) * args.trials
        ids = torch.randint(0, len(tok), (count, n), device=args.device)
        run_raw(model, ids[: args.batch], args.batch)
        best_eval = best_raw = float("inf")
        for _ in range(args.repeats):
            t = clock()
            run_raw(model, ids, args.batch)
            best_raw = min(best_raw, clock() - t)
            t = clock()
            run_eval(model, probes, ruler, n, args.trials, args.batch)
            best_eval = min(best_eval, clock() - t)
        ev, raw = count * n / best_eval, count * n / best_raw
        print(f"| {n:,} | {count} | {count / best_eval:.1f} | {ev:,.0f} | {raw:,.0f} | {ev / raw:.2f} |", flush=True)


if __name__ == "__main__":
    main()
