"""Sharded runs that finish: FSDP2 weights gathered by every rank and written once as a plain Hugging Face directory
equal to the one-process result (2 CPU processes, gloo, torch's own FSDP2); the process group's long timeout;
context-parallel rows padded without changing the loss; combinations that cannot work refused in one line.

Run as a script, this file is the worker torchrun starts in each process."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.train.test_distributed import _rows, torchrun

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_MIN = "77"  # the worker's process group must wait this long, not accelerate's or torch's default


def _train_step(model: torch.nn.Module, tokenizer, lay) -> None:
    """One SGD step on this process's share of a fixed global batch, as `train_stage` scales it (gradients are
    averaged over `lay.world` processes, the loss shares are sums)."""
    from ctxstretch.train.loss import weighted_loss
    from ctxstretch.train.parallel import local_batch

    b = local_batch(_rows(tokenizer)(0), lay, "cpu")
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    (weighted_loss(logits, b["shift_labels"], b["weights"]) * lay.world).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()


@pytest.mark.slow
def test_fsdp2_weights_are_gathered_into_the_one_process_directory(tmp_path, tokenizer):
    """2 processes train one step under FSDP2 (each holding half of every weight), gather, and the main one writes
    `model/`: the same files and tensors as one process training the same step alone; the other gets no model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ctxstretch.models import save
    from ctxstretch.train.parallel import Layout
    from tests.conftest import micro_llama

    single = micro_llama(tokenizer)
    _train_step(single, tokenizer, Layout())
    save(single, tokenizer, tmp_path / "one")
    done = torchrun(__file__, str(tmp_path / "two"), timeout=180, CTXSTRETCH_DIST_TIMEOUT_MIN=TIMEOUT_MIN)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["got_model"] for r in ranks] == [True, False], "the main process alone gets the gathered model"
    assert all(r["sharded"] and r["exact_before_training"] for r in ranks)
    assert {r["timeout_min"] for r in ranks} == {float(TIMEOUT_MIN)}
    one, two = tmp_path / "one", tmp_path / "two" / "model"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not list((tmp_path / "two").glob("*.tmp"))
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    init = micro_llama(tokenizer).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(a[k], init[k]) for k in a), "the step changed the weights"
    reloaded = AutoModelForCausalLM.from_pretrained(two)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight, "tied embeddings stay tied"


def test_a_sharded_stage_hands_back_a_new_plain_model_and_a_stopped_one_its_weights(tmp_path, tokenizer,
                                                                                    monkeypatch):
    """train_stage's sharded ending, with one process standing in for the engine: the result is a new model (the
    given one is spent) holding exactly the weights plain training reaches; a resumed stage that had already met
    its stopping rule returns the weights it stopped with (its sharded checkpoint holds no optimizer.pt)."""
    from ctxstretch.train import checkpoints, loop
    from tests.conftest import micro_llama

    cfg = _cfg(steps=4, checkpoint_every=2, lr=1e-3, warmup_steps=0, eval_every=2)
    plain = loop.train_stage(micro_llama(tokenizer), _rows(tokenizer), cfg, tmp_path / "plain")
    monkeypatch.setattr(loop, "sharded", lambda accelerator: True)
    monkeypatch.setattr(checkpoints, "sharded", lambda accelerator: True)
    given = micro_llama(tokenizer)
    got = loop.train_stage(given, _rows(tokenizer), cfg, tmp_path / "sharded")
    assert got is not given and not got.training and not got.is_activation_checkpointing
    assert got.lm_head.weight is got.model.embed_tokens.weight and got.config.to_dict() == plain.config.to_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert (checkpoints.latest_checkpoint(tmp_path / "sharded") / "sharded").is_dir()

    def evaluate(model, step):
        return {"step_seen": float(step)}

    stopped = loop.train_stage(micro_llama(tokenizer), _rows(tokenizer), cfg, tmp_path / "stop", eval_fn=evaluate,
                               stop_when=lambda rec: rec["step_seen"] >= 2)
    again = loop.train_stage(micro_llama(tokenizer), _rows(tokenizer), cfg, tmp_path / "stop", resume=True,
                             eval_fn=evaluate, stop_when=lambda rec: rec["step_seen"] >= 2)
    init = micro_llama(tokenizer).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in again.state_dict().items())
    for k, v in stopped.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_the_weightless_copy_holds_no_weights_and_keeps_ties(tokenizer):
    from ctxstretch.train.checkpoints import weightless_copy
    from tests.conftest import micro_llama

    model = micro_llama(tokenizer)
    copy = weightless_copy(model)
    assert all(p.is_meta for p in copy.parameters()) and not any(p.is_meta for p in model.parameters())
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert all(not b.is_meta for b in copy.buffers()), "rotary frequencies are not in the state dict: kept"


