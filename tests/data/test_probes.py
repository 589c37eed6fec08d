import numpy as np
import pytest
import torch

from ctxstretch.data.probes import IGNORE, ProbeBuilder, rng_for
from ctxstretch.data.sentences import BoundaryVocab
from ctxstretch.eval.passkey import retrieval_grid, score_examples


class Oracle(torch.nn.Module):
    """Predicts the true next token; `wrong=True` always a wrong one; `wrong_last=True` right everywhere except on
    the sequence's last token. Honours `logits_to_keep` like a transformers causal LM."""

    def __init__(self, vocab: int, wrong: bool = False, wrong_last: bool = False):
        super().__init__()
        self.vocab, self.wrong, self.wrong_last = vocab, wrong, wrong_last
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep: int = 0, **_):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong:
            nxt = (nxt + 1) % self.vocab
        if self.wrong_last:
            nxt[:, -2] = (nxt[:, -2] + 1) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()  # 0 keeps all, as in transformers


class FullLogitsOracle(Oracle):
    """A model whose forward has no `logits_to_keep` (some remote code): it always returns every position."""

    def forward(self, input_ids, **_):
        return super().forward(input_ids)


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


@pytest.mark.parametrize("kind", ["passkey", "needle"])
@pytest.mark.parametrize("model_cls", [Oracle, FullLogitsOracle])
def test_oracle_scores_all_and_anti_oracles_none(tokenizer, kind, model_cls):
    """Exact match over the whole answer: right everywhere → 100%; wrong everywhere, or only on the answer's last
    token → 0%; the same whether the model returns only the tail's logits or all of them."""
    b, vocab = builder(tokenizer), len(tokenizer)
    args = (b, kind, [128, 256], [0.0, 0.5, 1.0])
    right = retrieval_grid(model_cls(vocab), *args, trials=2, batch_size=3)
    assert right.acc.shape == (3, 2) and right.acc.min() == 1.0
    assert retrieval_grid(model_cls(vocab, wrong=True), *args, trials=2).acc.max() == 0.0
    assert retrieval_grid(model_cls(vocab, wrong_last=True), *args, trials=2).acc.max() == 0.0


def test_tail_logits_score_like_full_logits_on_a_real_model(tokenizer):
    """`logits_to_keep` is an optimisation only: a transformers model scores every probe as with full logits."""
    from tests.conftest import micro_llama

    model, b = micro_llama(tokenizer, window=256), builder(tokenizer)
    rng = np.random.default_rng(0)
    exs = [b.passkey(rng, 128, d) for d in (0.0, 0.5, 1.0)]
    # ask the model for the argmax at each answer position the slow way: full logits
    with torch.no_grad():
        ids = torch.tensor(np.stack([e.input_ids for e in exs]))
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1).numpy()
    target = np.stack([e.labels for e in exs])[:, 1:]
    expected = ((pred == target) | (target == IGNORE)).all(1)
    assert np.array_equal(score_examples(model, exs, batch_size=2), expected)
    # and feed those argmaxes back as labels: now every probe must score as solved
    forced = [type(e)(e.input_ids, np.where(e.labels != IGNORE, np.r_[IGNORE, p], IGNORE), e.depth)
              for e, p in zip(exs, pred, strict=True)]
    assert score_examples(model, forced).all()


def test_sentence_ends_come_from_the_vocabulary(tokenizer):
    bv = BoundaryVocab.from_tokenizer(tokenizer)
    ids = np.asarray(tokenizer("One. Two? x.y\nThree")["input_ids"])
    ends = bv.sentence_ends(ids)
    pieces = [tokenizer.decode(ids[: i + 1]) for i in np.flatnonzero(ends)]
    assert pieces[0].endswith("One.") and pieces[1].endswith("Two?") and pieces[2].endswith("x.y\n")
    assert len(pieces) == 3, "the dot inside x.y is not a sentence end"
