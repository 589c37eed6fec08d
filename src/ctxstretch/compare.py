"""`ctxstretch compare`: run several recipes on one model under one stated budget and put their claims side by side
(`compare.md`, plus the combined `report.md`/`report.html` with heatmaps and loss curves).

Every recipe gets the same main-stage budget (optimizer steps × rows per step); its other stages scale with it.
The base model is evaluated once and shared. Each recipe runs in `OUT/RECIPE/` and is skipped when finished, so a
killed comparison resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .eval.evidence import heldout_effective_length
from .eval.heldout import pooled_token
from .eval.perplexity import far_bucket
from .eval.report import write_report
from .eval.suite import EvalResult
from .models import load_config, resolve
from .plan import Shape, flops_per_token, read_shape
from .recipes import CLAIMS, expand, recipe_params
from .recipes.pipeline import Run
from .rope import original_window
from .rundir import CompareDir, RunDir


@dataclass
class Outcome:
    """What one recipe run cost and reached."""

    name: str
    result: EvalResult
    stage_results: dict[str, EvalResult]
    tokens: int
    wall_s: float  # stages only (training, data building, merging); evaluation excluded
    flops: float

    def at(self, kind: str, length: int, result: EvalResult | None = None) -> float | None:
        """Score of `kind` ("heldout": pooled held-out families; "passkey", "needle": in-format) at `length`."""
        r = result or self.result
        if kind == "heldout":
            return _held(r, length)
        grid = getattr(r, kind)
        return None if grid is None else grid.by_length().get(length)


def run_compare(names: list[str], out: Path, *, model: str = "embedded", target: int = 0, steps: int | None = None,
                batch_size: int | None = None, overrides: dict | None = None, console: Console | None = None) -> Path:
    """Run each recipe (skipping finished ones) and write compare.md; returns its path."""
    console = console or Console()
    for n in names:  # unknown names fail before anything runs, with a did-you-mean
        recipe_params({"recipe": n}, "--recipes")
    settings = {"model": model, "target": target, **({"steps": steps} if steps is not None else {}),
                **({"batch_size": batch_size} if batch_size is not None else {}), **(overrides or {})}
    path = resolve(model)
    window = original_window(load_config(path))
    # one budget for all: the first recipe's derived steps and rows, unless given
    first, _ = recipe_params({"recipe": names[0], **settings}, "--recipes").resolved(window)
    settings |= {"steps": settings.get("steps", first.steps),
                 "batch_size": settings.get("batch_size", first.batch_size)}
    params = [recipe_params({"recipe": n, **settings}, "--recipes") for n in names]
    out.mkdir(parents=True, exist_ok=True)
    cmp = CompareDir(out)
    outcomes = []
    for p in params:
        pipeline = expand(p, window)
        run = cmp.run(p.recipe)
        if not run.finished:
            Run(pipeline, run.root, resume=run.root.exists(), console=console, base_eval=cmp.base.root,
                title=f"ctxstretch compare: {p.recipe}").execute()
        outcomes.append(outcome(p.recipe, run, read_shape(path)))
    resolved = expand(params[0], window).resolved(window)
    base = EvalResult.load(cmp.base.root)
    return write_compare(out, outcomes, base, window, resolved.target, settings, console)


def outcome(name: str, run: RunDir, shape: Shape) -> Outcome:
    """Read a finished run directory back."""
    summaries = [sd.summary() for sd in run.finished_stages()]
    stage_results = {sd.name: EvalResult.load(sd.eval.root) for sd in run.evaluated_stages()}
    tokens = sum(s.get("tokens", 0) for s in summaries)
    flops = sum(s["tokens"] * flops_per_token(shape, s["train_length"]) for s in summaries if s.get("tokens"))
    return Outcome(name, EvalResult.load(run.extended.root), stage_results, tokens,
                   sum(s.get("wall_s", 0.0) for s in summaries), flops)


def claims(outs: dict[str, Outcome], base: EvalResult, window: int, target: int) -> list[tuple[str, bool, str]]:
    """The recipes' published claims (each recipe module's `claims`), checked on what was measured; a claim whose
    recipes were not run is left out."""
    return [c for fn in CLAIMS for c in fn(outs, base, window, target)]


def write_compare(out: Path, outs: list[Outcome], base: EvalResult, window: int, target: int, settings: dict,
                  console: Console) -> Path:
    """compare.md: one row per recipe (and per evaluated intermediate stage), the claims, and the plots."""
    goal, evaluated = target, base.passkey.lengths
    target = goal if goal in evaluated else max(evaluated)  # the longest length evaluated when short of the goal
    far, near = far_bucket(base, target), f"0-{window}"
    results = {"base": base}
    for o in outs:
        results.update({f"{o.name}/{s}": r for s, r in o.stage_results.items()})
        results[o.name] = o.result
    write_report(out, "ctxstretch compare", [f"- settings: `{json.dumps(settings)}`"], results, window)
    head = ["rank", "recipe", f"held-out @ {target:,}", f"held-out @ {window:,}", "held-out effective length",
            f"passkey @ {target:,} (in-format)", f"needle @ {target:,} (in-format)", f"loss {far}",
            f"Δ loss {near} vs base", f"Δ short-context loss ({window:,}-token rows)", "tokens trained", "est. FLOPs",
            "wall (min)"]

    def retrieval(r: EvalResult) -> list[str]:
        return [_count(r, target), _count(r, window), _num_int(heldout_effective_length(r)),
                _pct(r.passkey.by_length().get(target)), _pct(_needle(r, target))]

    rows = [["", "base", *retrieval(base), _num(base.buckets.get(far)), _num(base.buckets.get(near)),
             _num(_short(base)), "0", "0", "0"]]
    # ranked by held-out retrieval at the target, then by the effective length (in-format probes never rank)
    ranked = sorted(outs, key=lambda o: (-(_held(o.result, target) or 0.0),
                                         -(heldout_effective_length(o.result) or 0)))
    for rank, o in enumerate(ranked, 1):
        for label, r in [*((f"{o.name} (after {s})", r) for s, r in o.stage_results.items()), (o.name, o.result)]:
            final = r is o.result
            rows.append([str(rank) if final else "", label, *retrieval(r),
                         _num(r.buckets.get(far)), _delta(r.buckets.get(near), base.buckets.get(near)),
                         _delta(_short(r), _short(base)),
                         f"{o.tokens:,}" if final else "", f"{o.flops:.2e}" if final else "",
                         f"{o.wall_s / 60:.1f}" if final else ""])
    checks = claims({o.name: o for o in outs}, base, window, target)
    lines = ["# ctxstretch compare", "",
             f"Model `{settings.get('model', 'embedded')}` (window {window:,}) → target {goal:,}"
             + (f", evaluated up to {target:,}" if target != goal else "") + "; settings "
             f"`{json.dumps(settings)}`. Wall time counts the recipe's stages (training, data building, merging), "
             "not evaluation; Δ columns are against the base, whose row gives its own loss. Held-out: answer-token "
             "accuracy on the pooled held-out families (no training row kind shares their template, filler or task), "
             "± its 95% interval (probes); "
             "recipes are ranked by it. Passkey and needle are in-format (training rows use their templates). "
             "FLOPs per trained token: 6·N + 12·layers·row·heads·head_dim (`ctxstretch plan`).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             *["| " + " | ".join(r) + " |" for r in rows], ""]
    if checks:
        lines += ["## Claims", "", "| claim | measured | reproduced |", "|---|---|---|",
                  *[f"| {c} | {m} | {'yes' if ok else '**no**'} |" for c, ok, m in checks], ""]
    lines += ["## Plots", "", "![needle](needle.png)", "", "![passkey](passkey.png)", "",
              "![loss by position](loss_by_position.png)", "", "All models side by side: [report.md](report.md).", ""]
    path = CompareDir(out).table
    path.write_text("\n".join(lines))
    table = Table(*head, title="compare")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    return path


def _held(r: EvalResult, n: int) -> float | None:
    t = pooled_token(r.heldout).get(n)
    return None if t is None else t[0]


def _count(r: EvalResult, n: int) -> str:
    t = pooled_token(r.heldout).get(n)
    return "–" if t is None else f"{t[0]:.2f} ± {t[1]:.2f} ({t[2]})"


def _num_int(x: int | None) -> str:
    return "–" if x is None else f"{x:,}"


def _short(r: EvalResult) -> float | None:
    return None if r.short is None else r.short.get("loss")


def _needle(r: EvalResult, n: int) -> float | None:
    return None if r.needle is None else r.needle.by_length().get(n)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _delta(x: float | None, ref: float | None) -> str:
    return "–" if x is None or ref is None else f"{x - ref:+.3f}"

