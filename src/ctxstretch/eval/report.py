"""`report.md`: a before/after table and plots, for people."""

from __future__ import annotations

from pathlib import Path

from .plots import heatmap, loss_curves
from .suite import EvalResult


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


def write_report(out: Path, title: str, header: list[str], results: dict[str, EvalResult], window: int,
                 checks: list[tuple[str, bool, str]] | None = None) -> Path:
    """Write report.md and its plots into `out`; `checks` are (claim, passed, measured) lines."""
    heatmap({k: r.passkey for k, r in results.items()}, out / "passkey.png", "Passkey accuracy", window)
    plots = ["![passkey](passkey.png)"]
    needles = {k: r.needle for k, r in results.items() if r.needle is not None}
    if needles:
        heatmap(needles, out / "needle.png", "Needle in a haystack", window)
        plots.insert(0, "![needle heatmap](needle.png)")
    curves = {k: r.losses for k, r in results.items() if r.losses is not None}
    if curves:
        loss_curves(curves, out / "loss_by_position.png", window)
        plots.append("![loss by position](loss_by_position.png)")
    lines = [f"# {title}", "", *header, "", "## Before / after", "", *comparison_table(results), ""]
    if checks:
        lines += ["## Targets", "", "| claim | measured | met |", "|---|---|---|"]
        lines += [f"| {claim} | {measured} | {'yes' if ok else '**no**'} |" for claim, ok, measured in checks]
        lines.append("")
    lines += ["## Plots", "", *plots, ""]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
