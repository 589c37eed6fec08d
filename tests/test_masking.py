import torch

from ctxstretch.masking import attention_mask_for
from tests.conftest import micro_llama


def test_single_document_rows_get_a_plain_mask():
    m = attention_mask_for(torch.zeros(2, 5, dtype=torch.long))
    assert m.shape == (2, 5) and bool(m.all())


@torch.no_grad()
def test_packed_documents_are_isolated_and_position_gaps_are_not(tokenizer):
    model = micro_llama(tokenizer)
    torch.manual_seed(1)
    a, b = torch.randint(0, 4000, (1, 7)), torch.randint(0, 4000, (1, 9))
    ids = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    packed = model(input_ids=ids, position_ids=pos, attention_mask=attention_mask_for(seg)).logits
    alone_b = model(input_ids=b, position_ids=torch.arange(9)[None]).logits
    alone_a = model(input_ids=a, position_ids=torch.arange(7)[None]).logits
    assert torch.allclose(packed[:, 7:], alone_b, atol=1e-5), "document b must not see document a"
    assert torch.allclose(packed[:, :7], alone_a, atol=1e-5)

    # one document whose positions jump (a PoSE/LongRecipe gap) must still see its own first chunk
    gap_pos = torch.cat([torch.arange(7), torch.arange(9) + 40])[None]
    one_doc = model(input_ids=ids, position_ids=gap_pos,
                    attention_mask=attention_mask_for(torch.zeros_like(ids))).logits
    shifted = model(input_ids=b, position_ids=(torch.arange(9) + 40)[None]).logits
    assert not torch.allclose(one_doc[:, 7:], shifted, atol=1e-3), "the gap must not cut attention"


# ------------------------------------------------------------------ linear-memory paths (no T × T mask)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ctxstretch.masking import (  # noqa: E402
    DOC_ATTENTION,
    attention_inputs,
    attention_segments,
    document_spans,
    use_document_attention,
)
from ctxstretch.train.loss import token_weights, weighted_loss  # noqa: E402

IGNORE = -100
FAST = settings(max_examples=25, deadline=None)


def _row(lengths: list[int], pad: int, gap: int, seed: int):
    """One packed row: documents of `lengths` (positions restart per document, with a position gap of `gap`
    halfway through each), then `pad` tokens of padding in their own segment; labels IGNORE on first tokens and
    padding. Returns ids, position ids, segment ids, labels, each (1, T)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), len(lengths))])
    pos = torch.cat([torch.arange(n) + gap * (torch.arange(n) >= n // 2) for n in lengths] + [torch.arange(pad)])
    ids = torch.randint(1, 4000, (len(seg),), generator=g)
    labels = ids.clone()
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    labels[starts] = IGNORE
    labels[seg == len(lengths)] = IGNORE
    return ids[None], pos[None], seg[None], labels[None]


def test_trailing_padding_joins_the_last_document_and_takes_the_causal_path(tokenizer):
    model = micro_llama(tokenizer)
    _, _, seg, labels = _row([9], pad=7, gap=0, seed=0)
    assert seg.max() == 1 and bool((attention_segments(seg, labels) == 0).all())
    kw = attention_inputs(model, seg, labels)
    assert set(kw) == {"attention_mask"} and kw["attention_mask"].shape == (1, 16)
    assert use_document_attention(model) == "sdpa" and model.config._attn_implementation == DOC_ATTENTION
    kw = attention_inputs(model, seg, labels)
    assert set(kw) == {"attention_mask"} and kw["attention_mask"].shape == (1, 16), "no doc_spans, no 4-D mask"
    packed = torch.tensor([[0, 0, 1, 1, 2, 2]])  # two documents, then padding: the padding joins document 1
    assert attention_inputs(model, packed, torch.tensor([[-100, 5, -100, 5, -100, -100]]))["doc_spans"] == [
        [(0, 2), (2, 6)]]


def test_document_spans_refuse_recurring_segment_ids():
    assert document_spans(torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])) == [[(0, 2), (2, 4)], [(0, 4)]]
    assert document_spans(torch.tensor([[0, 1, 0, 0]])) is None


@FAST
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), pad=st.integers(0, 6),
       gap=st.sampled_from([0, 37]), seed=st.integers(0, 2**16))
def test_labelled_outputs_and_loss_equal_the_dense_mask(tokenizer, lengths, pad, gap, seed):
    """Property: the linear-memory paths (merged padding, per-document sdpa) give the dense block-diagonal mask's
    outputs at every position the loss reads, and the same loss — documents isolated, position gaps not cut."""
    model = micro_llama(tokenizer)
    ids, pos, seg, labels = _row(lengths, pad, gap, seed)
    with torch.no_grad():
        dense = model(input_ids=ids, position_ids=pos, attention_mask=attention_mask_for(seg), use_cache=False).logits
        use_document_attention(model)
        fast = model(input_ids=ids, position_ids=pos, use_cache=False, **attention_inputs(model, seg, labels)).logits
    shifted, weights = token_weights(labels)
    read = weights[0] > 0
    assert torch.allclose(fast[0, read], dense[0, read], atol=1e-5)
    assert torch.allclose(weighted_loss(fast, shifted, weights), weighted_loss(dense, shifted, weights), rtol=1e-5)


@torch.no_grad()
def test_document_attention_isolates_packed_documents_and_keeps_gaps(tokenizer):
    model = micro_llama(tokenizer)
    use_document_attention(model)
    torch.manual_seed(1)
    a, b = torch.randint(0, 4000, (1, 7)), torch.randint(0, 4000, (1, 9))
    ids, seg = torch.cat([a, b], 1), torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    kw = attention_inputs(model, seg)
    assert kw["doc_spans"] == [[(0, 7), (7, 16)]]
    packed = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits
    assert torch.allclose(packed[:, 7:], model(input_ids=b, use_cache=False).logits, atol=1e-5)
    assert torch.allclose(packed[:, :7], model(input_ids=a, use_cache=False).logits, atol=1e-5)
    gap_pos = torch.cat([torch.arange(7), torch.arange(9) + 40])[None]
    one_doc = model(input_ids=ids, position_ids=gap_pos, use_cache=False,
                    **attention_inputs(model, torch.zeros_like(ids))).logits
    shifted = model(input_ids=b, position_ids=(torch.arange(9) + 40)[None], use_cache=False).logits
    assert not torch.allclose(one_doc[:, 7:], shifted, atol=1e-3), "the gap must not cut attention"
