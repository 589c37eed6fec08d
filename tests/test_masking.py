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
