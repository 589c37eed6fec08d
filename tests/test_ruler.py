import re
from collections import Counter

import numpy as np
import pytest

from ctxstretch.data.probes import IGNORE, ProbeBuilder, rng_for
from ctxstretch.data.ruler import TASKS, RulerBuilder
from ctxstretch.eval.passkey import score_examples
from tests.test_probes import Oracle


@pytest.fixture(scope="module")
def ruler(tokenizer):
    hay = np.asarray(tokenizer("The quick brown fox jumps over the lazy dog.\n" * 600)["input_ids"])
    return RulerBuilder(ProbeBuilder(tokenizer, hay))


def answer_text(tokenizer, ex):
    return tokenizer.decode(ex.labels[ex.labels != IGNORE])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [300, 1000])
def test_each_task_has_exact_length_and_a_correct_answer(tokenizer, ruler, task, length):
    ex = ruler.make(task, rng_for(task, length, evaluation=True), length)
    assert len(ex.input_ids) == length
    text = tokenizer.decode(ex.input_ids)
    body, answer = text[: len(text) - len(answer_text(tokenizer, ex))], answer_text(tokenizer, ex)
    items = [x.strip() for x in answer.strip().rstrip(".").split(",")]
    if task.startswith("niah"):
        asked = re.search(r"magic numbers? for ([a-z, ]+)\?", body).group(1).split(", ")
        found = [v for w, v in re.findall(r"magic numbers for (\w+) is: (\d+)", body) if w in asked]
        assert items == found
    elif task == "vt":
        value = re.search(r"assigned the value (\d+)", body).group(1)
        bound = {re.search(rf"VAR (\w+) = {value}\.", body).group(1)}
        changed = True
        while changed:
            new = {a for a, b in re.findall(r"VAR (\w+) = VAR (\w+)\.", body) if b in bound}
            changed = not new <= bound
            bound |= new
        assert set(items) == bound
    else:
        words = body.split("\nWhat are")[0].split()
        counts = Counter(words)
        expected = [w for w, _ in sorted(counts.items(), key=lambda t: (-t[1], t[0]))[:3]]
        assert items == expected


def test_oracles(tokenizer, ruler):
    rng = np.random.default_rng(0)
    exs = [ruler.make(t, rng, 400) for t in TASKS]
    assert score_examples(Oracle(len(tokenizer)), exs, batch_size=len(exs)).all()
    assert not score_examples(Oracle(len(tokenizer), wrong=True), exs).any()


def test_unknown_task(ruler):
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.make("qa", np.random.default_rng(0), 100)


def test_effective_length():
    from ctxstretch.eval.ruler import effective_length

    assert effective_length({1000: 1.0, 2000: 0.9, 4000: 0.8, 8000: 0.9}) == 2000
    assert effective_length({1000: 0.5, 2000: 0.45, 4000: 0.2}) == 2000
    assert effective_length({1000: 0.0, 2000: 0.0}) is None
    assert effective_length({1000: 0.95, 2000: 0.92, 4000: 0.85}, threshold=0.9) == 2000
