"""A chat prompt the model must still answer sensibly after extension: greedy answers to a few short questions with
known answers, through the tokenizer's own chat template (models without one are skipped)."""

from __future__ import annotations

import torch

from ..data.tokens import pad_id_of

# (question, words any sensible answer contains — one of them, case-insensitive)
QUESTIONS = (
    ("What is the capital of France?", ("paris",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What color is the sky on a clear day?", ("blue",)),
)
NEW_TOKENS = 24


def chat_check(model, tokenizer, new_tokens: int = NEW_TOKENS) -> dict | None:
    """{"passed": k, "asked": n, "answers": [{"question", "answer", "ok"}]}, or None without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    device = next(model.parameters()).device
    answers = []
    for question, expected in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad_id_of(tokenizer))
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        answers.append({"question": question, "answer": answer,
                        "ok": any(w in answer.lower() for w in expected)})
    return {"passed": sum(a["ok"] for a in answers), "asked": len(answers), "answers": answers}
