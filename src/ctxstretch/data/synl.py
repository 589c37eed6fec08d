"""LongSkywork (Zhao et al., 2024, §2 "SynL"): Synthetic Lengthy Tables, long-context SFT data whose answers are
right by construction. A seeded random table with typed columns (row keys, names, categories, integers, dates and
a reference to another row) is rendered as markdown or CSV, followed by one question of four kinds:

- lookup:   the value of column C in the row with key K;
- extremum: the key of the row with the largest / smallest value of an integer column (values are distinct);
- count:    how many rows pass a filter (category equal to v, integer above/below x, date after/before d);
- two_hop:  look up the referenced row of K (e.g. its manager), then the value of column C there.

Rows are added until the prompt plus answer reach the target length in tokens. Templates, column names and value
ranges are our reconstruction (**choice**), all parameters.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .packing import answer_row
from .records import DataError

KINDS = ("lookup", "extremum", "count", "two_hop")
FORMATS = ("markdown", "csv")
COLUMN_KINDS = ("key", "name", "category", "integer", "date", "ref")
FIRST_NAMES = ("Ada", "Alan", "Amara", "Bea", "Bruno", "Carla", "Chen", "Dara", "Diego", "Elena", "Emeka", "Farah",
               "Felix", "Grace", "Hana", "Hugo", "Ines", "Ivan", "Jonas", "Kenji", "Lara", "Leon", "Maya", "Mateo",
               "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Vera", "Wei", "Yara", "Zoe")
LAST_NAMES = ("Abbott", "Baker", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Haddad", "Ito", "Jensen", "Kim",
              "Lopez", "Meyer", "Novak", "Okafor", "Patel", "Quist", "Rossi", "Silva", "Tanaka", "Ueda", "Varga",
              "Weber", "Xu", "Young", "Zhang")
CATEGORIES = ("Engineering", "Finance", "Legal", "Marketing", "Operations", "Research", "Sales", "Support")
_KEY_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
INTRO = "The table below has {n} rows, one per employee. Answer the question after it using only the table.\n\n"
QUESTION = "\n\nQuestion: {q}\nAnswer:"


@dataclass(frozen=True)
class Column:
    """A typed column. kind: key (unique row key), name, category, integer (distinct values in [low, high)),
    date (ISO days from `low` = days since 1970, range `high` days), ref (the key of an earlier row)."""

    name: str
    kind: str
    low: int = 0
    high: int = 0


DEFAULT_COLUMNS = (Column("id", "key"), Column("name", "name"), Column("department", "category"),
                   Column("salary", "integer", 20_000, 200_000), Column("start_date", "date", 10_957, 9_131),
                   Column("manager", "ref"))


@dataclass
class Table:
    """Column name → values, all (n,) numpy arrays: str for key/name/category/ref, int64 for integer, datetime64[D]
    for date. Any prefix `table.head(n)` is itself a valid table (references only point to earlier rows)."""

    columns: tuple[Column, ...]
    values: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def head(self, n: int) -> Table:
        return Table(self.columns, {k: v[:n] for k, v in self.values.items()})

    def of_kind(self, kind: str) -> list[Column]:
        return [c for c in self.columns if c.kind == kind]

    @property
    def key(self) -> Column:
        return self.of_kind("key")[0]

    def cell(self, column: str, row: int) -> str:
        return str(self.values[column][row])

    def lines(self, fmt: str) -> tuple[str, list[str]]:
        """(header, row lines) of the rendered table, each line ending in a newline."""
        names = [c.name for c in self.columns]
        cols = [self.values[n].astype(str) for n in names]
        if fmt == "markdown":
            header = "| " + " | ".join(names) + " |\n|" + "|".join("---" for _ in names) + "|\n"
            return header, ["| " + " | ".join(r) + " |\n" for r in zip(*cols, strict=True)]
        if fmt == "csv":
            def line(cells: Sequence[str]) -> str:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerow(cells)
                return buf.getvalue()

            return line(names), [line(r) for r in zip(*cols, strict=True)]
        raise DataError(f"table format must be one of {', '.join(FORMATS)}, not {fmt!r}")

    def render(self, fmt: str) -> str:
        header, rows = self.lines(fmt)
        return header + "".join(rows)


def make_table(rng: np.random.Generator, n: int, columns: Sequence[Column] = DEFAULT_COLUMNS) -> Table:
    """A random table of `n` rows. The key column is required; keys and integer values are distinct."""
    kinds = [c.kind for c in columns]
    if kinds.count("key") != 1 or any(k not in COLUMN_KINDS for k in kinds):
        raise DataError(f"a SynL table needs exactly one key column and kinds from {', '.join(COLUMN_KINDS)}")
    values: dict[str, np.ndarray] = {}
    codes = rng.choice(36**6, size=n, replace=False)
    digits = (codes[:, None] // 36 ** np.arange(5, -1, -1)) % 36
    keys = np.array(["".join(r) for r in _KEY_ALPHABET[digits]]) if n else np.zeros(0, dtype=str)
    for c in columns:
        if c.kind == "key":
            values[c.name] = keys
        elif c.kind == "name":
            values[c.name] = np.char.add(np.char.add(np.array(FIRST_NAMES)[rng.integers(0, len(FIRST_NAMES), n)],
                                                     " "), np.array(LAST_NAMES)[rng.integers(0, len(LAST_NAMES), n)])
        elif c.kind == "category":
            values[c.name] = np.array(CATEGORIES)[rng.integers(0, len(CATEGORIES), n)]
        elif c.kind == "integer":
            if c.high - c.low < n:
                raise DataError(f"column {c.name}: {n} distinct integers do not fit in [{c.low}, {c.high})")
            values[c.name] = rng.choice(c.high - c.low, size=n, replace=False).astype(np.int64) + c.low
        elif c.kind == "date":
            values[c.name] = (np.datetime64(0, "D") + c.low + rng.integers(0, max(1, c.high), n)).astype("M8[D]")
        else:  # ref: row i refers to a row before it (row 0 to itself), so every prefix of the table is closed
            target = (rng.random(n) * np.arange(n)).astype(np.int64)
            values[c.name] = keys[target]
    return Table(tuple(columns), values)


@dataclass(frozen=True)
class Question:
    """One question and its answer, with the fields it was built from (so a reader of the table can recompute it).
    op: "=", ">", "<" (integer / category filters), "after", "before" (dates), "max", "min" (extremum)."""

    kind: str
    text: str
    answer: str
    column: str
    key: str = ""
    ref: str = ""
    op: str = ""
    value: str = ""


def ask(table: Table, kind: str, rng: np.random.Generator) -> Question:
    """A question of `kind` about `table`, its answer computed from the table's values."""
    n, key = len(table), table.key.name
    keys = table.values[key]
    row = int(rng.integers(0, n))
    plain = [c for c in table.columns if c.kind != "key"]
    if kind == "lookup":
        col = plain[int(rng.integers(0, len(plain)))].name
        return Question(kind, f"What is the {col} of the row whose {key} is {keys[row]}?", table.cell(col, row),
                        col, key=str(keys[row]))
    if kind == "extremum":
        ints = table.of_kind("integer")
        if not ints:
            raise DataError("extremum questions need an integer column")
        col = ints[int(rng.integers(0, len(ints)))].name
        op = ("max", "min")[int(rng.integers(0, 2))]
        vals = table.values[col]
        best = int(np.argmax(vals) if op == "max" else np.argmin(vals))
        word = "largest" if op == "max" else "smallest"
        return Question(kind, f"Which {key} has the {word} {col}?", str(keys[best]), col, op=op)
    if kind == "count":
        cands = [c for c in table.columns if c.kind in ("category", "integer", "date")]
        c = cands[int(rng.integers(0, len(cands)))]
        vals, pivot = table.values[c.name], table.values[c.name][row]
        if c.kind == "category":
            op, hit, phrase = "=", vals == pivot, f"is {pivot}"
        elif c.kind == "integer":
            op = (">", "<")[int(rng.integers(0, 2))]
            hit = vals > pivot if op == ">" else vals < pivot
            phrase = f"is {'greater' if op == '>' else 'less'} than {pivot}"
        else:
            op = ("after", "before")[int(rng.integers(0, 2))]
            hit = vals > pivot if op == "after" else vals < pivot
            phrase = f"is {op} {pivot}"
        return Question(kind, f"How many rows have a {c.name} that {phrase}?", str(int(hit.sum())), c.name, op=op,
                        value=str(pivot))
    if kind == "two_hop":
        refs = table.of_kind("ref")
        if not refs:
            raise DataError("two_hop questions need a ref column")
        ref = refs[0].name
        target = int(np.flatnonzero(keys == table.values[ref][row])[0])
        col = [c for c in plain if c.kind != "ref"][int(rng.integers(0, len(plain) - len(refs)))].name
        text = f"What is the {col} of the {ref} of the row whose {key} is {keys[row]}?"
        return Question(kind, text, table.cell(col, target), col, key=str(keys[row]), ref=ref)
    raise DataError(f"question kind must be one of {', '.join(KINDS)}, not {kind!r}")


