"""`report.md`: a before/after table and plots, for people; `evaluate_model` and `report_runs` are what `ctxstretch
eval` and `ctxstretch report` run."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from rich.console import Console

from ..config import ConfigError
from ..rundir import EvalDir, RunDir
from .evidence import external_section, heldout_section, in_format_note
from .perplexity import fit_power_law, loss_vs_context
from .plots import heatmap, loss_curves
from .ruler import effective_length, mean_by_length
from .suite import EvalConfig, EvalResult, doublings
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


def evaluate_model(model: str, out: Path, cfg: EvalConfig, *, backend: str = "transformers",
                   vllm_env: Path | None = None, device: str = "auto", force: bool = False,
                   trust_remote_code: bool = False, console: Console | None = None) -> Path:
    """`ctxstretch eval`: evaluate the local model `model` (or 'embedded') into a new `out` — eval.json, report.md/
    html and plots; returns report.md's path. Empty `cfg.lengths`: `standalone_lengths` of the model's window.
    lm-eval's corpus-free RULER tasks among `cfg.lm_eval_tasks` run in lm-eval's own environment. A missing backend
    or extra, an unknown task and an existing `out` fail before any work."""
    import shutil

    from rich.progress import Progress

    from ..config import check_out_dir
    from ..models import load, load_config, resolve
    from ..rope import original_window
    from ..train.parallel import resolve_device
    from . import lmeval_ruler
    from .backend import check_backend
    from .short import require_lm_eval
    from .suite import evaluate, standalone_lengths

    console = console or Console(stderr=True)
    external = [t for t in cfg.lm_eval_tasks if t in lmeval_ruler.TASKS]  # run in lm-eval's own environment
    in_process = [t for t in cfg.lm_eval_tasks if t not in lmeval_ruler.TASKS]
    check_backend(backend, vllm_env)  # missing extras fail in the first second
    if in_process:
        require_lm_eval()
    path = resolve(model)
    window = original_window(load_config(path, trust_remote_code))
    lengths = cfg.lengths or standalone_lengths(window)
    if external:
        lmeval_ruler.check_tasks(external, lengths)
    cfg = cfg.model_copy(update={"lengths": lengths, "lm_eval_tasks": in_process})
    check_out_dir(out, force)
    shutil.rmtree(out, ignore_errors=True)
    if backend == "vllm":
        from .vllm_eval import evaluate_dir

        out.mkdir(parents=True)
        with Progress(console=console) as progress:
            result = evaluate_dir(path, cfg, window, max(lengths), vllm_env, out / "vllm.log", progress)
    else:
        m, tok = load(path, resolve_device(device), trust_remote_code)
        with Progress(console=console) as progress:
            result = evaluate(m, tok, cfg, window, max(lengths), None, progress)
    if external:
        console.print(f"lm-eval RULER: {', '.join(external)} at {lengths} (its own environment, offline)")
        result.external = lmeval_ruler.run_ruler(path, external, lengths, cfg.lm_eval_limit or 4, out / "lm-eval")
    result.save(out)
    return write_report(out, f"ctxstretch eval: {model}", [f"- window {window:,}; lengths {lengths}"],
                        {Path(model).name or "model": result}, window)


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown_to_html(lines: list[str], base: Path, title: str) -> str:
    """A self-contained HTML page (plots embedded) from the report's simple markdown."""
    out, in_table, in_list = [], False, False

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    for line in lines:
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("## "):
            out.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{inline(line[2:])}</h1>")
        elif line.startswith("- "):
            out.append(("" if in_list else "<ul>") + f"<li>{inline(line[2:])}</li>")
            in_list = True
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue
            tag = "th" if not in_table else "td"
            out.append(("" if in_table else "<table>") + "<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>"
                                                                      for c in cells) + "</tr>")
            in_table = True
        elif m := re.match(r"!\[(.*?)\]\((.+?)\)", line):
            data = base64.b64encode((base / m.group(2)).read_bytes()).decode()
            out.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "img{max-width:100%}code{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
