"""Gazetteer prose: an English text source that no training mix draws from, for the held-out probe families.

The embedded corpus (Python sources and help topics) feeds every training mix, so a haystack cut from it — even its
held-out split — would share its filler with the training rows. This generator writes, from a seeded RNG, an endless
gazetteer of invented places: short paragraphs of plain sentences about towns, rivers, trades and the people who
live there. It needs no download, its vocabulary and sentence shapes appear in no training row kind (the registry
test in `tests/data/test_families.py` checks the templates), and every probe gets a fresh text.
"""

from __future__ import annotations

import numpy as np

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v",
           "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "l", "m", "s", "th", "nd", "rk", "ll", "sk")

NOUNS = ("bridge", "orchard", "market", "harbour", "mill", "chapel", "meadow", "quarry", "ferry", "granary",
         "tannery", "forge", "well", "tower", "causeway", "vineyard", "pasture", "wharf", "inn", "archive",
         "bakery", "garden", "library", "school", "square", "road", "valley", "hill", "lake", "forest")
ADJECTIVES = ("old", "narrow", "quiet", "crowded", "windy", "famous", "broad", "muddy", "ancient", "painted",
              "stone", "wooden", "busy", "sleepy", "green", "grey", "steep", "sheltered", "northern", "southern")
VERBS = ("rebuilt", "visited", "sold", "painted", "measured", "repaired", "described", "praised", "mapped",
         "enlarged", "flooded", "guarded", "inherited", "restored", "surveyed")
TRADES = ("weavers", "coopers", "glassblowers", "rope makers", "beekeepers", "clockmakers", "tanners", "potters",
          "dyers", "bookbinders", "salt traders", "boatwrights")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

# Sentence shapes of the body text ({place}, {person}: invented names; the rest from the word lists above).
SENTENCES = (
    "The {adj} {noun} of {place} was {verb} by {person} in {month}.",
    "Travellers to {place} usually arrive by the {adj} {noun}.",
    "In {place} the {noun} is {adj} and the {noun2} is {adj2}.",
    "{person} kept a small shop beside the {noun} for many years.",
    "Every {month} the {trades} of {place} hold a fair near the {noun}.",
    "The road from {place} to {place2} follows the {adj} river for most of the way.",
    "Few people remember that the {noun} at {place} once belonged to {person}.",
    "Most of the {trades} moved to {place} after the {noun} was {verb}.",
    "A {adj} {noun} stands at the edge of {place}, facing the {noun2}.",
    "{person} wrote that {place} had {count} houses and one {adj} {noun}.",
    "The people of {place} say the {noun} has never been {verb}.",
    "Between {place} and {place2} lies a {adj} {noun} where sheep graze in {month}.",
)
OPENERS = (
    "{person} {verb} the {adj} {noun} of {place}.",
    "{place} lies beside a {adj} {noun}.",
    "This is the record of the {noun} at {place}.",
    "{person} arrived in {place} one {adj} morning.",
)


def invented_name(rng: np.random.Generator, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable made-up name such as 'Dreamorsk' (capitalised)."""
    k = int(rng.integers(syllables[0], syllables[1] + 1))
    parts = [str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) + str(rng.choice(_CODAS)) for _ in range(k)]
    return "".join(parts).capitalize()


def person(rng: np.random.Generator) -> str:
    return f"{invented_name(rng, (1, 2))} {invented_name(rng, (2, 2))}"


def _fill(template: str, rng: np.random.Generator) -> str:
    def pick(words):
        return str(words[int(rng.integers(len(words)))])

    return template.format(
        adj=pick(ADJECTIVES), adj2=pick(ADJECTIVES), noun=pick(NOUNS), noun2=pick(NOUNS), verb=pick(VERBS),
        trades=pick(TRADES), month=pick(MONTHS), place=invented_name(rng), place2=invented_name(rng),
        person=person(rng), count=int(rng.integers(12, 900)))


def sentence(rng: np.random.Generator) -> str:
    """One body sentence."""
    return _fill(SENTENCES[int(rng.integers(len(SENTENCES)))], rng)


def opener(rng: np.random.Generator) -> str:
    """A short first sentence (for first-sentence retrieval)."""
    return _fill(OPENERS[int(rng.integers(len(OPENERS)))], rng)


def paragraphs(rng: np.random.Generator, n_words: int) -> str:
    """About `n_words` words of body text in paragraphs of 3–6 sentences."""
    out: list[str] = []
    words = 0
    while words < n_words:
        para = " ".join(sentence(rng) for _ in range(int(rng.integers(3, 7))))
        out.append(para)
        words += para.count(" ") + 1
    return "\n\n".join(out)


def prose_tokens(tokenizer, rng: np.random.Generator, n_tokens: int) -> np.ndarray:
    """At least `n_tokens` token ids of body text (tokenised in one call; more text is written until it suffices).

    Returns (m,) int64 with m ≥ n_tokens; callers cut it to the room they have."""
    words, ids = max(64, n_tokens // 2), np.zeros(0, dtype=np.int64)
    while len(ids) < n_tokens:
        text = paragraphs(rng, words)
        more = np.asarray(tokenizer(("\n\n" if len(ids) else "") + text, add_special_tokens=False)["input_ids"],
                          dtype=np.int64)
        ids = np.concatenate([ids, more])
        words = max(64, int((n_tokens - len(ids)) * 0.8) + 32)
    return ids
