"""The seed recipes as pipelines of stages: `llama2-long`, `longskywork`, `longrecipe`, the baselines, and the
`extend` default. A recipe module turns its parameters into a `PipelineConfig`; presets/NAME.yaml holds them."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError, parse
from . import baselines, extend, llama2_long, longrecipe, longskywork
from .base import RecipeParams
from .config import PipelineConfig, load_pipeline, load_yaml

PRESETS = Path(__file__).parent / "presets"
RECIPES: dict[str, tuple[type[RecipeParams], Callable[..., PipelineConfig]]] = {
    "llama2-long": (llama2_long.Llama2LongParams, llama2_long.pipeline),
    "longskywork": (longskywork.LongSkyworkParams, longskywork.pipeline),
    "longrecipe": (longrecipe.LongRecipeParams, longrecipe.pipeline),
    "extend": (extend.ExtendParams, extend.from_params),
    **{name: (baselines.BaselineParams, baselines.pipeline) for name in baselines.ROPES},
}
# each recipe module's published claims, checked by `compare` on what was measured
CLAIMS = (longrecipe.claims, baselines.claims, longskywork.claims)


def recipe_params(data: dict, where: str) -> RecipeParams:
    """Validate `data` (a mapping with `recipe: NAME` and that recipe's parameters)."""
    name = str(data.get("recipe"))
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(RECIPES)}"
        raise ConfigError(f"{where}: unknown recipe '{name}'; {hint}")
    return parse(RECIPES[name][0], data, where)


def expand(params: RecipeParams, window: int) -> PipelineConfig:
    """The recipe's pipeline for a model of `window` tokens, its derived settings filled in (the rule is appended
    to the pipeline's description)."""
    params, rule = params.resolved(window)
    pipe = RECIPES[params.recipe][1](params, window)
    return pipe.model_copy(update={"description": f"{pipe.description} (settings: {rule})".strip()})


def read_spec(spec: str) -> tuple[dict, str]:
    """A recipe YAML file, or the name of a shipped preset → (its mapping, where it came from)."""
    path = Path(spec)
    if not path.exists() and (PRESETS / f"{spec}.yaml").exists():
        path = PRESETS / f"{spec}.yaml"
    elif not path.exists():
        names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        close = difflib.get_close_matches(spec, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"presets: {', '.join(names)}"
        raise ConfigError(f"{spec}: no such recipe file or preset; {hint}")
    return load_yaml(path), str(path)


def pipeline_from(data: dict, where: str, window_of: Callable[[str], int], **overrides) -> PipelineConfig:
    """A pipeline from a YAML mapping: either `recipe: NAME` + parameters, or an explicit `stages:` list.
    `overrides` (e.g. model, target, steps from the command line) replace the mapping's values when not None."""
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    if "recipe" in data:
        params = recipe_params(data, where)
        return expand(params, window_of(params.model))
    if "stages" not in data:
        raise ConfigError(f"{where}: give either 'recipe: NAME' (one of {', '.join(RECIPES)}) or a 'stages:' list")
    if "steps" in data:
        raise ConfigError(f"{where}: 'steps' applies to recipes; set train.steps on each stage instead")
    return load_pipeline(data, where)
