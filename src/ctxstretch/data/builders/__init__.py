"""The `ctxstretch data …` builders: each reads sources or synthesises examples, runs one transform (packing, CIP,
SynL, self-instruct, impactful tokens, probes) and writes a dataset folder through `datasets.write_dataset`.

A builder is a typed argument model and a function (`registry.py`: `REGISTRY`, `run_builder`); `build_KIND` is its
Python API. Text sources are read in `corpus.py`."""

from .corpus import read_corpus
from .model_driven import build_impactful, build_selfinstruct
from .registry import REGISTRY, BuilderArgs, builder, builder_args, run_builder
from .synth import build_probes, build_synl
from .text import build_cip, build_pack

__all__ = ["REGISTRY", "BuilderArgs", "build_cip", "build_impactful", "build_pack", "build_probes",
           "build_selfinstruct", "build_synl", "builder", "builder_args", "read_corpus", "run_builder"]
