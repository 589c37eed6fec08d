"""A vLLM worker run by the vLLM environment's own python (`python vllm_worker.py`): JSON requests on stdin, one
JSON reply per line on its original stdout; everything vLLM prints goes to stderr.

Standalone on purpose: that environment has vLLM and its pinned transformers, not ctxstretch. Prompts are token
ids (no tokenizer in the engine, so both sides see the same tokens). Requests:
- {"op": "load", "model": DIR, "max_model_len": N, "dtype": "bfloat16", "hf_overrides": {...}} -> {"ok": true,
  "seconds": s} (hf_overrides: config fields vLLM reads differently from config.json, may be absent)
- {"op": "score", "prompts": [[ids]], "tail": k} -> {"ok": true, "rows": [{"top": [...], "top_lp": [...],
  "tok_lp": [...]}]}: for the last k positions j (all when k is 0) that have a previous token, vLLM's top-1 token
  and its logprob at the prediction of token j, and the logprob of token j itself (teacher-forced)
- {"op": "generate", "prompts": [[ids]], "max_tokens": m, "stop": [ids]} -> {"ok": true, "tokens": [[ids]]}
  (greedy)
- {"op": "quit"}
A failed request answers {"ok": false, "error": "..."}; a failed load ends the worker.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _score(llm, prompts: list[list[int]], tail: int) -> list[dict]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    rows = []
    for ids, out in zip(prompts, outs, strict=True):
        start = 1 if tail <= 0 else max(1, len(ids) - tail)
        top, top_lp, tok_lp = [], [], []
        for j in range(start, len(ids)):
            entry = out.prompt_logprobs[j]  # {token: Logprob}: the prompt token and the top-1 (one entry if equal)
            best = min(entry.items(), key=lambda kv: kv[1].rank)
            top.append(int(best[0]))
            top_lp.append(float(best[1].logprob))
            tok_lp.append(float(entry[ids[j]].logprob))
        rows.append({"top": top, "top_lp": top_lp, "tok_lp": tok_lp})
    return rows


def _generate(llm, prompts: list[list[int]], max_tokens: int, stop: list[int]) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop or None, detokenize=False,
                            ignore_eos=True)  # EOS only when asked for in `stop`: the engine has no tokenizer
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _load(request: dict):
    from vllm import LLM

    return LLM(model=request["model"], skip_tokenizer_init=True, dtype=request.get("dtype", "bfloat16"),
               max_model_len=int(request["max_model_len"]), enforce_eager=True, seed=0,
               enable_prefix_caching=False, max_num_batched_tokens=int(request["max_model_len"]),
               hf_overrides=request.get("hf_overrides") or None)


def main() -> None:
    reply_fd = os.dup(1)  # the reply channel; vLLM's own logging writes to stdout, which now goes to stderr
    os.dup2(2, 1)
    replies = os.fdopen(reply_fd, "w", buffering=1)
    llm = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "quit":
                break
            if op == "load":
                start = time.perf_counter()
                llm = _load(request)
                reply = {"ok": True, "seconds": time.perf_counter() - start}
            elif llm is None:
                reply = {"ok": False, "error": "no model loaded"}
            elif op == "score":
                reply = {"ok": True, "rows": _score(llm, request["prompts"], int(request.get("tail", 0)))}
            elif op == "generate":
                reply = {"ok": True, "tokens": _generate(llm, request["prompts"], int(request["max_tokens"]),
                                                         list(request.get("stop", [])))}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as e:  # reported to the caller, which turns it into one line
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
            if op == "load":
                replies.write(json.dumps(reply) + "\n")
                return
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":  # LLM(...) spawns its engine process, which re-imports this file
    main()
