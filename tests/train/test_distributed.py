"""The distributed path: 2 CPU processes (gloo, started by torchrun) follow the single-process loss curve on
the same global batch, write checkpoints once, and resume after a crash.

Run as a script, this file is the worker torchrun starts in each process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CRASH_AT = 4  # optimizer step whose rows raise in the "crash" run (after the step-3 checkpoint)


def _cfg():
    from ctxstretch.config import TrainConfig

    return TrainConfig(steps=6, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, checkpoint_every=3,
                       log_every=1, precision="fp32", device="cpu")


def _rows(tokenizer, length: int = 48):
    from ctxstretch.data.mix import RowMixer

    stream = np.random.default_rng(0).integers(0, len(tokenizer), 20000).astype(np.uint16)
    return RowMixer(tokenizer, stream, name="t", seed=0, length=length, batch=4,
                    mix={"text": 1, "random_copy": 1}, positions="longrecipe", target=256, contiguous_share=0.3)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_weighted_shares_sum_to_the_row_mean_loss(tokenizer):
    """Each rank's share of the loss (its rows, weighted over the global batch) sums to the single-process loss."""
    from ctxstretch.train.loss import row_mean_loss, weighted_loss
    from ctxstretch.train.parallel import Layout, local_batch
    from tests.conftest import micro_llama

    model = micro_llama(tokenizer)
    batch = _rows(tokenizer)(3)
    batch["labels"][1] = -100  # a row without labels weighs nothing
    whole = row_mean_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).item()
    shares = []
    for rank in range(2):
        b = local_batch(batch, Layout(dp_rank=rank, dp=2, world=2), "cpu")
        shares.append(weighted_loss(model(input_ids=b["input_ids"]).logits, b["shift_labels"], b["weights"]).item())
    assert sum(shares) == pytest.approx(whole, rel=1e-5)


def test_an_uneven_split_is_refused(tokenizer):
    from ctxstretch.config import ConfigError
    from ctxstretch.train.parallel import Layout, local_batch

    with pytest.raises(ConfigError, match="not divisible"):
        local_batch(_rows(tokenizer)(0), Layout(dp_rank=0, dp=3, world=3), "cpu")


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2_cp", "deepspeed_zero3", "deepspeed_zero3_offload"])
def test_shipped_accelerate_configs_load(name, monkeypatch):
    """Each shipped config parses with accelerate's own classes and launch validation (the GPU runs are not
    tested here); the FSDP ones build the plugin (and parallelism config) a launched process would."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from ctxstretch.train.parallel import accelerate_config

    path = accelerate_config(name)
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig) and config.mixed_precision == "bf16"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    _validate_launch_command(args)
    if name.startswith("deepspeed"):
        assert config.distributed_type == DistributedType.DEEPSPEED and args.zero_stage == 3
        assert args.offload_param_device == ("cpu" if name.endswith("offload") else "none")
        return
    if name == "ddp":
        assert args.multi_gpu and not args.use_fsdp
        return
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True and plugin.activation_checkpointing
    assert plugin.transformer_cls_names_to_wrap is None, "no architecture named: the model's _no_split_modules rule"
    if name == "fsdp2_cp":
        from accelerate.parallelism_config import ParallelismConfig

        pc = ParallelismConfig()
        assert pc.cp_enabled and pc.cp_backend == "torch" and pc.total_size == config.num_processes


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_cp"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fsdp_configs_wrap_each_decoder_layer_of_any_architecture(name, arch, monkeypatch):
    """What accelerate's fsdp2_prepare_model does with a shipped config: one FSDP unit per decoder layer, found
    from the model's `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, MistralDecoderLayer)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers import AutoConfig, AutoModelForCausalLM

    from ctxstretch.train.parallel import accelerate_config

    args = launch_command_parser().parse_args(["--config_file", str(accelerate_config(name)), "train.py"])
    _validate_launch_command(args)
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    config = AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [n for n, m in model.named_modules() if policy(m)] == ["model.layers.0", "model.layers.1"]
    layer = type(model.model.layers[0]).__name__
    assert set(plugin.transformer_cls_names_to_wrap) == set(model._no_split_modules) == {layer}


