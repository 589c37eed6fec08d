import json

import pytest
from typer.testing import CliRunner

from ctxstretch.cli import app
from ctxstretch.plan import GPUS, flops_per_token, memory_for, plan, read_shape

runner = CliRunner()
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "tie_word_embeddings": False}


@pytest.fixture
def llama2(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    return path


def test_llama2_7b_arithmetic(llama2):
    shape = read_shape(llama2)
    assert shape.params == 6_738_415_616  # the published parameter count of Llama-2-7B
    r = plan(llama2, 131072, "h100", 8, tokens=1e9, mfu=0.4)
    assert r["weights_bf16_gb"] == pytest.approx(13.48, abs=0.01)
    assert r["train_length"] == 39424  # 0.3 × 128K, rounded to 256
    n = 6_738_415_616 - 32000 * 4096  # the embedding lookup is no matmul; the untied LM head is
    assert r["flops_per_token"] == 6 * n + 12 * 32 * 39424 * 4096
    hours = 1e9 * r["flops_per_token"] / (8 * 989e12 * 0.4) / 3600
    rec = r["recommendation"]
    assert r["hours"] == pytest.approx(hours * (4 / 3 if rec["checkpointing"] else 1))
    mem = memory_for(shape, 4096, 8, "fp32", sharded=True, checkpointing=False, cp=1)
    assert mem["weights_gb"] + mem["grads_gb"] + mem["optimizer_gb"] == pytest.approx(16 * 6.738415616 / 8)
    assert rec["fits"] and rec["total_gb"] <= 80 * 0.9 and rec["engine"].startswith("fsdp2")


def test_memory_rules_hold(llama2):
    shape = read_shape(llama2)
    base = memory_for(shape, 32768, 8, "fp32", False, False, 1)
    assert memory_for(shape, 32768, 8, "fp32", False, True, 1)["activations_gb"] < base["activations_gb"] / 5
    assert memory_for(shape, 32768, 8, "fp32", True, False, 1)["optimizer_gb"] == pytest.approx(
        base["optimizer_gb"] / 8)
    assert memory_for(shape, 32768, 8, "bf16", False, False, 1)["weights_gb"] == pytest.approx(
        base["weights_gb"] / 2)
    assert memory_for(shape, 32768, 8, "fp32", True, True, 4)["activations_gb"] == pytest.approx(
        memory_for(shape, 8192, 8, "fp32", True, True, 1)["activations_gb"])
    assert flops_per_token(shape, 65536) > flops_per_token(shape, 4096)


def test_longer_targets_need_more_parallelism(llama2):
    small = plan(llama2, 8192, "h200", 8)["recommendation"]
    huge = plan(llama2, 1 << 20, "h200", 8)["recommendation"]
    assert small["cp"] == 1 and huge["cp"] > 1 and huge["checkpointing"]
    one = plan(llama2, 32768, "a100-40g", 1)["recommendation"]
    assert not one["fits"] and one["engine"] == "deepspeed_zero3_offload"


def test_gpu_table_names_its_sources():
    assert set(GPUS) == {"h100", "h200", "a100-80g", "a100-40g", "l40s"}
    assert all(g.source and g.bf16_tflops > 100 and g.memory_gb >= 40 for g in GPUS.values())


def test_cli_table_and_json(llama2):
    result = runner.invoke(app, ["plan", "--model", str(llama2), "--target", "64k", "--gpus", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"] == 6_738_415_616 and data["target"] == 65536 and data["gpus"] == 4
    result = runner.invoke(app, ["plan", "--model", "embedded", "--target", "4k", "--gpus", "1"])
    assert result.exit_code == 0 and "recommended" in result.output


@pytest.mark.parametrize("args, message", [
    (["--gpu", "h1000"], "did you mean 'h100'"),
    (["--gpus", "0"], "--gpus 0"),
    (["--mfu", "1.5"], "--mfu"),
    (["--target", "lots"], "not a number"),
    (["--model", "nowhere/config.json"], "no such file"),
    (["--model", "BAD_JSON"], "invalid JSON"),
    (["--model", "NO_HIDDEN"], "hidden_size"),
    (["--master", "fp8"], "--master"),
])
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, args, message):
    bad, partial = tmp_path / "bad.json", tmp_path / "partial.json"
    bad.write_text("{not json")
    partial.write_text(json.dumps({k: v for k, v in LLAMA2_7B.items() if k != "hidden_size"}))
    args = [{"BAD_JSON": str(bad), "NO_HIDDEN": str(partial)}.get(a, a) for a in args]
    result = runner.invoke(app, ["plan", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_accelerate_config_command_prints_a_path():
    result = runner.invoke(app, ["accelerate-config", "fsdp2"])
    assert result.exit_code == 0 and result.output.strip().endswith("fsdp2.yaml")
    result = runner.invoke(app, ["accelerate-config", "fsdp3"])
    assert result.exit_code == 2 and "choose from" in result.output


# the "step" column of bench/RESULTS.md ("Memory of one training step"): peak RSS of one `train_stage` step of the
# embedded model on one one-document row, minus the RSS before it, in MiB
MEASURED_STEP_MIB = {4096: 507, 8192: 919, 16384: 1633, 32768: 2567, 65536: 4430}


@pytest.mark.parametrize("length", sorted(MEASURED_STEP_MIB))
def test_plan_agrees_with_the_measured_training_step_within_20_percent(length):
    """plan models the code as it runs (one process, fp32 master weights, bf16 autocast, no checkpointing, the
    chunked LM head): its total is within 20% of the measured step at every length from 4K to 64K."""
    mem = memory_for(read_shape("embedded"), length, 1, "fp32", sharded=False, checkpointing=False, cp=1)
    planned_mib = mem["total_gb"] * 1e9 / 2**20
    assert planned_mib / MEASURED_STEP_MIB[length] == pytest.approx(1.0, abs=0.2)


# SmolLM2-135M-Instruct's shape (its config.json) and its measured steady-state step with activation checkpointing:
# bench/RESULTS.md ("SmolLM2-135M-Instruct, one training step"), `bench_memory.py --steps 2 --mmap-threshold 65536`;
# the step is measured after the weights are loaded, so the plan's weights are left out of the comparison
SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
           "max_position_embeddings": 8192, "head_dim": 64}
SMOLLM2_STEP_MIB = {4096: 3140, 8192: 3456, 16384: 4091}


@pytest.mark.parametrize("length", sorted(SMOLLM2_STEP_MIB))
def test_plan_agrees_with_a_real_models_checkpointed_step_within_20_percent(length, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMOLLM2))
    mem = memory_for(read_shape(config), length, 1, "fp32", sharded=False, checkpointing=True, cp=1)
    planned_mib = (mem["total_gb"] - mem["weights_gb"]) * 1e9 / 2**20
    assert planned_mib / SMOLLM2_STEP_MIB[length] == pytest.approx(1.0, abs=0.2)
