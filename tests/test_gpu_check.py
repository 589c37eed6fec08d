import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert "set -euo pipefail" in SCRIPT.read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_prints_one_table_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [ln for ln in done.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0].startswith("| check |") and len(rows) == 1 + 2 + 4 + 1
    assert "skipped: no flash-attn/CUDA" in rows[1]
    assert rows[2].startswith("| chunked vs plain loss") and rows[2].endswith("| ok |")
    assert all("tok/s" in r for r in rows[3:7])
    assert rows[7].startswith("| longest trainable row") and "2,048 tokens" in rows[7]
