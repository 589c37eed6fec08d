"""The vLLM backend against the transformers one: agreement on the same probes, and prefill throughput.

    python bench/bench_vllm.py [--model DIR] [--agree-lengths 1k,4k] [--trials 2] [--lengths 4k,8k,16k]

Agreement: the held-out families and the passkey, `--trials` probes at each of three depths per length, scored by
eval/passkey.answer_scores on both backends (transformers fp32, vLLM bf16 through its prompt logprobs), plus
vLLM's greedy generation of each answer. Printed per family: exact matches on each backend, the share of probes
whose exact-match verdict is the same, and the mean |Δ| of the answer-token accuracy.
Throughput: one prompt of each `--lengths` through vLLM's prompt logprobs (what every probe and loss row costs)
and through transformers (`logits_to_keep=1`), tokens per wall second. vLLM reads the model as `eval --backend
vllm` serves it (`vllm_eval.vllm_overrides`: the default rope's table raised to the longest length).
Needs the vLLM environment (`ctxstretch backend setup vllm`).
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from ctxstretch.cli.common import ints
from ctxstretch.data.families import HELD_OUT
from ctxstretch.data.heldout import HeldoutBuilder
from ctxstretch.data.probes import ProbeBuilder, rng_for
from ctxstretch.data.sources import embedded_token_stream
from ctxstretch.eval.passkey import answer_scores
from ctxstretch.eval.vllm_client import VllmEngine
from ctxstretch.eval.vllm_eval import EngineLM, model_facts, vllm_overrides
from ctxstretch.models import load
from ctxstretch.realmodel import smollm2_dir

DEPTHS = (0.1, 0.5, 0.9)


def probes(tokenizer, lengths: list[int], trials: int) -> dict[str, list]:
    """family (and "passkey") -> evaluation probes over lengths × DEPTHS × trials."""
    held, pk = HeldoutBuilder(tokenizer), ProbeBuilder(tokenizer, embedded_token_stream(tokenizer, "heldout"))
    out: dict[str, list] = {}
    for name in (*HELD_OUT, "passkey"):
        for n in lengths:
            for d in DEPTHS:
                rng = rng_for(f"bench-vllm-{name}-{n}-{d}", 0, evaluation=True)
                make = (lambda r, n=n, d=d: pk.passkey(r, n, d)) if name == "passkey" else (
                    lambda r, n=n, d=d, name=name: held.make(name, r, n, d))
                out.setdefault(name, []).extend(make(rng) for _ in range(trials))
    return out


def greedy_exact(engine: VllmEngine, examples: list) -> np.ndarray:
    """Whether vLLM's greedy generation after each probe's question spells its answer exactly."""
    starts = [int(np.argmax(e.labels != -100)) for e in examples]
    answers = [e.input_ids[s:] for e, s in zip(examples, starts, strict=True)]
    got = [engine.generate([e.input_ids[:s]], len(a))[0] for e, s, a in zip(examples, starts, answers, strict=True)]
    return np.array([list(g) == a.tolist() for g, a in zip(got, answers, strict=True)])


def throughput(model, engine: VllmEngine, stream: np.ndarray, lengths: list[int]) -> list[tuple[int, float, float]]:
    """(length, vLLM tokens/s, transformers tokens/s) for one prompt of each length."""
    rows = []
    for n in lengths:
        ids = np.asarray(stream[:n], dtype=np.int64)
        start = time.perf_counter()
        engine.score([ids], tail=1)
        v = n / (time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids)[None], use_cache=False, logits_to_keep=1)
        rows.append((n, v, n / (time.perf_counter() - start)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--agree-lengths", default="1k,4k", help="agreement lengths (empty: skip)")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--lengths", default="4k,8k,16k", help="throughput lengths (empty: skip)")
    args = ap.parse_args()
    base = Path(args.model) if args.model else smollm2_dir()
    agree_lengths, lengths = ints(args.agree_lengths), ints(args.lengths)
    model, tokenizer = load(base)
    longest = max([*agree_lengths, *lengths])
    sets = probes(tokenizer, agree_lengths, args.trials)
    start = time.perf_counter()
    hf = {name: answer_scores(model, ex, batch_size=1) for name, ex in sets.items()}
    print(f"transformers scored {sum(map(len, sets.values()))} probes in {time.perf_counter() - start:.0f} s",
          flush=True)
    with VllmEngine(base, longest + 64, hf_overrides=vllm_overrides(base, longest + 64)) as engine:  # as eval
        print(f"vLLM loaded {base} in {engine.load_seconds:.0f} s", flush=True)
        view = EngineLM(engine, *model_facts(base))
        start = time.perf_counter()
        vl = {name: answer_scores(view, ex, batch_size=1) for name, ex in sets.items()}
        print(f"vLLM scored them in {time.perf_counter() - start:.0f} s", flush=True)
        gen = {name: greedy_exact(engine, ex) for name, ex in sets.items()}
        if agree_lengths:
            print_agreement(sets, hf, vl, gen, agree_lengths, args.trials)
        speed = throughput(model, engine, np.tile(embedded_token_stream(tokenizer, "heldout"), 2), lengths)
    if speed:
        print(f"\n{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
        print("\n| length | vLLM prompt logprobs, tokens/s | transformers prefill, tokens/s |\n|---|---|---|")
        for n, v, h in speed:
            print(f"| {n:,} | {v:,.0f} | {h:,.0f} |")


def print_agreement(sets: dict, hf: dict, vl: dict, gen: dict, lengths: list[int], trials: int) -> None:
    """The agreement table, per probe family."""
    print(f"\n{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"lengths {lengths}, {trials} trials × {len(DEPTHS)} depths per length\n")
    print("| probes | n | exact (transformers) | exact (vLLM, teacher-forced) | exact (vLLM, greedy generation) | "
          "same verdict | mean |Δ answer-token acc| |")
    print("|---|---|---|---|---|---|---|")
    total = same_total = 0
    for name in sets:
        (ok_h, fr_h), (ok_v, fr_v), g = hf[name], vl[name], gen[name]
        same = int((ok_h == ok_v).sum())
        total, same_total = total + len(ok_h), same_total + same
        print(f"| {name} | {len(ok_h)} | {ok_h.sum()} | {ok_v.sum()} | {g.sum()} | {same / len(ok_h):.0%} | "
              f"{np.abs(fr_h - fr_v).mean():.3f} |")
    print(f"\nagreement (same exact-match verdict): {same_total}/{total} = {same_total / total:.1%}", flush=True)


if __name__ == "__main__":
    main()