@dataclass
class SynLExample:
    """One SFT example: `prompt` (intro, table, question) and `answer`; `n_tokens` = prompt + answer (+ EOS)."""

    prompt: str
    answer: str
    question: Question
    format: str
    n_rows: int
    n_tokens: int
    target: int
    meta: dict = field(default_factory=dict)


def _n_tokens(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def synl_example(tokenizer, target: int, rng: np.random.Generator, *, fmt: str = "markdown", kind: str = "lookup",
                 columns: Sequence[Column] = DEFAULT_COLUMNS, eos: bool = True) -> SynLExample:
    """The example with the most table rows whose prompt + " " + answer (+ EOS) fits in `target` tokens.

    Rows are drawn once (a table comfortably larger than needed, sized from per-row token counts) and the table is
    grown or shrunk as a prefix until the exact token count lands in (target − 2 rows, target].
    """
    table_seed, question_seed = rng.integers(0, 2**63, size=2)
    probe = make_table(np.random.default_rng(table_seed), 64, columns)
    header, lines = probe.lines(fmt)
    per_row = max(1.0, float(np.mean(_n_tokens(tokenizer, lines))))
    fixed = sum(_n_tokens(tokenizer, [INTRO.format(n=100), header, QUESTION.format(q="x" * 80)])) + 8
    n_max = max(8, int((target - fixed) / per_row * 1.25) + 8)
    full = make_table(np.random.default_rng(table_seed), n_max, columns)

    def build(n: int) -> SynLExample:
        t = full.head(n)
        q = ask(t, kind, np.random.default_rng(question_seed))
        prompt = INTRO.format(n=n) + t.render(fmt) + QUESTION.format(q=q.text)
        used = sum(_n_tokens(tokenizer, [prompt, " " + q.answer])) + int(eos)
        return SynLExample(prompt, q.answer, q, fmt, n, used, target)

    n = int(np.clip((target - fixed) / per_row, 1, n_max))
    best: SynLExample | None = None
    for _ in range(12):
        ex = build(n)
        if ex.n_tokens <= target:
            best = ex if best is None or ex.n_rows > best.n_rows else best
            grow = int((target - ex.n_tokens) / per_row)
            if grow < 1 or n >= n_max:
                break
            n = min(n_max, n + grow)
        else:
            if n == 1:
                break
            n = max(1, n - max(1, int(np.ceil((ex.n_tokens - target) / per_row))))
            if best is not None and n <= best.n_rows:
                break
    if best is None:
        raise DataError(f"a SynL prompt with one table row needs more than {target} tokens; use a longer length")
    return best


def synl_examples(tokenizer, lengths: Sequence[int], count: int, seed: int = 0, *, fmt: str = "mixed",
                  kinds: Sequence[str] = KINDS, columns: Sequence[Column] = DEFAULT_COLUMNS) -> Iterator[SynLExample]:
    """`count` examples per target length; question kinds cycle through `kinds`; `fmt` "mixed" alternates
    markdown and CSV. Example i of length L depends only on (seed, L, i)."""
    formats = FORMATS if fmt == "mixed" else (fmt,)
    for fm in formats:
        if fm not in FORMATS:
            raise DataError(f"--format must be markdown, csv or mixed, not {fmt!r}")
    for length in lengths:
        for i in range(count):
            rng = np.random.default_rng([seed, length, i])
            yield synl_example(tokenizer, length, rng, fmt=formats[i % len(formats)], kind=kinds[i % len(kinds)],
                               columns=columns)


def synl_row(tokenizer, ex: SynLExample, length: int, pad_id: int = 0, eos_id: int | None = None
             ) -> dict[str, np.ndarray]:
    """One training row of `length` tokens: prompt, answer, EOS, then padding. Loss only on the answer and EOS
    (SFT); position ids 0.. over the example, padding in its own segment. Fields (length,) int64."""
    ids = [*tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]]
    answer = [*tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"]]
    answer += [eos_id] if eos_id is not None else []
    n = len(ids) + len(answer)
    if n > length:
        raise DataError(f"a SynL example of {n} tokens does not fit a row of {length}")
    return answer_row(np.asarray(ids), np.asarray(answer), length, pad_id)
