"""LoRA through peft (Hu et al., 2021), optionally with trainable embeddings and norms (LongLoRA, Chen et al., 2023,
§3.3: needed for long context)."""

from __future__ import annotations

import torch

from ..config import ConfigError


def with_lora(model: torch.nn.Module, rank: int, train_embeddings_norms: bool) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters on every attention and MLP projection; `merge_and_unload()` gives back a
    plain model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora_rank needs peft: pip install 'ctxstretch[peft]'") from None
    targets = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                      if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    if train_embeddings_norms:
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "norm" in name:
                p.requires_grad_(True)
    return model
