"""Held-out probe families: retrieval tasks that no training row kind generates, on a text no training mix reads.

- `first_sentence`: Llama 2 Long's FIRST-SENTENCE-RETRIEVAL (Xiong et al., 2023, §4.3): a long document, then a
  request to quote its opening sentence — the answer sits at distance ≈ the whole length.
- `kv_uuid`: key–value retrieval over UUID keys (Liu et al., 2023, "Lost in the Middle", §4): a JSON object of
  UUID keys and short hex values; the value of one key, asked at the end, sits at the probe's depth.
- `doc_fact`: one fact about an invented town, stated once at the probe's depth inside a long gazetteer
  (`data/prose.py`), asked back in other words at the end.

Every probe has an exact answer (greedy exact match), is exactly `length` tokens, and is built from evaluation
seeds only. The template strings are declared in `data/families.py`, where a test checks that no training row kind
shares any of them, nor the gazetteer filler, nor the task.
"""

from __future__ import annotations

import numpy as np

from . import prose
from .probes import Example, ProbeBuilder

FAMILIES = ("first_sentence", "kv_uuid", "doc_fact")

FIRST_SENTENCE_ASK = "\n\nThe opening sentence of this document, quoted exactly:\n"
KV_OPEN = "JSON data:\n{\n"
KV_LINE = '"{key}": "{value}",\n'
_KV_PRE, _KV_POST = KV_LINE.split("{value}")
KV_ASK = '}}\n\nLooking up the key "{key}" in the object above gives "'
FACT = " The {society} of {town} gathers every week in the house of{person}."  # {person}: " First Last"
FACT_ASK = "\n\nAs the gazetteer records, the {society} of {town} gathers in the house of"
SOCIETIES = ("lantern society", "chess club", "night watch", "river choir", "map guild", "kite circle",
             "almanac club", "tide wardens")
TOWN_SUFFIX = "holm"  # the gazetteer's own names never end so (see `prose.invented_name`): the asked town is unique


def _hex(rng: np.random.Generator, n: int) -> str:
    return "".join("0123456789abcdef"[int(i)] for i in rng.integers(0, 16, size=n))


def uuid_string(rng: np.random.Generator) -> str:
    """A random UUID-shaped string such as '3f2a9c1e-07b4-4d2e-9a61-5c0e8f7b2d13' (from `rng`, so reproducible)."""
    return "-".join(_hex(rng, k) for k in (8, 4, 4, 4, 12))


class HeldoutBuilder:
    """Builds held-out probes for one tokenizer; `make(family, rng, length, depth)` returns an Example."""

    def __init__(self, tokenizer):
        self.p = ProbeBuilder(tokenizer)
        self.tok = tokenizer

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def make(self, family: str, rng: np.random.Generator, length: int, depth: float) -> Example:
        if family not in FAMILIES:
            raise ValueError(f"unknown held-out family '{family}'; choose from {', '.join(FAMILIES)}")
        return getattr(self, family)(rng, length, depth)

    def first_sentence(self, rng: np.random.Generator, length: int, depth: float = 0.0) -> Example:
        """Opening sentence + gazetteer body + the request; the answer is the opening sentence's own tokens."""
        first = self.ids(prose.opener(rng))
        ask = self.p.enc(FIRST_SENTENCE_ASK)
        body = prose.prose_tokens(self.tok, rng, length)
        ex = self.p.assemble(body, first, [], [], ask, first, length)
        ex.depth = 0.0
        return ex

    def kv_uuid(self, rng: np.random.Generator, length: int, depth: float) -> Example:
        """`{"uuid": "hex8", ...}` filling the probe; the asked pair is the one at `depth` (0: first, 1: last)."""
        head = self.p.enc(KV_OPEN)
        pairs: list[tuple[str, list[int], list[int]]] = []  # key, line ids, value ids
        used = len(head)
        budget = length - len(head) - len(self.ids(KV_ASK.format(key=uuid_string(rng)))) - 8
        while True:
            key, value = uuid_string(rng), _hex(rng, 8)
            pre, post = self.ids(_KV_PRE.format(key=key)), self.p.enc(_KV_POST)
            val = self.ids(value)
            if used + len(pre) + len(val) + len(post) > budget:
                break
            pairs.append((key, pre + val + post, val))
            used += len(pre) + len(val) + len(post)
        if not pairs:
            from ..config import ConfigError

            raise ConfigError(f"a kv_uuid probe of {length} tokens holds no key–value pair; evaluate at lengths of at "
                              f"least {length + 64} tokens")
        asked = int(round(depth * (len(pairs) - 1)))
        key, _, answer = pairs[asked]
        body = np.concatenate([np.asarray(line, dtype=np.int64) for _, line, _ in pairs])
        ask = self.ids(KV_ASK.format(key=key))
        pad = self.p.enc("\n") * (length - len(head) - len(body) - len(ask) - len(answer))
        ex = self.p.assemble(np.asarray(pad, dtype=np.int64), head + body.tolist(), [], [], ask, answer, length)
        ex.depth = float(depth)
        return ex

    def doc_fact(self, rng: np.random.Generator, length: int, depth: float) -> Example:
        """A gazetteer with one sentence about the `society` of an invented `town` at `depth`; asked back."""
        society = SOCIETIES[int(rng.integers(len(SOCIETIES)))]
        town = prose.invented_name(rng, (2, 2)) + TOWN_SUFFIX
        who = prose.person(rng)
        before, after = FACT.split("{person}")
        name = self.ids(" " + who)
        fact = self.ids(before.format(society=society, town=town)) + name + self.p.enc(after)
        ask = self.ids(FACT_ASK.format(society=society, town=town))
        body = prose.prose_tokens(self.tok, rng, length)
        return self.p.assemble(body, [], [fact], [depth], ask, name, length)
