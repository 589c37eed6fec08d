"""Tokenisation memory: peak memory of the `ctxstretch data pack` read path (read → tokenise → write the token cache)
on a synthetic corpus of S and 10×S MB, each size in a fresh process.

    nice -n 10 python bench/bench_data_memory.py [--mb 20] [--scale 10] [--tmp /tmp]

The corpus is JSONL of random English-like words (log-normal document lengths), written under a temporary folder that
is deleted afterwards. Each child runs `builders.read_corpus` with the token cache on (a fresh cache folder), which is
what `data pack` / `data cip` do before packing, and reports:

- peak RSS (`getrusage` ru_maxrss): everything resident, including pages of memory-mapped files that were touched;
- peak anonymous RSS (RssAnon from /proc/self/status, sampled every 5 ms): memory the process itself owns (Python
  objects, numpy/Arrow buffers, tokenizer scratch), i.e. what must stay flat as the corpus grows. File-backed pages of
  the memory-mapped token cache are page cache the kernel can drop at any time and are not counted here.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

_SYLLABLES = ("ka", "lo", "mi", "ne", "ra", "to", "su", "de", "vi", "an", "er", "in", "on", "st", "th", "ch", "pl",
              "or", "al", "en", "es", "re", "ti", "co", "ma", "pe", "li", "un", "ge", "wa")


def write_corpus(folder: Path, mb: float, seed: int) -> int:
    """JSONL files (~10 MB each) of documents of random words, `mb` MB of text in all. Returns bytes written."""
    rng = np.random.default_rng(seed)
    words = np.array(sorted({"".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(20_000)}))
    common = np.array(["the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "was", "on", "with", "as"])
    vocab = np.concatenate([common.repeat(40), words])  # frequent function words, like English
    folder.mkdir(parents=True, exist_ok=True)
    target, written, part = int(mb * 1e6), 0, 0
    while written < target:
        lines = []
        size = 0
        while size < 10_000_000 and written + size < target:
            n = int(min(50_000, max(5, rng.lognormal(5.3, 1.0))))  # words per document (median ~200)
            text = " ".join(vocab[rng.integers(0, len(vocab), n)]).capitalize() + "."
            lines.append(json.dumps({"text": text}))
            size += len(text) + 12
        data = "\n".join(lines) + "\n"
        (folder / f"part-{part:04d}.jsonl").write_text(data)
        written += len(data)
        part += 1
    return written


def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def child(src: str, cache: str) -> None:
    """Run the read path of `data pack` on `src` and print one JSON line of measurements."""
    os.environ["CTXSTRETCH_CACHE"] = cache
    from ctxstretch.data.builders import read_corpus
    from ctxstretch.data.datasets import load_tokenizer
    from ctxstretch.data.records import BadRecords

    tok = load_tokenizer("embedded")
    base_anon = _rss_anon_kb()
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = [base_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_anon_kb())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    c0, w0 = time.process_time(), time.perf_counter()
    corpus = read_corpus([src], tok, "text", BadRecords("fail"), cache=True)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss_anon_kb())
    entry = next(p for p in (Path(cache) / "tokens").iterdir() if p.is_dir())
    print(json.dumps({"tokens": int(len(corpus.tokens)), "documents": len(corpus),
                      "cache_mb": sum(p.stat().st_size for p in entry.iterdir()) / 1e6,
                      "base_rss_mb": base_max / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 1024, "base_anon_mb": base_anon / 1024, "peak_anon_mb": peak[0] / 1024,
                      "cpu_s": cpu, "wall_s": wall, "tokens_type": type(corpus.tokens).__name__}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="size S of the small corpus (MB of JSONL)")
    ap.add_argument("--scale", type=int, default=10, help="the large corpus is scale × S")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the corpus and the cache are written")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return

    work = Path(tempfile.mkdtemp(prefix="ctxstretch-memory-", dir=args.tmp))
    results = []
    try:
        for mb in (args.mb, args.mb * args.scale):
            src = work / f"corpus-{mb:g}mb"
            t0 = time.perf_counter()
            size = write_corpus(src, mb, seed=0)
            print(f"wrote {size / 1e6:.1f} MB of JSONL in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--child", str(src), str(work / f"cache-{mb:g}")],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["corpus_mb"] = size / 1e6
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
            shutil.rmtree(src)
            shutil.rmtree(work / f"cache-{mb:g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    small = results[0]
    print("\n| corpus MB | documents | tokens | token cache MB | peak RSS MB (ru_maxrss) | RSS growth vs small "
          "| peak anonymous RSS MB | anon growth vs small | tokenise wall s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['corpus_mb']:.0f} | {r['documents']:,} | {r['tokens']:,} | {r['cache_mb']:.0f} "
              f"| {r['peak_rss_mb']:.0f} | ×{r['peak_rss_mb'] / small['peak_rss_mb']:.2f} "
              f"| {r['peak_anon_mb']:.0f} | ×{r['peak_anon_mb'] / small['peak_anon_mb']:.2f} | {r['wall_s']:.1f} |")
    print(f"\nbaseline before reading (imports + tokenizer): RSS {small['base_rss_mb']:.0f} MB, "
          f"anonymous {small['base_anon_mb']:.0f} MB; corpus.tokens is a {results[-1]['tokens_type']}")


if __name__ == "__main__":
    main()
