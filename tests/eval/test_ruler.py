import re
from collections import Counter

import numpy as np
import pytest

from ctxstretch.data.probes import IGNORE, ProbeBuilder, rng_for
from ctxstretch.data.ruler import TASKS, RulerBuilder
from ctxstretch.eval.ruler import ruler_scores
from tests.data.test_probes import Oracle


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


@pytest.mark.parametrize("task", TASKS)
def test_oracle_scores_all_and_anti_oracles_none(tokenizer, ruler, task):
    """Through the real scoring path (`ruler_scores`): right everywhere → 100%; wrong everywhere, or only on the
    answer's last token → 0%."""
    vocab, lengths = len(tokenizer), [300, 600]
    right = ruler_scores(Oracle(vocab), ruler, lengths, (task,), trials=3, batch_size=2)
    assert right == {task: {300: 1.0, 600: 1.0}}
    for anti in (Oracle(vocab, wrong=True), Oracle(vocab, wrong_last=True)):
        assert ruler_scores(anti, ruler, lengths, (task,), trials=3) == {task: {300: 0.0, 600: 0.0}}


def test_unknown_task(ruler):
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.make("qa", np.random.default_rng(0), 100)


def test_effective_length():
    from ctxstretch.eval.ruler import effective_length

    assert effective_length({1000: 1.0, 2000: 0.9, 4000: 0.8, 8000: 0.9}) == 2000
    assert effective_length({1000: 0.5, 2000: 0.45, 4000: 0.2}) == 2000
    assert effective_length({1000: 0.0, 2000: 0.0}) is None
    assert effective_length({1000: 0.95, 2000: 0.92, 4000: 0.85}, threshold=0.9) == 2000
