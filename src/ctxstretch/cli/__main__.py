"""`python -m ctxstretch.cli …` (as under `torchrun` / `accelerate launch`)."""

from . import app

app()
