"""End to end: `ctxstretch extend` on the embedded model with a reduced budget."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ctxstretch.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    cfg = out.parent / "small.yaml"
    cfg.write_text(yaml.safe_dump({
        "target": 1024, "method": "yarn",
        "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1},
        "eval": {"trials": 1, "depths": [0.0, 1.0], "loss_rows": 2, "lm_eval_tasks": []},
    }))
    result = CliRunner().invoke(app, ["extend", "--config", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_run_directory_is_complete(run_dir):
    for name in ("report.md", "metrics.jsonl", "config.yaml", "needle.png", "passkey.png", "loss_by_position.png",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "checkpoints").exists()
    report = (run_dir / "report.md").read_text()
    assert "| passkey @ 1,024 |" in report and "## Targets" in report
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Held-out families (headline)" and sections.index("## In-format probes") > 0
    assert re.search(r"\| 1,024 \(4× window\) \| \d\.\d\d ± \d\.\d\d \(72 probes\)", report), "probes, interval"
    assert re.search(r"\| 1,024 \(4× window\) \| \d+% \(\d+/72; \d+%–\d+%\)", report), "exact match, Wilson"
    assert "re-run: `ctxstretch extend --config config.yaml --out DIR`" in report
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4]
    assert {r.get("eval") for r in records} >= {"base", "extended"}


def test_rope_configuration_changed_as_asked(run_dir):
    cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 1024
    rope = cfg["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
    assert rope["original_max_position_embeddings"] == 256 and rope["rope_theta"] == 10000.0


def test_config_yaml_reruns_the_same_settings(run_dir):
    """`--config RUN/config.yaml` resolves to exactly what ran: every derived setting was written down."""
    from ctxstretch import extend_config
    from ctxstretch.recipes.extend import resolve_extend

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    again, _ = resolve_extend(extend_config(run_dir / "config.yaml"))
    assert again.model_dump(mode="json") == saved
    assert saved["target"] == 1024 and saved["train"]["steps"] == 4 and saved["train_length"] == 512


def test_model_loads_and_generates_without_ctxstretch(run_dir):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ctxstretch":
                    raise ImportError("ctxstretch must not be needed")
        sys.meta_path.insert(0, Block())
        sys.modules.pop("ctxstretch", None)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained({str(run_dir / "model")!r})
        t = AutoTokenizer.from_pretrained({str(run_dir / "model")!r})
        ids = t("def main():", return_tensors="pt").input_ids
        out = m.generate(ids, max_new_tokens=8, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 8
        print("generated", repr(t.decode(out[0])))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "generated" in res.stdout


def test_lora_extension_writes_a_plain_merged_model(tmp_path, micro_model_dir):
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(micro_model_dir), "target": 256, "lora_rank": 4,
        "train": {"steps": 2, "batch_size": 1, "checkpoint_every": 1, "log_every": 1},
        "eval": {"trials": 1, "depths": [0.5], "needle": False, "loss_rows": 0, "lengths": [256]},
    }))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["extend", "--config", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    merged, base = load_file(out / "model" / "model.safetensors"), load_file(micro_model_dir / "model.safetensors")
    assert not any("lora" in k or "base_model" in k for k in merged) and merged.keys() == base.keys()
    changed = [k for k in base if "proj" in k and not torch.equal(merged[k], base[k])]
    assert changed, "the adapters' training is merged into the projections"
    assert json.loads((out / "model" / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
