"""The records readers hand on, and what happens to bad ones: a `Document` (text, source, where), `DataError` (one
line: file:line, the problem and the fix) and `BadRecords`, the policy that fails at the first bad record
(`"fail"`) or counts it and goes on (`"skip"`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import UserError

OnBad = Literal["fail", "skip"]
_KEEP_EXAMPLES = 100  # bad records remembered individually; the rest are only counted


class DataError(UserError):
    """Input data that cannot be used, phrased for the user (one line: file:line, the problem and the fix)."""


@dataclass(frozen=True)
class Document:
    """One document: its text, the source it came from (for mixing weights) and where (`file:line`)."""

    text: str
    source: str
    where: str


@dataclass(frozen=True)
class BadRecord:
    path: str
    line: int  # 1-based line (JSONL, text) or row (Parquet, Arrow, datasets) number
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class BadRecords:
    """Collects bad records under a policy: "fail" raises `DataError` at the first, "skip" counts and continues."""

    policy: OnBad = "fail"
    count: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[BadRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("fail", "skip"):
            raise DataError(f"on_bad_record must be 'fail' or 'skip', not {self.policy!r}")

    def add(self, path: str | Path, line: int, reason: str, fix: str) -> None:
        record = BadRecord(str(path), line, reason)
        if self.policy == "fail":
            raise DataError(f"{record}; {fix}, or skip bad records (--on-bad-record skip)")
        self.count += 1
        self.reasons[reason.split(" (")[0]] += 1
        if len(self.examples) < _KEEP_EXAMPLES:
            self.examples.append(record)
