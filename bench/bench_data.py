"""Data throughput: packing and CIP from already-tokenised arrays, and tokenisation (ours vs raw `tokenizers`).

    nice -n 19 python bench/bench_data.py [--tokens 4000000] [--repeats 3]

Figures are tokens per CPU-second of this process (single-threaded: tokenizers' parallelism is switched off), so
they measure one core even on a busy machine; wall-clock figures are printed beside them.
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: encode_batch runs serially
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from ctxstretch.data.cip import iter_cip_rows  # noqa: E402
from ctxstretch.data.impactful import digit_vocab, impactful_rows  # noqa: E402
from ctxstretch.data.packing import iter_packed  # noqa: E402
from ctxstretch.data.sentences import BoundaryVocab  # noqa: E402
from ctxstretch.data.sources import embedded_documents  # noqa: E402
from ctxstretch.data.tokens import tokenize_batches  # noqa: E402
from ctxstretch.tiny import MODEL_DIR  # noqa: E402


def measure(fn: Callable[[], int], repeats: int) -> tuple[float, float]:
    """Best (CPU seconds, wall seconds) over `repeats` runs of `fn`."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def synthetic_docs(total: int, seed: int = 0) -> list[np.ndarray]:
    """Token arrays with log-normal lengths (median ~400 tokens, a long tail), `total` tokens in all."""
    rng = np.random.default_rng(seed)
    docs, n = [], 0
    while n < total:
        k = int(min(200_000, max(8, rng.lognormal(6.0, 1.2))))
        docs.append(rng.integers(0, 32_000, size=k, dtype=np.int32))
        n += k
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4_000_000, help="tokens of synthetic documents to pack")
    ap.add_argument("--text-docs", type=int, default=300, help="embedded documents to tokenise")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    docs = synthetic_docs(args.tokens)
    n_tok = sum(len(d) for d in docs)
    rows: list[tuple[str, int, float, float]] = []

    def drain(it) -> int:
        return sum(r.real_tokens for r in it)

    for length in (4096, 32768):
        for split_short in (True, False):
            cpu, wall = measure(lambda n=length, s=split_short: drain(iter_packed(docs, n, split_short=s)),
                                args.repeats)
            rows.append((f"pack, rows of {length:,}, split_short={split_short}", n_tok, cpu, wall))
    for length, mode in itertools.product((4096, 32768), ("round_robin", "random")):
        cpu, wall = measure(lambda n=length, m=mode: drain(iter_cip_rows(docs, n, chunk_len=512, mode=m,
                                                                        rng=np.random.default_rng(0))), args.repeats)
        rows.append((f"CIP, rows of {length:,}, chunks of 512, {mode}", n_tok, cpu, wall))

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    texts = list(itertools.islice(embedded_documents("train"), args.text_docs))
    n_text = sum(len(ids) for ids in tokenize_batches(tok, texts))
    backend = tok.backend_tokenizer

    def raw() -> int:
        return sum(len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False))

    def ours() -> int:
        return sum(len(a) for a in tokenize_batches(tok, texts, eos_id=tok.eos_token_id))

    def hf_call() -> int:
        return sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])

    for name, fn in (("tokenise: raw tokenizers encode_batch_fast", raw),
                     ("tokenise: ctxstretch tokenize_batches", ours),
                     ("tokenise: transformers tokenizer(texts)", hf_call)):
        cpu, wall = measure(fn, args.repeats)
        rows.append((f"{name} ({len(texts)} docs, {sum(map(len, texts)) / 1e6:.1f} MB)", n_text, cpu, wall))

    text_ids = list(tokenize_batches(tok, texts, eos_id=tok.eos_token_id))
    boundaries, digits = BoundaryVocab.from_tokenizer(tok), digit_vocab(tok)

    def impactful() -> int:
        rows = impactful_rows(tok, text_ids, 4096, np.random.default_rng(0), boundaries=boundaries, digits=digits)
        return sum(len(r) for r in rows)

    cpu, wall = measure(impactful, args.repeats)
    rows.append((f"impactful heuristic (digit sentences + 50%), rows of 4,096 ({len(texts)} docs)", n_text, cpu,
                 wall))

    print(f"\nctxstretch data benchmark — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}; best of {args.repeats}\n")
    print("| step | tokens | CPU s | M tokens / CPU-s | wall s | M tokens / wall-s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, cpu, wall in rows:
        print(f"| {name} | {n:,} | {cpu:.3f} | {n / cpu / 1e6:.2f} | {wall:.3f} | {n / wall / 1e6:.2f} |")


if __name__ == "__main__":
    main()
