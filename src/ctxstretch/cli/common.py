"""What every command shares: the console (stderr), the one error guard, and readers of list-valued flags."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..atomic import disk_full
from ..config import ConfigError, UserError

console = Console(stderr=True)
P = ParamSpec("P")
R = TypeVar("R")


def guarded(command: Callable[P, R]) -> Callable[P, R]:
    """A command whose user errors print one red line on stderr and exit with code 2 (Ctrl-C: exit 130).
    Typer reads the options from the wrapped function's signature."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            fail(e)
        except OSError as e:  # a full disk met outside the atomic writers (which raise DiskFullError themselves)
            if (err := disk_full(e, e.filename)) is None:
                raise
            fail(err)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: resume with --resume")
            sys.exit(130)

    return run


def fail(error: BaseException) -> NoReturn:
    """The one error line, then exit code 2."""
    console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def ints(text: str | None) -> list[int]:
    """'256,1k,4096' → [256, 1024, 4096] (k = 1024); None or '' → []."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(float(part.rstrip("k")) * mult)
        except ValueError:
            raise ConfigError(f"--lengths: '{part}' is not a length (use e.g. 1k,4096)") from None
        if value <= 0:
            raise ConfigError(f"--lengths: {value} must be positive")
        out.append(value)
    return out


def floats(text: str, flag: str) -> list[float]:
    """'0.1,0.5,0.9' → depths in [0, 1]."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: '{text}' is not a comma-separated list of numbers (e.g. 0.1,0.5,0.9)") from None
    if not values or any(not 0 <= v <= 1 for v in values):
        raise ConfigError(f"{flag}: give depths between 0 and 1 (e.g. 0.1,0.5,0.9)")
    return values


def names(text: str | None) -> list[str]:
    """'a, b,,c' → ['a', 'b', 'c']."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]
