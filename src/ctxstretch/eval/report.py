"""`report.md` and `report.html`: a before/after table and plots, for people; `report_runs` is what `ctxstretch
report` runs."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..rundir import EvalDir, RunDir
from .evidence import external_section, heldout_section, in_format_note
from .page import markdown_to_html
from .plots import heatmap, loss_curves
from .sections import comparison_table, parity_section, power_law_section, ruler_section, short_context_section
from .suite import EvalResult


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
    lines = [f"# {title}", "", *header, "", *heldout_section(results, window), *external_section(results),
             "## In-format probes", "", in_format_note(), "", *comparison_table(results), ""]
    lines += short_context_section(results)
    lines += ruler_section(results)
    lines += parity_section(results)
    lines += power_law_section(results, window)
    if checks:
        lines += ["## Targets", "", "| claim | measured | met |", "|---|---|---|"]
        lines += [f"| {claim} | {measured} | {'yes' if ok else '**no**'} |" for claim, ok, measured in checks]
        lines.append("")
    lines += ["## Plots", "", *plots, ""]
    path = RunDir(out).report
    _atomic_write(path, "\n".join(lines))
    _atomic_write(RunDir(out).report_html, markdown_to_html(lines, out, title))
    return path


def report_runs(runs: list[Path], out: Path) -> Path:
    """`ctxstretch report`: the evaluated models of `runs` (each run's own eval.json, or its base/ and extended/
    ones) side by side in `out`; returns report.md's path (report.html beside it)."""
    results: dict[str, EvalResult] = {}
    for run in runs:
        rd = RunDir(run)
        found = [d for d in (EvalDir(run), rd.base, rd.extended) if d.done]
        if not found:
            raise ConfigError(f"{run}: no eval.json here or in base/ or extended/; pass a run directory")
        for d in found:
            results[run.name if d.root == run else f"{run.name}/{d.root.name}"] = EvalResult.load(d.root)
    out.mkdir(parents=True, exist_ok=True)
    window = min((r.window for r in results.values() if r.window), default=0)
    return write_report(out, "ctxstretch report", [f"- runs: {', '.join(str(r) for r in runs)}"], results, window)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
