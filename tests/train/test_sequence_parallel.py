"""DeepSpeed Ulysses sequence parallelism in `train_stage`: each row split along the sequence (tokens, position_ids,
loss weights) over the ranks of a group gives the one-process loss; DeepSpeed's own data-loader adapter makes the
same split; 2 CPU processes under DeepSpeed (gloo) train the same steps as one; what cannot work is refused.

Run as a script, this file is the worker torchrun starts in each process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train.test_distributed import _losses, _rows, torchrun

ROOT = Path(__file__).resolve().parents[2]
SP_ENV = {  # what `accelerate launch --config_file deepspeed_sp.yaml` exports, with sp_size 2 and ZeRO-3
    "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "true", "PARALLELISM_CONFIG_SP_SIZE": "2",
    "PARALLELISM_CONFIG_SP_BACKEND": "deepspeed", "PARALLELISM_CONFIG_SP_SEQ_LENGTH_IS_VARIABLE": "True",
    "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION": "sdpa"}


def _cfg(**kw):
    from ctxstretch.config import TrainConfig

    return TrainConfig(**{"steps": 3, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 1,
                          "checkpoint_every": 100, "log_every": 1, "precision": "fp32", "device": "cpu", **kw})


def _one_document_rows(tokenizer):
    """LongRecipe rows (position gaps) made one document each (sdpa under sequence parallelism needs it); row 1
    padded SFT-style: its labels stop early and its tail is another segment."""
    rows = _rows(tokenizer, length=50)

    def batch(i: int) -> dict[str, torch.Tensor]:
        b = {k: v.clone() for k, v in rows(i).items()}
        b["segment_ids"].zero_()
        b["labels"][1, 30:], b["segment_ids"][1, 30:] = -100, 1
        return b

    return batch


def test_the_slices_of_a_row_sum_to_the_one_process_loss(tokenizer):
    """Over sp = 2 and 4, the sequence slices' weighted losses — each from the whole-row logits cut to the slice,
    as Ulysses attention leaves them — add up to the one-process loss; positions and weights are cut with tokens
    (a 50-token row is padded to a multiple of sp with zero-weight tokens)."""
    from ctxstretch.train.loss import weighted_loss
    from ctxstretch.train.parallel import Layout, local_batch, sequence_part
    from tests.conftest import micro_llama

    model, batch = micro_llama(tokenizer), _one_document_rows(tokenizer)(2)
    whole = local_batch(batch, Layout(), "cpu")
    expected = weighted_loss(model(input_ids=whole["input_ids"], position_ids=whole["position_ids"]).logits,
                             whole["shift_labels"], whole["weights"]).item()
    for sp in (2, 4):
        rows = local_batch(batch, Layout(sp=sp, world=sp), "cpu")
        assert rows["input_ids"].shape[1] % sp == 0 and float(rows["weights"].sum()) == pytest.approx(1.0)
        logits = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"]).logits
        total = 0.0
        for r in range(sp):
            part = sequence_part({**rows, "logits": logits}, Layout(sp=sp, sp_rank=r, world=sp))
            assert torch.equal(part["position_ids"], rows["position_ids"].chunk(sp, 1)[r])
            total += weighted_loss(part["logits"], part["shift_labels"], part["weights"]).item()
        assert total == pytest.approx(expected, rel=1e-5)


def test_sequence_parallel_refusals_are_one_line():
    from ctxstretch.config import ConfigError, TrainConfig, UserError
    from ctxstretch.train.parallel import Layout, check_sequence_rows, check_supported

    sp = Layout(sp=2, world=2)
    cases = [(TrainConfig(), "eager", "eager", "Ulysses attention wraps sdpa or flash_attention_2"),
             (TrainConfig(), "sdpa", None, "sp_attn_implementation None differs.*sdpa"),
             (TrainConfig(fused_loss="liger"), "sdpa", "sdpa", "liger with sequence parallelism")]
    for cfg, attn, sp_attn, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            check_supported(cfg, sp, attn, True, False, sp_attn)
        assert "\n" not in str(e.value)
    check_supported(TrainConfig(), sp, "sdpa", True, True, "sdpa")
    packed = {"segment_ids": torch.tensor([[0, 0, 1, 1]]), "labels": torch.tensor([[1, 2, 3, 4]])}
    with pytest.raises(UserError, match="flash_attention_2"):
        check_sequence_rows(packed, "sdpa")
    check_sequence_rows(packed, "flash_attention_2")
    check_sequence_rows({**packed, "labels": torch.tensor([[1, 2, -100, -100]])}, "sdpa")  # padding joins


@pytest.mark.slow
def test_two_processes_under_deepspeed_ulysses_train_as_one(tmp_path, tokenizer):
    """2 CPU processes, DeepSpeed ZeRO-3 + Ulysses (sp_size 2) through accelerate, each holding half of every row:
    DeepSpeed's `UlyssesSPDataLoaderAdapter` cuts rows as `sequence_part` does, and `train_stage` follows the
    one-process loss curve to the same weights (rows with LongRecipe position gaps and a padded SFT row)."""
    pytest.importorskip("deepspeed")
    from ctxstretch.train.loop import train_stage
    from tests.conftest import micro_llama

    single = train_stage(micro_llama(tokenizer), _one_document_rows(tokenizer), _cfg(), tmp_path / "one")
    done = torchrun(__file__, str(tmp_path / "two"), timeout=300, **SP_ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["layout"] for r in ranks] == [[0, 1, 1, 2, 2, 0], [0, 1, 1, 2, 2, 1]]
    assert all(r["engine"] == "DEEPSPEED" and r["adapter_equal"] for r in ranks)
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-4, atol=1e-5)
    weights = torch.load(tmp_path / "two" / "model.pt")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=k)


def _adapter_matches(rows_fn, lay, device) -> bool:
    """DeepSpeed's data-loader adapter on a loader yielding this process's whole rows: its slice equals ours."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    from deepspeed.utils import groups

    from ctxstretch.train.parallel import local_batch, sequence_part

    rows = local_batch(rows_fn(0), lay, device)
    loader = [{k: rows[k] for k in ("input_ids", "position_ids", "labels", "weights")}]
    theirs = next(iter(UlyssesSPDataLoaderAdapter(loader, sp_rank=groups._get_sequence_parallel_rank(),
                                                  sp_group=groups._get_sequence_parallel_group(),
                                                  sp_world_size=lay.sp, device=device)))
    ours = sequence_part(rows, lay)
    same = [torch.equal(theirs[k], ours[k]) for k in ("input_ids", "position_ids", "weights", "shift_labels")]
    return all(same)


