"""Build the embedded base model from scratch, deterministically, on text every Python install carries.

Two stages, each an ordinary training stage (resumable):
  1. induction: short rows (64 tokens, 4 per step) dense in repeated spans, so induction heads — what retrieval
     needs — form early (fewer tokens per step reach the induction phase change in fewer tokens).
  2. window: 256-token rows mixing plain text, passkey, needle and copy rows with loss on the answers.
The result is a plain Hugging Face Llama directory with its tokenizer and a model card.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from ..config import TrainConfig
from ..data.mix import RowMixer
from ..data.probes import IGNORE, ProbeBuilder, rng_for
from ..data.sources import embedded_documents, embedded_token_stream
from ..eval.passkey import retrieval_grid
from ..eval.perplexity import token_losses
from ..train.checkpoints import checkpoint_state, latest_checkpoint, plain_state_dict
from ..train.loop import train_stage
from .tokenizer import train_tokenizer

WINDOW = 256
SEED = 1234
STAGES = {
    "induction": dict(
        length=64, batch=4, mix={"random_copy": 0.4, "text_copy": 0.35, "text": 0.25},
        train=TrainConfig(steps=12000, batch_size=4, lr=1e-3, warmup_steps=300, min_lr_ratio=0.5,
                          checkpoint_every=500, log_every=50, eval_every=1000, seed=SEED),
        # curriculum rule: leave the short-row stage once induction has formed
        stop_when=lambda r: r["copy_acc"] >= 0.6,
    ),
    "window": dict(
        length=WINDOW, batch=8,
        mix={"text": 0.4, "passkey": 0.2, "needle": 0.2, "text_copy": 0.1, "random_copy": 0.1},
        train=TrainConfig(steps=2000, batch_size=8, lr=1e-3, warmup_steps=50, min_lr_ratio=0.05,
                          checkpoint_every=125, log_every=25, eval_every=250, seed=SEED),
        # leave once retrieval inside the window is solid
        stop_when=lambda r: r["passkey@256"] >= 0.95 and r["needle@256"] >= 0.9,
    ),
}


def model_config(tokenizer) -> LlamaConfig:
    """A ~4M-parameter Llama: d 256, 4 layers, 8 heads of 32, window 256, tied embeddings."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0,
    )


@torch.no_grad()
def copy_accuracy(model, tokenizer, length: int = 64, n: int = 32) -> float:
    """Share of tokens predicted right in the repeated half of random-token copy rows (induction)."""
    rng = rng_for("copy-eval", SEED, evaluation=True)
    builder = ProbeBuilder(tokenizer)
    rows = [builder.copy(rng, length, random_tokens=True) for _ in range(n)]
    device = next(model.parameters()).device
    ids = torch.tensor(np.stack([r.input_ids for r in rows]), device=device)
    target = torch.tensor(np.stack([r.labels for r in rows]), device=device)[:, 1:]
    pred = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
    mask = target != IGNORE
    return float(((pred == target) & mask).sum() / mask.sum())


