"""The markdown sections of `report.md` after the held-out one: in-format probes and loss by position, the
short-context regression, RULER-style tasks, rope parity and the loss-by-context power law — each a list of lines,
one column (or row) per evaluated model."""

from __future__ import annotations

import math

from .perplexity import fit_power_law, loss_vs_context
from .ruler import effective_length, mean_by_length
from .suite import EvalResult, doublings
from .vllm_parity import Bucket, table


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def comparison_table(results: dict[str, EvalResult]) -> list[str]:
    """Markdown rows: passkey and needle by length, loss by position bucket; one column per model."""
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    first = results[names[0]]
    for n in first.passkey.lengths:
        lines.append(f"| passkey @ {n:,} | " + " | ".join(_pct(r.passkey.by_length().get(n)) for r in results.values())
                     + " |")
    if first.needle is not None:
        for n in first.needle.lengths:
            lines.append(f"| needle @ {n:,} | "
                         + " | ".join(_pct(r.needle.by_length().get(n) if r.needle else None)
                                      for r in results.values()) + " |")
    for bucket in first.buckets:
        vals = [r.buckets.get(bucket) for r in results.values()]
        lines.append(f"| loss, positions {bucket} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in vals)
                     + " |")
    return lines


def short_context_section(results: dict[str, EvalResult]) -> list[str]:
    """What extension cost: held-out loss on rows of the base window (and lm-eval metrics), one column per model,
    each with its change against the first model's column."""
    if all(r.short is None and not r.lm_eval and r.chat is None for r in results.values()):
        return []
    names = list(results)
    ref = results[names[0]]

    def row(label: str, get, fmt: str, lower_is_better: bool) -> str:
        base = get(ref)
        cells = []
        for i, r in enumerate(results.values()):
            v = get(r)
            if v is None:
                cells.append("–")
            elif i == 0 or base is None:
                cells.append(format(v, fmt))
            else:
                d = v - base
                worse = d > 0 if lower_is_better else d < 0
                cells.append(f"{v:{fmt}} ({d:+{fmt}}{', **worse**' if worse and abs(d) > 1e-9 else ''})")
        return f"| {label} | " + " | ".join(cells) + " |"

    def short(key):
        return lambda r: None if r.short is None else r.short.get(key)

    lines = ["## Short-context regression (what extension cost)", "",
             f"Held-out text the models' own window holds; in brackets the change against `{names[0]}`.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    if any(r.short is not None for r in results.values()):
        lengths = {r.short["length"] for r in results.values() if r.short is not None}
        label = f"{lengths.pop():,} tokens" if len(lengths) == 1 else "own window"
        lines.append(row(f"held-out loss, rows of {label} (nats/token)", short("loss"), ".3f", True))
        lines.append(row("perplexity", lambda r: None if r.short is None else math.exp(r.short["loss"]), ".2f",
                         True))
        lines.append("| tokens scored | " + " | ".join("–" if r.short is None else f"{r.short['tokens']:,}"
                                                       for r in results.values()) + " |")
    metrics = sorted({(t, m) for r in results.values() for t, per in (r.lm_eval or {}).items() for m in per})
    for task, metric in metrics:
        lines.append(row(f"{task} {metric} (lm-eval)",
                         lambda r, t=task, m=metric: (r.lm_eval or {}).get(t, {}).get(m), ".3f",
                         "perplexity" in metric or metric in ("bits_per_byte", "loss")))
    if any(r.chat is not None for r in results.values()):
        lines.append("| chat questions answered sensibly | " + " | ".join(
            "–" if r.chat is None else f"{r.chat['passed']}/{r.chat['asked']}" for r in results.values()) + " |")
        lines += ["", "Chat answers (greedy, the tokenizer's chat template):", ""]
        for name, r in results.items():
            for a in (r.chat or {}).get("answers", []):
                answer = a["answer"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"- {name}: {a['question']} → “{answer}”{'' if a['ok'] else ' (**not sensible**)'}")
    return [*lines, ""]


def parity_section(results: dict[str, EvalResult]) -> list[str]:
    """Whether vLLM serves each checked model with the rope transformers reads (`eval/vllm_parity.py`)."""
    checked = {name: r.parity for name, r in results.items() if r.parity is not None}
    if not checked:
        return []
    lines = ["## Rope parity: transformers vs vLLM", "",
             "Next-token logprobs of one held-out sequence in both engines, by position bucket (inside the original "
             "window and past it).", ""]
    for name, parity in checked.items():
        lines += [f"- `{name}` ({parity['dtype']}): {parity['verdict']}", ""]
        lines += table([Bucket(**b) for b in parity["buckets"]])
        lines.append("")
    return lines


def ruler_section(results: dict[str, EvalResult]) -> list[str]:
    """Per-task, per-length RULER accuracy and each model's effective length."""
    rows = []
    for name, r in results.items():
        if not r.ruler:
            continue
        lengths = sorted({n for per in r.ruler.values() for n in per})
        for task, per in r.ruler.items():
            rows.append(f"| {name} | {task} | " + " | ".join(_pct(per.get(n)) for n in lengths) + " |")
        means = mean_by_length(r.ruler)
        eff = effective_length(means)
        rows.append(f"| {name} | **mean** (effective length: {'–' if eff is None else f'{eff:,}'}) | "
                    + " | ".join(_pct(means[n]) for n in lengths) + " |")
    if not rows:
        return []
    lengths = sorted({n for r in results.values() for per in r.ruler.values() for n in per})
    return ["## RULER-style tasks", "",
            "Exact match; effective length = longest length whose mean stays ≥ 85% of the shortest length's.", "",
            "| model | task | " + " | ".join(f"{n:,}" for n in lengths) + " |",
            "|---|---|" + "---|" * len(lengths), *rows, ""]


def power_law_section(results: dict[str, EvalResult], window: int) -> list[str]:
    """Llama 2 Long's fit of loss vs context length, one row per model that has per-token losses."""
    rows = []
    for name, r in results.items():
        if r.losses is None or (r.window or window) <= 0:
            continue
        n = r.losses.shape[1] + 1
        contexts = doublings(min(r.window or window, n // 4), n)
        points = loss_vs_context(r.losses, contexts)
        try:
            fit = fit_power_law(list(points), list(points.values()))
        except ValueError as e:
            rows.append(f"| {name} | {_points(points)} | no fit: {e} |")
            continue
        rows.append(f"| {name} | {_points(points)} | α={fit['alpha']:.3g}, β={fit['beta']:.3f}, "
                    f"γ={fit['gamma']:.3f} (rmse {fit['rmse']:.3f}) |")
    if not rows:
        return []
    return ["## Loss vs context length", "",
            "Loss of tokens that see c/2…c tokens of context, and the fit `loss(c) = (α/c)^β + γ` "
            "(Xiong et al., 2023).", "", "| model | loss at c | fit |", "|---|---|---|", *rows, ""]


def _points(points: dict[int, float]) -> str:
    return ", ".join(f"{c:,}: {v:.3f}" for c, v in points.items())
