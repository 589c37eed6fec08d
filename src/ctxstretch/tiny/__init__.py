"""The embedded base model: a small Llama with a 256-token window, built by `ctxstretch tiny build`."""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