def torchrun(*args: str, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run` with 2 CPU processes on a free port, offline, one thread each; `env` adds
    variables (CTXSTRETCH_DIST_TIMEOUT_MIN is unset unless given)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    full = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full.pop("CTXSTRETCH_DIST_TIMEOUT_MIN", None)
    # `accelerate launch --cpu` starts one process (multi-CPU goes through mpirun or torchrun); torchrun sets
    # RANK/WORLD_SIZE and accelerate's state picks gloo from them, as it does for GPUs under `accelerate launch`
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), *args]
    return subprocess.run(cmd, env={**full, **env}, capture_output=True, text=True, timeout=timeout)


def _launch(out: Path, mode: str) -> subprocess.CompletedProcess:
    return torchrun(__file__, str(out), mode)


@pytest.mark.slow
def test_two_processes_follow_the_single_process_curve_and_resume(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from ctxstretch.train.checkpoints import latest_checkpoint
    from ctxstretch.train.loop import train_stage
    from tests.conftest import micro_llama

    single = train_stage(micro_llama(tokenizer), _rows(tokenizer), _cfg(), tmp_path / "one")
    crashed = _launch(tmp_path / "two", "crash")
    assert crashed.returncode != 0, crashed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "two").name == "step-3"
    assert not list((tmp_path / "two" / "checkpoints").glob("*.tmp"))
    resumed = _launch(tmp_path / "two", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks == [{"world": 2, "backend": "gloo", "timeout_min": 360.0}] * 2, "train_stage's long timeout"
    assert len(_losses(tmp_path / "two")) == 6, "one metrics line per step, written by one process"
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-4, atol=1e-5)
    weights = load_file(latest_checkpoint(tmp_path / "two") / "model.safetensors")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_a_recipe_runs_under_two_processes(tmp_path, tokenizer):
    """`ctxstretch train` under torchrun: both processes train, one evaluates (a stage and the result) and writes
    while the other waits, each process continues from every stage's saved model, the output is whole."""
    import yaml
    from transformers import AutoModelForCausalLM

    from tests.conftest import micro_llama

    model_dir = tmp_path / "micro"
    micro_llama(tokenizer, window=128).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(model_dir), "target": 512, "device": "cpu",
        "eval": {"lengths": [128, 512], "depths": [0.5], "trials": 1, "loss_rows": 1, "short_rows": 1},
        "stages": [{"name": "long", "positions": "longrecipe", "length_fraction": 0.3, "evaluate": True,
                    "train": {"steps": 2, "batch_size": 2, "warmup_steps": 0, "log_every": 1, "device": "cpu",
                              "precision": "fp32"}},
                   {"name": "merge", "merge": {"weight": 0.5}}]}))
    done = torchrun("-m", "ctxstretch.cli", "train", str(recipe), "--out", str(tmp_path / "run"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "report.md").exists() and (run / "stages" / "merge" / "done.json").exists()
    assert (run / "stages" / "long" / "eval" / "eval.json").exists()
    steps = [json.loads(x) for x in (run / "stages" / "long" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2], "one metrics line per step, written by one process"
    assert AutoModelForCausalLM.from_pretrained(run / "model").config.max_position_embeddings == 512


def _worker(out: Path, mode: str) -> None:
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from ctxstretch.tiny import MODEL_DIR
    from ctxstretch.train.loop import train_stage
    from tests.conftest import micro_llama

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    rows, cfg = _rows(tokenizer), _cfg()

    def crashing(i: int):
        if i == CRASH_AT * cfg.grad_accum:
            raise RuntimeError("simulated kill")
        return rows(i)

    train_stage(micro_llama(tokenizer), crashing if mode == "crash" else rows, cfg, out, resume=mode == "resume")
    state = PartialState()
    timeout = torch.distributed.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    (out / f"rank-{state.process_index}.json").write_text(json.dumps({
        "world": state.num_processes, "backend": state.backend, "timeout_min": timeout.total_seconds() / 60}))
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo thread torn down mid-call


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]), sys.argv[2])