def _worker(out: Path) -> None:
    """Train `_one_document_rows` under DeepSpeed Ulysses; record the layout and the adapter comparison."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from ctxstretch.tiny import MODEL_DIR
    from ctxstretch.train import loop
    from tests.conftest import micro_llama

    # on GPUs `accelerate launch` starts DeepSpeed's process group (nccl); on CPU it must be told gloo
    PartialState(backend="gloo")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    rows = _one_document_rows(tokenizer)
    seen = {}
    layout_of = loop.layout_of

    def spy(accelerator):
        seen["lay"], seen["engine"] = layout_of(accelerator), accelerator.distributed_type.name
        return seen["lay"]

    loop.layout_of = spy
    model = loop.train_stage(micro_llama(tokenizer), rows, _cfg(), out)
    lay = seen["lay"]
    (out / f"rank-{lay.dp_rank * lay.sp + lay.sp_rank}.json").write_text(json.dumps(
        {"layout": [lay.dp_rank, lay.dp, lay.cp, lay.world, lay.sp, lay.sp_rank], "engine": seen["engine"],
         "adapter_equal": _adapter_matches(rows, lay, "cpu")}))  # DeepSpeed's groups exist once prepared
    if model is not None:
        torch.save(model.state_dict(), out / "model.pt")
    PartialState().wait_for_everyone()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo thread torn down mid-call


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))
