"""What each training row kind and each evaluation probe family is made of — template strings, filler source, task
— so that a report can say which of its numbers are held out.

A probe family is *held out* when no training row kind shares with it a template (a common run of four words, see
`shared_ngrams`), its filler (the text its haystack is cut from) or its task. Only held-out families make headline
numbers; the others (passkey, needle, the RULER-style tasks of `data/ruler.py`) are *in-format*: a model may
have learned their format rather than long-range retrieval. Both sides read this registry — the training mix
(`data/mix.py` row kinds) and evaluation (`eval/`) — and `tests/data/test_families.py` checks it against the
generators' own strings and rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import heldout, probes, prose, ruler, selfinstruct, synl


@dataclass(frozen=True)
class Family:
    """One kind of row or probe: `task` (what is asked), `filler` (the text source of its haystack) and the literal
    template strings it is built from (`{name}` placeholders allowed)."""

    task: str
    filler: str
    templates: tuple[str, ...] = ()


_NIAH = (ruler.NIAH_NEEDLE, ruler.NIAH_ASK_ONE, ruler.NIAH_ASK_ALL)

# Every row kind a training mix can draw (`data/mix.py` ROW_KINDS) and every probe kind `ctxstretch data probes`
# writes as training rows (`data/ruler.py` PROBE_KINDS).
TRAINING_KINDS: dict[str, Family] = {
    "text": Family("language modelling", "embedded corpus"),
    "cip": Family("language modelling", "embedded corpus"),
    "text_copy": Family("span repetition", "embedded corpus"),
    "random_copy": Family("span repetition", "random tokens"),
    "passkey": Family("passkey retrieval", "repeated filler",
                      (probes.PASSKEY_INTRO, probes.PASSKEY_FILLER, probes.PASSKEY_NEEDLE, probes.PASSKEY_QUESTION)),
    "needle": Family("keyed number retrieval", "embedded corpus", (probes.NEEDLE_TEXT, probes.NEEDLE_QUESTION)),
    "niah_single": Family("keyed number retrieval", "embedded corpus", _NIAH),
    "niah_multikey": Family("keyed number retrieval", "embedded corpus", _NIAH),
    "niah_multivalue": Family("keyed number retrieval", "embedded corpus", _NIAH),
    "niah_multiquery": Family("keyed number retrieval", "embedded corpus", _NIAH),
    "vt": Family("variable tracking", "embedded corpus", (ruler.VT_VALUE, ruler.VT_CHAIN, ruler.VT_ASK)),
    "cwe": Family("word counting", "random words", (ruler.CWE_ASK,)),
    "fwe": Family("word counting", "random words", (ruler.FWE_ASK,)),
    "synl": Family("table question answering", "synthetic tables", (synl.INTRO, synl.QUESTION)),
    "selfinstruct": Family("document question answering", "embedded corpus",
                           (selfinstruct.ROW_QUESTION, selfinstruct.CHECK_PROMPT)),
    # `dataset` rows are whatever a `ctxstretch data` directory holds: the kinds above, or the user's own text
    "dataset": Family("language modelling", "user data"),
}

# Every probe family `ctxstretch eval` scores.
EVAL_FAMILIES: dict[str, Family] = {
    "passkey": TRAINING_KINDS["passkey"],
    "needle": TRAINING_KINDS["needle"],
    **{task: TRAINING_KINDS[task] for task in ruler.TASKS},
    "first_sentence": Family("first-sentence retrieval", "gazetteer prose",
                             (*prose.OPENERS, *prose.SENTENCES, heldout.FIRST_SENTENCE_ASK)),
    "kv_uuid": Family("uuid key-value lookup", "uuid pairs", (heldout.KV_OPEN, heldout.KV_LINE, heldout.KV_ASK)),
    "doc_fact": Family("fact recall from a document", "gazetteer prose",
                       (*prose.SENTENCES, heldout.FACT, heldout.FACT_ASK)),
}


def ngrams(template: str, n: int = 4) -> set[tuple[str, ...]]:
    """Word n-grams of a template's literal text (placeholders and punctuation split runs; lower-cased)."""
    out: set[tuple[str, ...]] = set()
    for piece in re.split(r"\{[^}]*\}", template):
        words = re.findall(r"[a-z0-9']+", piece.lower())
        out |= {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    return out


def shared_ngrams(a: Family, b: Family, n: int = 4) -> set[tuple[str, ...]]:
    """The word n-grams the templates of `a` and `b` have in common."""
    grams_a = set().union(*(ngrams(t, n) for t in a.templates)) if a.templates else set()
    grams_b = set().union(*(ngrams(t, n) for t in b.templates)) if b.templates else set()
    return grams_a & grams_b


def overlap(family: str) -> dict[str, list[str]]:
    """Training row kinds that share something with the evaluation family, and what: {kind: ["task", ...]}."""
    f = EVAL_FAMILIES[family]
    found: dict[str, list[str]] = {}
    for kind, k in TRAINING_KINDS.items():
        why = [w for w, hit in (("task", k.task == f.task), ("filler", k.filler == f.filler),
                                ("template", bool(shared_ngrams(k, f)))) if hit]
        if why:
            found[kind] = why
    return found


def is_held_out(family: str) -> bool:
    return not overlap(family)


HELD_OUT = tuple(name for name in EVAL_FAMILIES if is_held_out(name))
