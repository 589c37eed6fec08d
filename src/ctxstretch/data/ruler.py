"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", §3): needle variants, variable tracking and word extraction, built on token ids with an exact
answer so that scoring is exact match. The same generators serve evaluation and training (disjoint seeds)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .probes import Example, ProbeBuilder, random_word

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")

NIAH_NEEDLE = "\nOne of the special magic numbers for {word} is: {value}.\n"
NIAH_ASK_ONE = "\nWhat is the special magic number for {word}? The special magic number for {word} is"
NIAH_ASK_ALL = ("\nWhat are all the special magic numbers for {words}? "
                "The special magic numbers mentioned in the text are")
VT_VALUE = "\nVAR {name} = {value}.\n"
VT_CHAIN = "\nVAR {name} = VAR {prev}.\n"
VT_ASK = "\nFind all variables that are assigned the value {value}. Answer: they are"
CWE_ASK = "\nWhat are the 3 most common words above? Answer: they are"
FWE_ASK = "\nWhat are the 3 most frequent words above? Answer: they are"


class RulerBuilder:
    """Generators for every task in `TASKS`; `make(task, rng, length)` returns an Example of `length` tokens."""

    def __init__(self, probes: ProbeBuilder):
        self.p = probes

    def make(self, task: str, rng: np.random.Generator, length: int) -> Example:
        if task not in TASKS:
            raise ValueError(f"unknown RULER task '{task}'; choose from {', '.join(TASKS)}")
        return getattr(self, task)(rng, length)

    def _number(self, rng: np.random.Generator) -> str:
        return str(int(rng.integers(100000, 1000000)))

    def _niah(self, rng, length: int, keys: int, values: int, queries: int) -> Example:
        words = list(dict.fromkeys(random_word(rng) for _ in range(keys * 2)))[:keys]
        table = {w: [self._number(rng) for _ in range(values)] for w in words}
        needles, depths = [], []
        for w, vals in table.items():
            for v in vals:
                needles.append(self.p.enc(NIAH_NEEDLE.format(word=w, value=v)))
                depths.append(float(rng.random()))
        asked = words[:queries]
        # values are answered in the order they appear in the text
        flat = [(w, v) for w, vals in table.items() for v in vals]
        answer_vals = [flat[i][1] for i in np.argsort(depths, kind="stable") if flat[i][0] in asked]
        if queries == 1 and values == 1:
            question = NIAH_ASK_ONE.format(word=asked[0])
        else:
            question = NIAH_ASK_ALL.format(words=", ".join(asked))
        answer = " " + ", ".join(answer_vals) + "."
        hay = self.p.text_haystack(rng, length)
        return self.p.assemble(hay, [], needles, depths, self.p.enc(question), self.p.enc(answer), length)

    def niah_single(self, rng, length):
        """One key, one value."""
        return self._niah(rng, length, keys=1, values=1, queries=1)

    def niah_multikey(self, rng, length):
        """Four keys (three distractors), one asked."""
        return self._niah(rng, length, keys=4, values=1, queries=1)

    def niah_multivalue(self, rng, length):
        """One key with four values; all must be returned."""
        return self._niah(rng, length, keys=1, values=4, queries=1)

    def niah_multiquery(self, rng, length):
        """Four keys, two asked at once."""
        return self._niah(rng, length, keys=4, values=1, queries=2)

    def vt(self, rng, length, hops: int = 4):
        """Variable tracking: a chain VAR A = 12345, VAR B = VAR A, …; name every variable bound to the value."""
        value = self._number(rng)
        names = [w.upper() for w in dict.fromkeys(random_word(rng, 3, 5) for _ in range(hops * 2))][: hops + 1]
        stmts = [VT_VALUE.format(name=names[0], value=value)] + [VT_CHAIN.format(name=names[i], prev=names[i - 1])
                                                                 for i in range(1, len(names))]
        depths = sorted(float(x) for x in rng.random(len(stmts)))
        question = VT_ASK.format(value=value)
        answer = " " + ", ".join(names) + "."
        hay = self.p.text_haystack(rng, length)
        return self.p.assemble(hay, [], [self.p.enc(s) for s in stmts], depths, self.p.enc(question),
                               self.p.enc(answer), length)

    def _word_list(self, rng, length, counts: Counter, question: str, top: int) -> Example:
        """Shuffled words (as many as fit) + question; the answer is recomputed from the words that fit."""
        words = [w for w, c in counts.items() for _ in range(c)]
        rng.shuffle(words)
        q = self.p.enc(question)
        reserve = top * 12  # room kept for the answer (a few tokens per word)
        body: list[int] = []
        kept: Counter = Counter()
        for w in words:
            piece = self.p.enc(" " + w)
            if len(body) + len(piece) + len(q) + reserve > length:
                break
            body += piece
            kept[w] += 1
        ranked = sorted(kept.items(), key=lambda t: (-t[1], t[0]))[:top]
        a = self.p.enc(" " + ", ".join(w for w, _ in ranked) + ".")
        pad = self.p.enc("\n") * (length - len(body) - len(q) - len(a))
        return self.p.assemble(np.asarray(pad), body, [], [], q, a, length)

    def cwe(self, rng, length, top: int = 3):
        """Common-word extraction: a few words repeated often among many rare ones; name the most common."""
        common = list(dict.fromkeys(random_word(rng) for _ in range(top * 2)))[:top]
        counts = Counter({w: 30 - 3 * i for i, w in enumerate(common)})
        for _ in range(max(1, length // 8)):
            counts[random_word(rng)] += 1
        return self._word_list(rng, length, counts, CWE_ASK, top)

    def fwe(self, rng, length, top: int = 3):
        """Frequent-word extraction: words drawn from a Zipf distribution; name the most frequent."""
        vocab = list(dict.fromkeys(random_word(rng) for _ in range(64)))
        draws = np.minimum(rng.zipf(1.6, size=max(8, length // 4)), len(vocab)) - 1
        counts = Counter(vocab[i] for i in draws)
        return self._word_list(rng, length, counts, FWE_ASK, top)


PROBE_KINDS = ("passkey", "needle", *TASKS)


def probe_examples(builder: RulerBuilder, kinds: list[str], lengths: list[int], depths: list[float], count: int,
                   seed: int = 0, evaluation: bool = False):
    """Yield (kind, length, depth, Example): `count` probes per (kind, length, depth) for passkey/needle and per
    (kind, length) for RULER tasks (their needles sit at random depths; depth reported as -1). The random streams
    are those of `ctxstretch eval` (`rng_for` with the same purposes), drawn from the training range unless
    `evaluation`, so training data never repeats an evaluation item."""
    from .probes import EVAL_SEED_OFFSET, rng_for

    if not 0 <= seed < EVAL_SEED_OFFSET:
        raise ValueError(f"seed {seed} must be in [0, 2**40): larger seeds overlap the evaluation range")
    unknown = [k for k in kinds if k not in PROBE_KINDS]
    if unknown:
        raise ValueError(f"unknown probe kinds {', '.join(unknown)}; choose from {', '.join(PROBE_KINDS)}")
    for kind in kinds:
        for n in lengths:
            if kind in ("passkey", "needle"):
                make = builder.p.passkey if kind == "passkey" else builder.p.needle
                for d in depths:
                    rng = rng_for(f"{kind}-{n}-{d}", seed, evaluation)  # the purpose eval/passkey.py uses
                    for _ in range(count):
                        yield kind, n, float(d), make(rng, n, d)
            else:
                rng = rng_for(f"ruler-{kind}-{n}", seed, evaluation)  # the purpose eval/ruler.py uses
                for _ in range(count):
                    yield kind, n, -1.0, builder.make(kind, rng, n)
