"""Synthetic retrieval probes (passkey, needle, copy), shared by training mixes and evaluation.

Every builder works on token ids so that a probe has exactly the requested length in tokens. Labels are -100
everywhere except the answer tokens. Training and evaluation draw from disjoint seed ranges (`rng_for`), so
training never sees an evaluation item.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

IGNORE = -100
EVAL_SEED_OFFSET = 1 << 40  # evaluation seeds live above this, training seeds below

PASSKEY_INTRO = "There is a pass key hidden in the text below. Find it and remember it.\n"
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
NEEDLE_TEXT = "\nThe magic number for {word} is {key}.\n"
NEEDLE_QUESTION = "\nWhat is the magic number for {word}? The magic number for {word} is"
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def rng_for(purpose: str, seed: int, evaluation: bool) -> np.random.Generator:
    """A generator whose stream is disjoint between training (`evaluation=False`) and evaluation."""
    base = EVAL_SEED_OFFSET if evaluation else 0
    digest = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([base + seed, digest])


def random_word(rng: np.random.Generator, lo: int = 4, hi: int = 8) -> str:
    """A random lowercase key such as 'qzkfe' (RULER uses random words as needle keys)."""
    return "".join(rng.choice(_LETTERS, size=int(rng.integers(lo, hi))))


@dataclass
class Example:
    """One probe: `input_ids` and `labels` of equal length; the answer is the labelled tail."""

    input_ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64, IGNORE except on the answer
    depth: float = 0.0


class ProbeBuilder:
    """Builds probes for one tokenizer. `haystack` is a flat token array of real text (for needle probes)."""

    def __init__(self, tokenizer, haystack: np.ndarray | None = None):
        self.tok = tokenizer
        self.haystack = haystack
        self._cache: dict[str, list[int]] = {}
        self._filler = np.asarray(self.enc(PASSKEY_FILLER * 64))

    def enc(self, text: str) -> list[int]:
        if text not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def assemble(
        self, hay: np.ndarray, prefix: list[int], needles: list[list[int]], depths: list[float],
        question: list[int], answer: list[int], length: int,
    ) -> Example:
        """prefix + haystack with each needle inserted at its depth (a fraction of the haystack) + question +
        answer, exactly `length` tokens; labels only on the answer."""
        room = length - len(prefix) - sum(map(len, needles)) - len(question) - len(answer)
        if room < 0:
            from ..config import ConfigError  # a user's evaluation length: one line, not a traceback

            raise ConfigError(f"a probe of {length} tokens is too short for its needles and question; evaluate at "
                              f"lengths of at least {length - room + 16} tokens")
        hay = np.asarray(hay[:room], dtype=np.int64)
        parts, last = [np.asarray(prefix, dtype=np.int64)], 0
        for depth, needle in sorted(zip(depths, needles, strict=True), key=lambda t: t[0]):
            at = int(round(depth * room))
            parts += [hay[last:at], np.asarray(needle, dtype=np.int64)]
            last = at
        parts += [hay[last:], np.asarray(question, dtype=np.int64), np.asarray(answer, dtype=np.int64)]
        ids = np.concatenate(parts)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[-len(answer):] = answer
        return Example(ids, labels, float(depths[0]) if depths else 0.0)

    def text_haystack(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """A random window of real text from the haystack array."""
        if self.haystack is None or len(self.haystack) <= length:
            raise ValueError("needle probes need a haystack token array longer than the probe")
        start = int(rng.integers(0, len(self.haystack) - length))
        return np.asarray(self.haystack[start : start + length], dtype=np.int64)

    def passkey(self, rng: np.random.Generator, length: int, depth: float, digits: int = 5) -> Example:
        """The classic passkey probe (Mohtashami & Jaggi, 2023): a number hidden in repeated filler sentences."""
        key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        needle = self.enc(PASSKEY_NEEDLE.format(key=key))
        reps = 1 + length // max(1, len(self._filler))
        hay = np.tile(self._filler, reps)
        return self.assemble(
            hay, self.enc(PASSKEY_INTRO), [needle], [depth], self.enc(PASSKEY_QUESTION), self.enc(" " + key), length
        )

    def needle(self, rng: np.random.Generator, length: int, depth: float, digits: int = 6) -> Example:
        """Needle in a haystack (RULER's single needle): a keyed magic number inside real text."""
        if self.haystack is None or len(self.haystack) <= length:
            raise ValueError("needle probes need a haystack token array longer than the probe")
        word = random_word(rng)
        key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
        hay = self.text_haystack(rng, length)
        return self.assemble(
            hay, [], [self.enc(NEEDLE_TEXT.format(word=word, key=key))], [depth],
            self.enc(NEEDLE_QUESTION.format(word=word)), self.enc(" " + key), length,
        )

    def copy(self, rng: np.random.Generator, length: int, span: int | None = None,
             random_tokens: bool = False) -> Example:
        """An induction row: a span of real text (or of random tokens) repeated later; loss on the repeat."""
        span = span or length // 2
        if random_tokens or self.haystack is None or len(self.haystack) <= length:
            piece = rng.integers(0, len(self.tok), size=span)
            gap = rng.integers(0, len(self.tok), size=length - 2 * span)
        else:
            start = int(rng.integers(0, len(self.haystack) - span))
            piece = np.asarray(self.haystack[start : start + span], dtype=np.int64)
            gap_start = int(rng.integers(0, len(self.haystack) - length))
            gap = np.asarray(self.haystack[gap_start : gap_start + length - 2 * span], dtype=np.int64)
        ids = np.concatenate([piece, gap, piece]).astype(np.int64)
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        labels[-span + 1 :] = piece[1:]
        return Example(ids, labels)
