"""The layout of a run directory, spelled once.

```
RUN/config.yaml           what ran (re-runnable)
RUN/metrics.jsonl         every stage's step records, the stage summaries, each evaluation
RUN/report.md, .html      for people (plus PNG plots)
RUN/model/                the final model, plain HF format
RUN/base/, RUN/extended/  evaluations of the base and the final model (EvalDir)
RUN/stages/NAME/          one per stage (StageDir): model/, data/ (build stages), eval/, checkpoints/, done.json
RUN/cache/                evaluation scratch, removed at the end
```
A comparison (`compare`) holds one run directory per recipe beside a shared `base/` evaluation and `compare.md`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def _under(name: str, doc: str | None = None) -> property:
    """A property: the path `name` inside the directory."""
    return property(lambda self: self.root / name, doc=doc)


def _eval_under(name: str) -> property:
    """A property: the evaluation folder `name` inside the directory."""
    return property(lambda self: EvalDir(self.root / name))


@dataclass(frozen=True)
class EvalDir:
    """One model's evaluation: `eval.json`, the held-out probes' partial results while it runs, lm-eval's outputs."""

    root: Path
    json = _under("eval.json")
    partial = _under("heldout.partial.json")
    lm_eval = _under("lm-eval")

    @property
    def done(self) -> bool:
        return self.json.exists()


@dataclass(frozen=True)
class StageDir:
    """One stage's folder."""

    root: Path
    model = _under("model")
    data = _under("data", "A build stage's dataset folder.")
    eval = _eval_under("eval")
    checkpoints = _under("checkpoints")
    metrics = _under("metrics.jsonl")
    done = _under("done.json", "The stage's summary, written when it finished (a finished stage is not redone).")
    logs = _under("logs", "The trackers' files when the stage trains on its own (in a run: the run's logs/).")

    @property
    def name(self) -> str:
        return self.root.name

    def summary(self) -> dict:
        return json.loads(self.done.read_text())


@dataclass(frozen=True)
class RunDir:
    """A run directory (`extend`, `train`, one recipe of `compare`)."""

    root: Path
    config = _under("config.yaml")
    metrics = _under("metrics.jsonl")
    report = _under("report.md")
    report_html = _under("report.html")
    model = _under("model")
    base = _eval_under("base")
    extended = _eval_under("extended")
    cache = _under("cache")
    stages = _under("stages")
    logs = _under("logs", "The trackers' files (TensorBoard): one folder per training stage.")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def stage(self, name: str) -> StageDir:
        return StageDir(self.stages / name)

    def dataset(self, ref: str | None) -> Path | None:
        """A stage's `data.dataset`: '@NAME' is build stage NAME's data, anything else a folder."""
        if not ref:
            return None
        return self.stage(ref[1:]).data if ref.startswith("@") else Path(ref)

    def finished_stages(self) -> list[StageDir]:
        """The stages that finished, by name."""
        return [StageDir(p.parent) for p in sorted(self.stages.glob("*/done.json"))]

    def evaluated_stages(self) -> list[StageDir]:
        """The stages evaluated after themselves, by name."""
        return [StageDir(p.parent.parent) for p in sorted(self.stages.glob("*/eval/eval.json"))]

    @property
    def finished(self) -> bool:
        """The final model is evaluated: the run is complete."""
        return self.extended.done


@dataclass(frozen=True)
class CompareDir:
    """A comparison: one run directory per recipe, the base model's evaluation shared between them."""

    root: Path
    base = _eval_under("base")
    table = _under("compare.md")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def run(self, recipe: str) -> RunDir:
        return RunDir(self.root / recipe)
