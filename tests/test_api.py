"""The Python API (`from ctxstretch import extend, evaluate, …`): keyword for flag, the run directory the command
line writes, and an `import ctxstretch` that loads no torch."""

import json
import subprocess
import sys

import pytest

import ctxstretch
from ctxstretch import evaluate, extend, extend_config
from ctxstretch.config import ConfigError

# a tiny budget on the embedded model (window 256): two training steps, one probe per cell
TINY_EVAL = {"trials": 1, "depths": [0.5], "needle": False, "loss_rows": 1, "heldout_trials": 1,
             "heldout_depths": [0.5], "short_rows": 1, "chat": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    report = extend(model="embedded", target=512, out=out, method="yarn", steps=2, batch_size=1, warmup_steps=0,
                    checkpoint_every=2, log_every=1, device="cpu", eval={**TINY_EVAL, "lengths": [256, 512]})
    return out, report


def test_extend_writes_a_plain_hf_model_with_the_rope_asked_for(run):
    from transformers import AutoModelForCausalLM

    out, _ = run
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.max_position_embeddings == 512
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0 and rope["original_max_position_embeddings"] == 256


def test_extend_returns_the_report_that_carries_both_evaluations(run):
    out, report = run
    assert report == out / "report.md" and "| passkey @ 512 |" in report.read_text()
    for model in ("base", "extended"):
        data = json.loads((out / model / "eval.json").read_text())
        assert data["passkey"]["lengths"] == [256, 512] and data["heldout"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2]


def test_evaluate_measures_the_extended_model(run, tmp_path):
    out, _ = run
    report = evaluate(str(out / "model"), out=tmp_path / "ev", lengths=[512], **TINY_EVAL)
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report == tmp_path / "ev" / "report.md" and report.exists()
    assert data["window"] == 256 and data["passkey"]["lengths"] == [512] and data["short_context"]["rows"] == 1


def test_settings_are_named_as_in_config_yaml():
    cfg = extend_config(model="embedded", target=1024, steps=3, lr=1e-3, eval={"trials": 2})
    assert (cfg.target, cfg.train.steps, cfg.train.lr, cfg.eval.trials) == (1024, 3, 1e-3, 2)
    assert extend_config(train={"steps": 3}, batch_size=2).train.model_dump(exclude_unset=True) == {
        "steps": 3, "batch_size": 2}
    with pytest.raises(ConfigError, match="extend\\(\\).*positons.*did you mean 'positions'"):
        extend_config(positons="pose")
    with pytest.raises(ConfigError, match="not both"):
        extend_config("config.yaml", steps=3)


def test_the_api_names_stay_functions_beside_their_submodules():
    import importlib

    for name in ("ctxstretch.recipes.extend", "ctxstretch.compare", "ctxstretch.train.loop"):
        importlib.import_module(name)  # loading a submodule binds it on its package, unless the name is the API's
    from ctxstretch import compare, train

    assert ctxstretch.extend is extend and {f.__module__ for f in (extend, train, compare)} == {"ctxstretch"}
    assert sys.modules["ctxstretch.compare"].run_compare and sys.modules["ctxstretch.train.loop"].train_stage
    assert set(ctxstretch.__all__) >= {"extend", "evaluate", "train", "compare", "report"}
    assert ctxstretch.ExtendConfig is sys.modules["ctxstretch.recipes.extend"].ExtendConfig


def test_importing_the_package_loads_no_torch():
    code = "import sys, ctxstretch; assert ctxstretch.extend and 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
