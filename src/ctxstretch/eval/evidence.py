"""The report's lead: held-out families with probe counts and intervals, and the external RULER suite beside them.

In-format probes (passkey, needle: templates that training rows also use) follow in `sections.py`, labelled so."""

from __future__ import annotations

from ..data.families import EVAL_FAMILIES, overlap
from .heldout import pooled, pooled_token, wilson
from .ruler import effective_length
from .suite import EvalResult

EFFECTIVE_RATIO = 0.85  # effective length: the longest length whose held-out score stays ≥ 85% of the shortest's


def heldout_effective_length(r: EvalResult) -> int | None:
    """Effective length on the pooled held-out families (None without held-out scores or when the shortest fails)."""
    per = pooled_token(r.heldout)
    return effective_length({n: t[0] for n, t in per.items()}, EFFECTIVE_RATIO) if per else None


def _cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / n:.0%} ({k}/{n}; {lo:.0%}–{hi:.0%})" if n else "–"


def _token_cell(t: tuple[float, float, int] | None) -> str:
    return "–" if t is None else f"{t[0]:.2f} ± {t[1]:.2f} ({t[2]} probes)"


def heldout_section(results: dict[str, EvalResult], window: int) -> list[str]:
    """Pooled answer-token accuracy per length (± its 95% interval, with the probe count) and each model's effective
    length; then pooled exact match with its Wilson interval; then one row per family and length."""
    scored = {k: r for k, r in results.items() if r.heldout}
    if not scored:
        return []
    names = list(scored)
    families = sorted({f for r in scored.values() for f in r.heldout}, key=list(EVAL_FAMILIES).index)
    lengths = sorted({n for r in scored.values() for per in r.heldout.values() for n in per})
    head = ["| length | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    tokens = [pooled_token(r.heldout) for r in scored.values()]
    exact = [pooled(r.heldout) for r in scored.values()]

    def mult(n: int) -> str:
        return f" ({n / window:g}× window)" if window else ""

    lines = ["## Held-out families (headline)", "",
             f"Families that no training row kind shares a template, filler or task with ({', '.join(families)}; "
             "see `ctxstretch/data/families.py`), on invented gazetteer prose and UUID tables that no training mix "
             "reads. Score: answer-token accuracy (the share of answer tokens that are the greedy choice, "
             "teacher-forced), all families pooled, ± its 95% interval over the probes.", "", *head]
    for n in lengths:
        cells = [_token_cell(t.get(n)) for t in tokens]
        lines.append(f"| {n:,}{mult(n)} | " + " | ".join(cells) + " |")
    effs = [heldout_effective_length(r) for r in scored.values()]
    lines.append(f"| **effective length** (≥ {EFFECTIVE_RATIO:.0%} of the shortest length's score) | "
                 + " | ".join("–" if e is None else f"{e:,}" for e in effs) + " |")
    lines += ["", "Whole answers exactly right (greedy exact match), pooled: correct/probes and the 95% Wilson "
              "interval.", "", *head]
    for n in lengths:
        cells = [_cell(*e.get(n, (0, 0))) for e in exact]
        lines.append(f"| {n:,}{mult(n)} | " + " | ".join(cells) + " |")
    lines += ["", "Per family (answer-token accuracy; exact match in brackets):", "",
              "| family @ length | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for f in families:
        for n in lengths:
            cells = []
            for r in scored.values():
                t = r.heldout.get(f, {}).get(n)
                cells.append("–" if t is None else f"{t['token_acc']:.2f} ({t['correct']}/{t['n']})")
            lines.append(f"| {f} @ {n:,} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def in_format_note() -> str:
    """Which training row kinds share what with the in-format families (one line for the report)."""
    parts = []
    for fam in ("passkey", "needle"):
        kinds = overlap(fam)
        same = [k for k, why in kinds.items() if "template" in why or "task" in why]
        parts.append(f"{fam} shares its template/task with the training row kinds {', '.join(same)}")
    return ("These probes are in-format: " + "; ".join(parts) + ". A model trained on those rows may have learned "
            "the format rather than long-range retrieval; read them beside the held-out families above.")


def external_section(results: dict[str, EvalResult]) -> list[str]:
    """lm-evaluation-harness RULER scores per task and length, one column per model, with the samples behind each
    cell; or why they were not run."""
    scored = {k: r for k, r in results.items() if r.external}
    notes = sorted({r.external_note for r in results.values() if r.external_note})
    if not scored:
        return ["## External suite: lm-evaluation-harness RULER", "", *[f"Not run: {n}" for n in notes], ""] \
            if notes else []
    names = list(scored)
    keys = sorted({(t, n) for r in scored.values() for t, per in r.external.items() for n in per})
    samples = {r.external_samples for r in scored.values()}
    counted = (f"{samples.pop()} samples per task and length" if len(samples) == 1 and None not in samples
               else "samples per cell: " + ", ".join(f"{k} {r.external_samples or 'all'}" for k, r in scored.items()))
    lines = ["## External suite: lm-evaluation-harness RULER", "",
             "lm-evaluation-harness's own corpus-free RULER tasks (its templates, generators and scoring, not ours), "
             f"run offline against the saved model directory: string-match score per task and length, 0–1 ({counted}; "
             "with a handful of samples a cell is a spot check, not a measurement).", "",
             "| task @ length | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for task, n in keys:
        cells = [r.external.get(task, {}).get(n) for r in scored.values()]
        lines.append(f"| {task} @ {n:,} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
    return [*lines, "", *[f"Not run for some models: {n}" for n in notes], *([""] if notes else [])]