def test_the_process_group_timeout_is_long_and_configurable(monkeypatch):
    from ctxstretch.config import ConfigError
    from ctxstretch.train.parallel import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == timedelta(hours=6)
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout() == timedelta(minutes=90)
    for bad in ("soon", "0", "-5", "inf"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=TIMEOUT_ENV):
            collective_timeout()


def test_context_parallel_rows_are_padded_without_changing_the_loss(tokenizer):
    """Rows of 46 tokens over cp 2 become 48 (a multiple of 2·cp); the padding is ignored and weighs nothing, so
    each data-parallel rank's loss share, and their sum, equal the unpadded ones."""
    from ctxstretch.data.probes import IGNORE
    from ctxstretch.train.loss import row_mean_loss, weighted_loss
    from ctxstretch.train.parallel import Layout, local_batch
    from tests.conftest import micro_llama

    model = micro_llama(tokenizer)
    batch = _rows(tokenizer, length=46)(1)

    def share(b):
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        return weighted_loss(logits, b["shift_labels"], b["weights"]).item()

    shares = []
    for rank in range(2):
        plain = local_batch(batch, Layout(dp_rank=rank, dp=2, world=2), "cpu")
        padded = local_batch(batch, Layout(dp_rank=rank, dp=2, cp=2, world=4), "cpu")
        assert padded.keys() == plain.keys() and all(v.shape == (2, 48) for v in padded.values())
        for k, v in plain.items():
            assert torch.equal(padded[k][:, :46], v), k
        tail = {k: v[:, 46:] for k, v in padded.items()}
        assert (tail["labels"] == IGNORE).all() and (tail["shift_labels"] == IGNORE).all()
        assert (tail["weights"] == 0).all()
        for k in ("input_ids", "position_ids", "segment_ids"):
            assert torch.equal(tail[k], plain[k][:, -1:].expand(-1, 2)), k
        assert share(padded) == pytest.approx(share(plain), rel=1e-5)
        shares.append(share(padded))
    whole = row_mean_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                          batch["labels"]).item()
    assert sum(shares) == pytest.approx(whole, rel=1e-5)


def test_rows_already_a_multiple_of_two_cp_are_left_alone(tokenizer):
    from ctxstretch.train.parallel import Layout, local_batch, pad_columns

    batch = _rows(tokenizer)(0)  # 48 tokens: a multiple of 2·cp for cp 2, 3 and 4
    assert local_batch(batch, Layout(cp=4, world=4), "cpu")["input_ids"].shape == (4, 48)
    assert pad_columns(batch, 8) is batch


def _cfg(**kw):
    from ctxstretch.config import TrainConfig

    return TrainConfig(**{"steps": 1, "batch_size": 2, "precision": "fp32", "device": "cpu", **kw})


