"""A training run killed with SIGKILL resumes with --resume and ends with the same weights (bitwise, CPU)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from transformers import AutoTokenizer
    from ctxstretch.config import TrainConfig
    from ctxstretch.data.mix import RowMixer
    from ctxstretch.tiny import MODEL_DIR
    from ctxstretch.train.checkpoints import plain_state_dict
    from ctxstretch.train.loop import train_stage
    from safetensors.torch import save_file
    sys.path.insert(0, {root!r})
    from tests.conftest import micro_llama

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    stream = np.random.default_rng(0).integers(0, len(tok), 20000).astype(np.uint16)
    rows = RowMixer(tok, stream, name="k", seed=0, length=48, batch=2, mix={{"text": 1, "random_copy": 1}},
                    positions="longrecipe", target=256, contiguous_share=0.3)
    cfg = TrainConfig(steps=40, batch_size=2, lr=1e-3, warmup_steps=3, checkpoint_every=1, log_every=1,
                      precision="fp32")
    run = Path(sys.argv[1])
    model = train_stage(micro_llama(tok), rows, cfg, run, resume=len(sys.argv) > 2)
    save_file(plain_state_dict(model), run / "final.safetensors")
""")


def launch(tmp_path, run, resume=False):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=os.getcwd()))
    args = [sys.executable, str(script), str(run)] + (["resume"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def steps_done(run):
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_three_points_then_resume_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    assert launch(tmp_path, ref).wait(timeout=600) == 0
    run = tmp_path / "killed"
    first = True
    for kill_after in (5, 17, 29):
        proc = launch(tmp_path, run, resume=not first)
        first = False
        deadline = time.time() + 300
        while steps_done(run) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "final.safetensors").exists()
    assert launch(tmp_path, run, resume=True).wait(timeout=600) == 0
    a, b = load_file(ref / "final.safetensors"), load_file(run / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list((run / "checkpoints").glob("*.tmp")), "no half-written checkpoint is left behind"