def build(work_dir: Path, out_dir: Path, resume: bool = True, console: Console | None = None) -> Path:
    """Train the embedded base into `out_dir` (a plain HF model directory). Resumes from `work_dir`."""
    console = console or Console()
    work_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = work_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        console.print("training the tokenizer on the embedded corpus…")
        tokenizer = train_tokenizer(embedded_documents("train"))
        tokenizer.save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_ids = embedded_token_stream(tokenizer, "train", work_dir / "cache")
    heldout_ids = embedded_token_stream(tokenizer, "heldout", work_dir / "cache")
    console.print(f"corpus: {len(train_ids):,} training tokens, {len(heldout_ids):,} held out")

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(model_config(tokenizer))
    console.print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    probes = ProbeBuilder(tokenizer, heldout_ids)

    def evaluate(m, step: int) -> dict[str, float]:
        pk = retrieval_grid(m, probes, "passkey", [128, WINDOW], [0.1, 0.5, 0.9], trials=8)
        nd = retrieval_grid(m, probes, "needle", [WINDOW], [0.1, 0.5, 0.9], trials=8)
        return {"copy_acc": round(copy_accuracy(m, tokenizer), 3),
                **{f"passkey@{n}": round(a, 3) for n, a in pk.by_length().items()},
                "needle@256": round(nd.by_length()[WINDOW], 3)}

    tokens, train_seconds, steps = 0, 0.0, {}
    for name, spec in STAGES.items():
        maker = RowMixer(tokenizer, train_ids, name=f"tiny-{name}", seed=SEED, length=spec["length"],
                         batch=spec["batch"], mix=spec["mix"])
        stage_dir = work_dir / name
        done = stage_dir / "done.safetensors"
        cfg: TrainConfig = spec["train"]
        if done.exists():
            model.load_state_dict(load_file(done), strict=False)
        else:
            model = train_stage(model, maker, cfg, stage_dir, resume=resume, eval_fn=evaluate, name=name,
                                stop_when=spec.get("stop_when"))
            save_file(plain_state_dict(model), done)
        state = checkpoint_state(latest_checkpoint(stage_dir))
        steps[name] = int(state["step"])
        tokens += steps[name] * cfg.batch_size * spec["length"]
        train_seconds += float(state.get("elapsed_s", 0.0))

    final = final_eval(model, probes, heldout_ids)
    console.print(f"final: {final}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    card = {"tokens_seen": tokens, "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(heldout_ids)),
            "parameters": sum(p.numel() for p in model.parameters()), **final, "stage_steps": steps,
            "train_minutes": round(train_seconds / 60, 1), "python": platform.python_version(),
            "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    (tmp / "build.json").write_text(json.dumps(card, indent=2))
    (tmp / "README.md").write_text(model_card(card))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


@torch.no_grad()
def final_eval(model, probes: ProbeBuilder, heldout: np.ndarray) -> dict:
    """Passkey and needle inside the window (5 depths × 10 probes per length) and held-out loss."""
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    pk = retrieval_grid(model, probes, "passkey", [128, WINDOW], depths, trials=10, seed=1)
    nd = retrieval_grid(model, probes, "needle", [128, WINDOW], depths, trials=10, seed=1)
    loss = token_losses(model, heldout, WINDOW, rows=64, batch_size=8)
    return {"passkey": pk.by_length(), "needle": nd.by_length(), "heldout_loss": round(float(loss.mean()), 4),
            "copy_acc": round(copy_accuracy(model, probes.tok), 3)}


def model_card(card: dict) -> str:
    pk, nd = card["passkey"], card["needle"]
    return f"""# ctxstretch embedded base model

A {card["parameters"] / 1e6:.1f}M-parameter Llama (d 256, 4 layers, 8 heads, window {WINDOW} tokens, rope_theta 10,000)
with a 4,096-token byte-level BPE tokenizer (one token per digit). It exists so that `ctxstretch extend` has a real
model to extend on any machine, offline.

- **Data**: the Python {card["python"]} standard-library sources and `pydoc_data` topics ({card["train_tokens"]:,}
  training tokens; one document in 20 held out: {card["heldout_tokens"]:,} tokens), mixed with synthetic copy,
  passkey and needle rows (loss on the answers). Nothing downloaded.
- **Training**: two stages, each ended by its stopping rule — induction (4 × 64-token rows per step, until random
  copy accuracy ≥ 0.6): {card["stage_steps"]["induction"]:,} steps; window (8 × 256-token rows, until passkey ≥ 95% and
  needle ≥ 90% at 256): {card["stage_steps"]["window"]:,} steps — {card["tokens_seen"]:,} tokens seen,
  {card["train_minutes"]} minutes of training (wall clock) on {card["machine"]} (torch {card["torch"]}).
- **Held-out loss** at 256 tokens: {card["heldout_loss"]} nats/token. Random-token copy accuracy:
  {card["copy_acc"]:.0%}.
- **Passkey** (5 depths × 10 probes): {", ".join(f"{k} tokens {v:.0%}" for k, v in pk.items())}.
- **Needle** (keyed magic number in held-out text): {", ".join(f"{k} tokens {v:.0%}" for k, v in nd.items())}.
- **Rebuild**: `ctxstretch tiny build` (deterministic for the same Python, torch and machine; resumable).
"""
