"""Oracle tests for the held-out families: each probe has the requested length, labels only on its answer, and a
reader that follows the family's rule recovers exactly that answer from the text."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ctxstretch.data.heldout import FAMILIES, HeldoutBuilder
from ctxstretch.data.probes import IGNORE, rng_for


@pytest.fixture(scope="module")
def builder(tokenizer):
    return HeldoutBuilder(tokenizer)


def _split(tok, ex):
    ans = ex.labels != IGNORE
    assert ans.any() and np.all(ans[np.argmax(ans):]), "labels mark one contiguous tail"
    assert np.array_equal(ex.labels[ans], ex.input_ids[ans])
    return tok.decode(ex.input_ids[~ans].tolist()), tok.decode(ex.input_ids[ans].tolist())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [256, 1024, 3000])
def test_probe_length_and_labels(builder, family, length):
    for d in (0.0, 0.5, 1.0):
        ex = builder.make(family, rng_for(f"t-{family}", 1, True), length, d)
        assert len(ex.input_ids) == len(ex.labels) == length


def test_first_sentence_oracle(builder, tokenizer):
    for seed in range(5):
        prompt, answer = _split(tokenizer, builder.first_sentence(rng_for("fs", seed, True), 800))
        first = prompt[: prompt.index(".") + 1]
        assert answer == first
        assert prompt.endswith("quoted exactly:\n")


def test_kv_uuid_oracle(builder, tokenizer):
    for seed, depth in enumerate((0.0, 0.3, 0.7, 1.0)):
        prompt, answer = _split(tokenizer, builder.kv_uuid(rng_for("kv", seed, True), 900, depth))
        body = prompt[prompt.index("{") : prompt.index("}") + 1]
        table = json.loads(re.sub(r",\s*}", "}", body))
        key = re.search(r'Looking up the key "([0-9a-f-]{36})"', prompt).group(1)
        assert len(table) >= 5 and table[key] == answer and re.fullmatch(r"[0-9a-f]{8}", answer)
        keys = list(table)
        assert keys.index(key) == round(depth * (len(keys) - 1))


def test_doc_fact_oracle(builder, tokenizer):
    for seed, depth in enumerate((0.1, 0.5, 0.9)):
        prompt, answer = _split(tokenizer, builder.doc_fact(rng_for("df", seed, True), 1200, depth))
        ask = re.search(r"records, the (.+?) of (\w+holm) gathers in the house of$", prompt)
        society, town = ask.groups()
        facts = re.findall(rf"The {society} of {town} gathers every week in the house of ([A-Z]\w+ [A-Z]\w+)\.",
                           prompt)
        assert facts == [answer.strip()], "the fact is stated exactly once and names the answer"
        assert prompt.count(town) == 2  # stated once, asked once: no other place has the name
        at = prompt.index(f"The {society} of {town}") / len(prompt)
        assert abs(at - depth) < 0.15


def test_short_lengths_fail_with_one_line(builder):
    from ctxstretch.config import ConfigError

    with pytest.raises(ConfigError, match="at least"):
        builder.kv_uuid(rng_for("kv", 0, True), 40, 0.5)
