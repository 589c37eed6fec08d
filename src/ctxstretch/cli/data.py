"""`ctxstretch data …`: build training data as an Arrow dataset (`datasets.load_from_disk(OUT)`) plus `card.md`
and `ctxstretch.json` (tokenizer identity, row length).

- `pack`:         documents → fixed-length rows keeping document boundaries (long-document upsampling, mixing);
- `cip`:          LongSkywork chunk-interleaved rows from short documents;
- `synl`:         LongSkywork synthetic lengthy-table SFT examples;
- `selfinstruct`: Llama 2 Long self-instruct long QA written by a generator model;
- `impactful`:    LongRecipe rows of sentences rich in impactful tokens (scorer model or digit heuristic);
- `probes`:       passkey / needle / RULER retrieval probes as training rows (training seeds only).

Each command's flags are its builder's argument model (`ctxstretch.data.builders.REGISTRY`): one flag per field,
named, typed, defaulted and described by the field; `FLAGS` says where the command line spells a field otherwise
(a list given as comma-separated text, another flag name, a fixed set of choices).
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import ConfigError
from ..data.builders import REGISTRY, run_builder
from ..data.datasets import set_console
from .common import console, floats, guarded, ints, names

data_app = typer.Typer(no_args_is_help=True, help="Build training data: packed rows, CIP rows, SynL tables, "
                       "self-instruct QA, impactful-token rows, retrieval probes.")

# the commands, in the order `ctxstretch data --help` lists them, with their one-line help
COMMANDS = {
    "pack": "Pack documents into rows of --length tokens that keep document boundaries.",
    "cip": "LongSkywork chunk-interleaved pretraining rows from short documents.",
    "synl": "LongSkywork synthetic lengthy-table SFT examples (answers computed from the table).",
    "selfinstruct": "Llama 2 Long self-instruct long QA: document + generated question → answer.",
    "impactful": "LongRecipe impactful-token rows: keep the sentences that carry impactful tokens.",
    "probes": "Retrieval probes as training rows, from the evaluation's generators with training seeds.",
}


@dataclass(frozen=True)
class Flag:
    """How the command line spells one argument where its field does not say it all."""

    flag: str | None = None  # the option's name (default: --field-name)
    help: str | None = None  # the help text (default: the field's description)
    text: Callable[[str], Any] | None = None  # a list given as comma-separated text, and its reader
    default: Any = None  # the flag's own default (with `text`, in that text form)
    choices: tuple[str, ...] = ()  # the only values allowed, checked before anything runs


SOURCES = {"on_bad_record": Flag(choices=("fail", "skip"))}
FLAGS: dict[str, dict[str, Flag]] = {
    "pack": SOURCES,
    "cip": {**SOURCES, "interleave": Flag(help="round-robin or random", default="round-robin")},
    "synl": {"lengths": Flag(help="target lengths in tokens, e.g. 1k,4k", text=ints, default="1k,4k"),
             "fmt": Flag(flag="--format", help="markdown, csv, json or mixed"),
             "kinds": Flag(help="question kinds, cycled", text=names, default="lookup,extremum,count,two_hop")},
    "selfinstruct": SOURCES,
    "impactful": SOURCES,
    "probes": {"kinds": Flag(help="passkey, needle and RULER tasks (niah_multikey, niah_multivalue, …)", text=names,
                             default="passkey,needle,niah_multikey,niah_multivalue"),
               "lengths": Flag(help="probe lengths in tokens, e.g. 256,1k", text=ints, default="1k,4k"),
               "depths": Flag(help="needle depths for passkey/needle, fractions",
                              text=partial(floats, flag="--depths"), default="0,0.25,0.5,0.75,1")},
}
P = inspect.Parameter


def command_line(ctx: typer.Context) -> str:
    """The command as run, rebuilt from its parsed parameters (defaults included)."""
    parts = ["ctxstretch", *ctx.command_path.split()[1:]]
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if p.param_type_name == "argument":
            parts += [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
        elif p.param_type_name == "option" and value is not None:
            if getattr(p, "is_flag", False):
                flag = p.opts[0] if value else (p.secondary_opts or [None])[0]
                parts += [flag] if flag else []
            else:
                parts += [p.opts[0], str(value)]
    return shlex.join(parts)


def field_order(kind: str) -> list[str]:
    """The builder's fields as the command lists them: the model, the builder's own fields, the ones it shares with
    other builders, the seed."""
    args = REGISTRY[kind].args
    own = [n for n in vars(args).get("__annotations__", {}) if n in args.model_fields]
    shared = [n for n in args.model_fields if n not in own and n not in ("model", "seed")]
    return ["model", *[n for n in own if n != "model"], *shared, "seed"]


def parameters(kind: str) -> list[inspect.Parameter]:
    """The command's parameters, from the builder's argument model: its positional fields as arguments, `--out`,
    one option per other field, `--force`."""
    spec, flags = REGISTRY[kind], FLAGS[kind]
    fields = spec.args.model_fields
    params = [P("ctx", P.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, annotation=Annotated[fields[n].annotation,
                                                                  typer.Argument(help=fields[n].description)])
               for n in spec.positional]
    params.append(P("out", P.POSITIONAL_OR_KEYWORD,
                    annotation=Annotated[Path, typer.Option(help="dataset folder to create")]))
    for name in field_order(kind):
        if name in spec.positional:
            continue
        f, hint = fields[name], flags.get(name, Flag())
        kind_of = str if hint.text else f.annotation
        if hint.default is not None:
            default = hint.default
        else:
            default = P.empty if f.is_required() else f.get_default(call_default_factory=True)
        option = typer.Option(*([hint.flag] if hint.flag else []), help=hint.help or f.description)
        params.append(P(name, P.POSITIONAL_OR_KEYWORD, annotation=Annotated[kind_of, option], default=default))
    params.append(P("force", P.POSITIONAL_OR_KEYWORD,
                    annotation=Annotated[bool, typer.Option(help="overwrite an existing --out")], default=False))
    return params


def build_command(kind: str) -> Callable[..., None]:
    """The `ctxstretch data KIND` command: reads its flags into the builder's arguments and runs the builder."""
    flags = FLAGS[kind]

    def command(ctx: typer.Context, out: Path, force: bool, **given: Any) -> None:
        args = {}
        for name, value in given.items():
            hint = flags.get(name, Flag())
            flag = hint.flag or "--" + name.replace("_", "-")
            if hint.choices and value not in hint.choices:
                raise ConfigError(f"{flag} must be {' or '.join(hint.choices)}, not {value!r}")
            args[name] = hint.text(value) if hint.text else value
        set_console(console)
        w = run_builder(kind, args, out, force=force, command=command_line(ctx))
        console.print(f"[green]done[/]: {out} ({w.rows:,} rows, {w.real_tokens:,} tokens)", highlight=False)

    command.__name__ = command.__qualname__ = f"{kind}_cmd"
    command.__doc__ = COMMANDS[kind]
    run = guarded(command)
    run.__signature__ = inspect.Signature(parameters(kind), return_annotation=None)  # type: ignore[attr-defined]
    return run


for _kind in COMMANDS:
    data_app.command(_kind)(build_command(_kind))
