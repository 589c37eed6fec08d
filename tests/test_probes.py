import numpy as np
import torch

from ctxstretch.data.probes import IGNORE, ProbeBuilder, rng_for
from ctxstretch.data.sentences import BoundaryVocab
from ctxstretch.eval.passkey import retrieval_grid, score_examples


class Oracle(torch.nn.Module):
    """Predicts the true next token (or, with wrong=True, always a wrong one)."""

    def __init__(self, vocab: int, wrong: bool = False):
        super().__init__()
        self.vocab, self.wrong, self.p = vocab, wrong, torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return type("Out", (), {"logits": logits})()


def builder(tokenizer):
    hay = np.asarray(tokenizer("def f(x):\n    return x + 1\n" * 400)["input_ids"])
    return ProbeBuilder(tokenizer, hay)


def test_probes_have_exact_length_and_labelled_answer(tokenizer):
    b = builder(tokenizer)
    rng = rng_for("t", 0, evaluation=True)
    for make, mentions in ((b.passkey, 3), (b.needle, 2)):
        for n in (128, 300):
            for depth in (0.0, 0.5, 1.0):
                ex = make(rng, n, depth)
                assert len(ex.input_ids) == len(ex.labels) == n
                answer = ex.labels[ex.labels != IGNORE]
                assert len(answer) >= 5
                assert np.all(ex.labels[-len(answer):] == ex.input_ids[-len(answer):])
                text = tokenizer.decode(ex.input_ids)
                key = tokenizer.decode(answer).strip()
                assert text.count(key) == mentions, "the key appears only in the needle and as the answer"


def test_copy_rows_repeat_their_span(tokenizer):
    b = builder(tokenizer)
    ex = b.copy(np.random.default_rng(0), 64, span=20)
    assert np.array_equal(ex.input_ids[:20], ex.input_ids[-20:])
    assert np.count_nonzero(ex.labels != IGNORE) == 19


def test_training_and_evaluation_seeds_are_disjoint():
    a = rng_for("passkey-256-0.5", 0, evaluation=False).integers(0, 2**62, 4)
    b = rng_for("passkey-256-0.5", 0, evaluation=True).integers(0, 2**62, 4)
    assert not np.array_equal(a, b)
    # different purposes never collide by construction of the hash (regression: digit-sum seeds)
    assert rng_for("x-1400", 0, False).integers(2**62) != rng_for("x-4100", 0, False).integers(2**62)


def test_oracle_scores_all_and_anti_oracle_none(tokenizer):
    b = builder(tokenizer)
    rng = np.random.default_rng(0)
    exs = [b.passkey(rng, 128, d) for d in (0.0, 0.5, 1.0)]
    assert score_examples(Oracle(len(tokenizer)), exs).all()
    assert not score_examples(Oracle(len(tokenizer), wrong=True), exs).any()
    grid = retrieval_grid(Oracle(len(tokenizer)), b, "needle", [128, 256], [0.0, 1.0], trials=2)
    assert grid.acc.shape == (2, 2) and grid.acc.min() == 1.0


def test_sentence_ends_come_from_the_vocabulary(tokenizer):
    bv = BoundaryVocab.from_tokenizer(tokenizer)
    ids = np.asarray(tokenizer("One. Two? x.y\nThree")["input_ids"])
    ends = bv.sentence_ends(ids)
    pieces = [tokenizer.decode(ids[: i + 1]) for i in np.flatnonzero(ends)]
    assert pieces[0].endswith("One.") and pieces[1].endswith("Two?") and pieces[2].endswith("x.y\n")
    assert len(pieces) == 3, "the dot inside x.y is not a sentence end"