@pytest.mark.parametrize("kw, lay, attn, zero3, lora, match", [
    ({"attn_implementation": "flash_attention_2"}, {"cp": 2, "world": 2}, "flash_attention_2", False, False,
     "flash_attention_2 with context parallelism .*attn_implementation: sdpa"),
    ({}, {"cp": 2, "world": 2}, "eager", False, False, "eager with context parallelism"),
    ({"fused_loss": "liger"}, {}, "sdpa", True, False, "fused_loss liger under DeepSpeed ZeRO-3.*fused_loss: none"),
    ({"fused_loss": "liger"}, {}, "sdpa", False, True, "fused_loss liger with LoRA.*fused_loss: none"),
    ({"fused_loss": "liger"}, {"cp": 2, "world": 2}, "sdpa", False, False, "liger with context parallelism"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(kw, lay, attn, zero3, lora, match):
    from ctxstretch.config import ConfigError
    from ctxstretch.train.parallel import Layout, check_supported

    with pytest.raises(ConfigError, match=match) as e:
        check_supported(_cfg(**kw), Layout(**lay), attn, zero3, lora)
    assert "\n" not in str(e.value)


def test_supported_combinations_pass():
    from ctxstretch.masking import DOC_ATTENTION
    from ctxstretch.train.parallel import Layout, check_supported

    check_supported(_cfg(), Layout(cp=2, world=2), "sdpa", True, True)
    check_supported(_cfg(), Layout(cp=2, world=2), DOC_ATTENTION, False, False)
    check_supported(_cfg(attn_implementation="flash_attention_2"), Layout(dp=2, world=2), "flash_attention_2",
                    True, True)
    check_supported(_cfg(fused_loss="liger"), Layout(dp=2, world=2), "sdpa", False, False)


def test_train_stage_refuses_liger_on_a_lora_model_before_anything_runs(tmp_path, tokenizer):
    from ctxstretch.config import ConfigError
    from ctxstretch.train.loop import train_stage
    from ctxstretch.train.lora import with_lora
    from tests.conftest import micro_llama

    with pytest.raises(ConfigError, match="fused_loss liger with LoRA"):
        train_stage(with_lora(micro_llama(tokenizer), 2, False), _rows(tokenizer), _cfg(fused_loss="liger"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_flash_attention_under_sequence_parallelism_refuses_packed_rows_beyond_one_per_group(tokenizer):
    """Under Ulysses, transformers separates packed documents for flash-attention-2 only at batch size 1 (the
    varlen path with our own boundaries is not used there): two packed rows per group are refused; one packed row,
    or several one-document rows (trailing padding included), pass."""
    from ctxstretch.config import ConfigError
    from ctxstretch.data.probes import IGNORE
    from ctxstretch.train.parallel import Layout, check_flash_rows

    ids = torch.arange(12).view(2, 6)
    packed = {"input_ids": ids, "segment_ids": torch.tensor([[0, 0, 0, 1, 1, 1]] * 2), "labels": ids.clone()}
    with pytest.raises(ConfigError, match="one row per sequence-parallel group, not 2.*batch_size to 2") as e:
        check_flash_rows(packed, Layout(dp=2, world=2))
    assert "\n" not in str(e.value)
    check_flash_rows({k: v[:1] for k, v in packed.items()}, Layout())
    padded_labels = ids.clone()
    padded_labels[:, 3:] = IGNORE  # one document, then padding (its own segment, unlabelled)
    check_flash_rows({**packed, "labels": padded_labels}, Layout())


def _worker(out: Path) -> None:
    """Shard a micro Llama with FSDP2 over the gloo processes, train one step, gather, write `out/model` once."""
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers import AutoTokenizer

    from ctxstretch.models import save
    from ctxstretch.tiny import MODEL_DIR
    from ctxstretch.train.checkpoints import unsharded, weightless_copy
    from ctxstretch.train.parallel import Layout, distributed_state
    from tests.conftest import micro_llama

    state = distributed_state("cpu")  # starts the process group, as the pipeline does first
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    init = micro_llama(tokenizer).state_dict()
    model = micro_llama(tokenizer)
    skeletons = [weightless_copy(model) if main else None for _ in range(2)]
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = isinstance(model, FSDPModule) and model.lm_head.weight.to_local().shape[0] < len(tokenizer)
    before = unsharded(accelerator, model, skeletons[0])
    exact = before is None or all(torch.equal(v, init[k]) for k, v in before.state_dict().items())
    _train_step(model, tokenizer, Layout(dp_rank=rank, dp=world, world=world))
    whole = unsharded(accelerator, model, skeletons[1])
    if main:
        save(whole, tokenizer, out / "model")
    state.wait_for_everyone()
    timeout = torch.distributed.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "got_model": whole is not None, "sharded": sharded, "exact_before_training": exact,
        "timeout_min": timeout.total_seconds() / 60}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))
