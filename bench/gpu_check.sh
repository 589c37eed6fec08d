#!/usr/bin/env bash
# GPU readiness check (see bench/gpu_check.py): one table, ≤ 8 minutes on one H100/H200.
#   bash bench/gpu_check.sh            # on a CUDA machine (tiny CPU sizes when no CUDA is visible)
#   bash bench/gpu_check.sh --dry-run  # every check at tiny sizes on the CPU, < 60 s
# Needs torch and transformers importable by $PYTHON (default: .venv/bin/python when present, else python3);
# ctxstretch is taken from src/ of this checkout.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
limit=480
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then limit=120; fi
done
exec timeout "$limit" "$PYTHON" bench/gpu_check.py "$@"
