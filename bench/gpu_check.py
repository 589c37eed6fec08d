"""GPU readiness check for memory-linear long rows, one table: FA2 varlen (the training step's flattened rows with
`cu_seq_lens` from segment ids, position gaps) against sdpa per-document attention, the chunked LM-head loss
against the plain loss, bf16 training steps of a ~1B Llama-shaped model (random init, no downloads) at 8K and
32K tokens — tokens/s, MFU against the card's dense bf16 peak, `torch.cuda.max_memory_allocated` against
`ctxstretch plan`'s estimate — and the longest row one training step fits, by doubling then bisection.

    bash bench/gpu_check.sh [--dry-run]        # or: PYTHONPATH=src python bench/gpu_check.py [--dry-run]

Without CUDA (or with --dry-run) every check runs at tiny sizes on the CPU (FA2 reported as skipped).
The step is the one `train_stage` takes (its batch split, attention inputs, chunked loss, AdamW) without
accelerate's wrapping and checkpoint writing, which would save 13 GB per run for the 1B model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from ctxstretch.masking import attention_inputs, use_document_attention  # noqa: E402
from ctxstretch.plan import GPUS, Shape, flops_per_token, memory_for  # noqa: E402
from ctxstretch.train.loop import param_groups  # noqa: E402
from ctxstretch.train.loss import chunked_weighted_loss, final_hidden, token_weights, weighted_loss  # noqa: E402
from ctxstretch.train.parallel import Layout, local_batch  # noqa: E402
from ctxstretch.train.step import varlen_batch  # noqa: E402

GB = 1024**3


@dataclass(frozen=True)
class Sizes:
    """Model shape and row lengths of one mode (GPU: TinyLlama-1.1B's shape; dry: tiny)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    step_lengths: tuple[int, ...]
    compare_length: int
    steps: int


GPU = Sizes(2048, 5632, 22, 32, 4, 32000, (8192, 32768), 4096, 3)
DRY = Sizes(64, 128, 2, 4, 2, 512, (256, 512), 256, 2)
LONGEST_BUDGET_S = {"cuda": 120.0, "cpu": 20.0}  # the bisection's share of the check's 8 minutes
LONGEST_CAP = {"cuda": 1 << 18, "cpu": 2048}  # stop doubling here (a 256K step of the 1B model: ~1.5 min)


def shape_of(s: Sizes) -> Shape:
    """`ctxstretch plan`'s view of the check's model."""
    return Shape(hidden=s.hidden, layers=s.layers, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.hidden // s.heads,
                 intermediate=s.ffn, vocab=s.vocab, tied=False, window=65536)


def peak_flops(device: str) -> float | None:
    """The card's dense bf16 peak (FLOP/s) from `ctxstretch plan`'s table, matched by name; None off a GPU."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    card = next((g for key, g in GPUS.items() if key.split("-")[0] in name), GPUS["h100"])
    return card.bf16_tflops * 1e12


def llama(s: Sizes, device: str, layers: int | None = None, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama of shape `s`, built directly on `device` (fp32 weights)."""
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
                      num_hidden_layers=layers or s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=65536, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                      tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def packed_row(length: int, vocab: int, docs: int, gap: int, device) -> dict[str, torch.Tensor]:
    """(1, length) fields: `docs` documents, positions restarting at 0 per document with a `gap` jump halfway
    through each (a PoSE/LongRecipe gap, never a document boundary); labels IGNORE on each document's first token."""
    g = torch.Generator().manual_seed(length + docs)
    ids = torch.randint(1, vocab, (length,), generator=g)
    labels, seg, pos = ids.clone(), torch.zeros(length, dtype=torch.long), torch.arange(length)
    bounds = torch.linspace(0, length, docs + 1).long().tolist()
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        n = e - s
        seg[s:e], pos[s:e], labels[s] = i, torch.arange(n) + gap * (torch.arange(n) >= n // 2), -100
    return {k: v[None].to(device) for k, v in
            {"input_ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos}.items()}


def check_fa2(s: Sizes, device: str) -> tuple[str, str, str]:
    """Two packed rows (3 and 2 documents, position gaps inside each) as the training step feeds flash-attention-2:
    flattened to one row with `cu_seq_lens` from the segment ids (`varlen_batch`), against sdpa run per document
    on the rows as they are; bf16 autocast, 2 layers."""
    name = "FA2 varlen (cu_seq_lens, 2 rows, gaps) vs sdpa per-document logits"
    rows = [packed_row(s.compare_length, s.vocab, docs, 1000, "cpu") for docs in (3, 2)]
    batch = {k: torch.cat([r[k] for r in rows]).to(device) for k in rows[0]}
    flat, varlen = varlen_batch(batch)  # built in the dry run too
    if device != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return name, f"skipped: no flash-attn/CUDA ({len(varlen['cu_seq_lens_q']) - 1} sequences built)", "skip"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        sdpa = llama(s, device, layers=2).eval()
        use_document_attention(sdpa)
        ref = sdpa(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                   **attention_inputs(sdpa, batch["segment_ids"])).logits.float()
        fa = llama(s, device, layers=2, attn="flash_attention_2").eval()
        got = fa(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False,
                 **varlen).logits.float().reshape(ref.shape)
    rel = float((got - ref).abs().max() / ref.abs().max())
    return name, f"max |Δ| / max |logit| = {rel:.2e}", "ok" if rel < 2e-2 else "FAIL"


def check_loss(s: Sizes, device: str) -> tuple[str, str, str]:
    """fp32, 2 layers: chunked head + loss against full logits + `weighted_loss`, value and gradients."""
    model = llama(s, device, layers=2).train()
    row = packed_row(s.compare_length, s.vocab, 2, 0, device)
    shifted, weights = token_weights(row["labels"])
    inputs = {"input_ids": row["input_ids"], "position_ids": row["position_ids"],
              **attention_inputs(model, row["segment_ids"])}
    plain = weighted_loss(model(**inputs, use_cache=False).logits, shifted, weights)
    plain.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    chunked = chunked_weighted_loss(model.lm_head, final_hidden(model, **inputs), shifted, weights,
                                     chunk_tokens=s.compare_length // 3)
    chunked.backward()
    rel = abs(chunked.item() - plain.item()) / abs(plain.item())
    grad = max(float((p.grad - w).abs().max() / w.abs().max().clamp(min=1e-12))
               for p, w in zip(model.parameters(), want, strict=True))
    ok = rel < 1e-5 and grad < 1e-3
    return "chunked vs plain loss (fp32)", f"loss rel Δ {rel:.1e}, max grad rel Δ {grad:.1e}", "ok" if ok else "FAIL"


def train_step(s: Sizes, model: LlamaForCausalLM, opt: torch.optim.Optimizer, row: dict, device: str) -> None:
    """One bf16-autocast training step on `row`, as `train_stage` takes it (batch split, attention inputs,
    chunked loss, clipping, AdamW)."""
    b = local_batch(row, Layout(), device)
    inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"],
              **attention_inputs(model, b["segment_ids"], b["labels"])}
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = chunked_weighted_loss(model.lm_head, final_hidden(model, **inputs), b["shift_labels"], b["weights"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_rate(s: Sizes, model: LlamaForCausalLM, opt: torch.optim.Optimizer, length: int, docs: int,
              device: str) -> tuple[str, str, str]:
    """bf16 autocast training steps on one row: tokens/s over `s.steps` steps after one warm-up, MFU, peak memory
    against `plan.memory_for` (fp32 master weights, no checkpointing, one GPU)."""
    row = {k: v.cpu() for k, v in packed_row(length, s.vocab, docs, 0, "cpu").items()}
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_step(s, model, opt, row, device)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(s.steps):
        train_step(s, model, opt, row, device)
    if cuda:
        torch.cuda.synchronize()
    rate = length * s.steps / (time.perf_counter() - t0)
    peak = peak_flops(device)
    mfu = f", MFU {rate * flops_per_token(shape_of(s), length) / peak:.0%}" if peak else ""
    mem = ""
    if cuda:
        used = torch.cuda.max_memory_allocated() / 1e9
        planned = memory_for(shape_of(s), length, 1, "fp32", False, False, 1)["total_gb"]
        mem = f", peak {used:.1f} GB vs plan {planned:.1f} GB ({planned / used:.2f})"
    params = sum(p.numel() for p in model.parameters())
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
    name = f"bf16 step, {size} Llama, T={length:,}, {docs} doc(s)"
    return name, f"{rate:,.0f} tok/s{mfu}{mem}", "ok"


def fits(s: Sizes, model: LlamaForCausalLM, opt: torch.optim.Optimizer, length: int, device: str) -> bool:
    """Whether one training step on a one-document row of `length` tokens fits in memory."""
    row = {k: v.cpu() for k, v in packed_row(length, s.vocab, 1, 0, "cpu").items()}
    try:
        train_step(s, model, opt, row, device)
        return True
    except torch.cuda.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return False
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def longest_row(s: Sizes, model: LlamaForCausalLM, opt: torch.optim.Optimizer, device: str
                ) -> tuple[str, str, str]:
    """The longest one-document row a training step fits: double from the longest step length until a step runs
    out of memory (or the cap, or the time budget), then bisect to 1/16 of the last length that fit."""
    t0, budget, cap = time.perf_counter(), LONGEST_BUDGET_S[device], LONGEST_CAP[device]
    ok, bad = max(s.step_lengths), None
    while ok * 2 <= cap and time.perf_counter() - t0 < budget:
        if not fits(s, model, opt, ok * 2, device):
            bad = ok * 2
            break
        ok *= 2
    while bad is not None and bad - ok > ok // 16 and time.perf_counter() - t0 < budget:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(s, model, opt, mid, device) else (ok, mid)
    bound = f"< {bad:,}" if bad is not None else f"≥ cap {cap:,}" if ok * 2 > cap else "time budget spent"
    planned = memory_for(shape_of(s), ok, 1, "fp32", False, False, 1)["total_gb"]
    return ("longest trainable row (1 doc, no checkpointing)",
            f"{ok:,} tokens ({bound}); plan at that length: {planned:.1f} GB", "ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    s = GPU if device == "cuda" else DRY
    t0 = time.perf_counter()
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU dry run (tiny sizes)"
    print(f"{where}; torch {torch.__version__}\n\n| check | result | status |\n|---|---|---|", flush=True)
    failed = False

    def report(row: tuple[str, str, str]) -> None:  # each row as it is measured: a timeout keeps what ran
        nonlocal failed
        failed |= row[2] == "FAIL"
        print(f"| {row[0]} | {row[1]} | {row[2]} |", flush=True)

    report(check_fa2(s, device))
    report(check_loss(s, device))
    model = llama(s, device).train()
    use_document_attention(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-5, fused=device == "cuda")
    for length in s.step_lengths:
        for docs in (1, 2):
            try:
                report(step_rate(s, model, opt, length, docs, device))
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                report((f"bf16 step, T={length:,}, {docs} doc(s)", "out of memory", "FAIL"))
    report(longest_row(s, model, opt, device))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
