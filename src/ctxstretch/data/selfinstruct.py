"""Self-instruct long QA (Xiong et al., 2023, "Effective Long-Context Scaling of Foundation Models", §4.3).

A generator model reads one random chunk of a long document (chunks fit its window) and writes a question and an
answer, `<question>…</question><answer>…</answer>`; two prompt kinds 50/50: a normal answer, or "a few words or a
single phrase". An optional self-critique pass asks the same model whether the answer is right and drops the
pairs it rejects. The training example is the whole document (truncated to the row) + question → answer.

Small models do not write the tags by themselves, so generation is steered (choice): the prompt is primed with
`<question>`, the question stops at `</question>` or a newline, then `</question>\\n<answer>` is forced and the
answer stops at `</answer>` (short kind: or a newline; normal kind: or a blank line) or EOS. The text so written
is parsed with `parse_qa`, and pairs with an empty question or answer are dropped. A model with a chat template
gets the prompt as a user turn. Sampling is seeded (`torch.random.fork_rng`); `temperature=0` is greedy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .packing import answer_row
from .records import DataError
from .tokens import pad_id_of

KINDS = ("normal", "short")
PROMPTS = {
    "normal": ("Read the text below and write one question that the text answers, then the answer. Put the "
               "question between <question> and </question> and the answer between <answer> and </answer>."
               "\n\nText:\n{chunk}"),
    "short": ("Read the text below and write one question that the text answers, then the answer. The answer must "
              "be a few words or a single phrase. Put the question between <question> and </question> and the "
              "answer between <answer> and </answer>.\n\nText:\n{chunk}"),
}
CHECK_PROMPT = ("Text:\n{chunk}\n\nQuestion: {question}\nProposed answer: {answer}\n"
                "Is the proposed answer correct according to the text? Reply yes or no.")
ROW_QUESTION = "\n\nAnswer the question about the text above.\nQuestion: {question}\nAnswer:"
_QA = re.compile(r"<question>(.*?)</question>\s*<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_DOC = "\ue000DOCUMENT\ue000"  # placeholder split out of a rendered chat template


@dataclass
class QA:
    """One generated pair; `chunk` is (start, end) in tokens of the generator's tokenizer; `passed` is the
    self-check verdict (None: not checked)."""

    doc: int
    kind: str
    chunk: tuple[int, int]
    question: str = ""
    answer: str = ""
    raw: str = ""
    passed: bool | None = None

    @property
    def ok(self) -> bool:
        return bool(self.question and self.answer) and self.passed is not False


def parse_qa(text: str) -> tuple[str, str] | None:
    """(question, answer), whitespace collapsed, from `<question>q</question><answer>a</answer>` (a missing final
    `</answer>` is tolerated); None when either is missing, has no letter or digit, or holds a stray tag."""
    m = _QA.search(text)
    if m is None:
        return None
    q, a = (" ".join(x.split()) for x in m.groups())
    def real(x: str) -> bool:
        return any(ch.isalnum() for ch in x) and "<" not in x

    return (q, a) if real(q) and real(a) else None


def chunk_spans(n_tokens: int, chunk_len: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) token spans of at most `chunk_len` covering `n_tokens` (a last piece shorter than
    half a chunk is merged into the previous one)."""
    spans = [(s, min(n_tokens, s + chunk_len)) for s in range(0, n_tokens, chunk_len)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < chunk_len // 2:
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    return spans


def render_prompt(tokenizer, user: str) -> str:
    """`user` as a chat turn (with the assistant's generation prompt) if the tokenizer has a chat template,
    otherwise the text followed by a blank line."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return user + "\n\n"


def _window(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def left_padded(ids: list[list[int]], pad_id: int):
    """A left-padded (B, T) batch of token lists and its (B, T) attention mask, both int64 tensors."""
    import torch

    width = max(map(len, ids))
    inp = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return inp, mask


class QAWriter:
    """Writes and checks QA pairs with one generator model (any local causal LM; `ctxstretch.models.load`)."""

    def __init__(self, model, tokenizer, *, max_question_tokens: int = 32, max_answer_tokens: int = 32,
                 temperature: float = 0.7, top_p: float = 0.95, batch_size: int = 8):
        self.model, self.tok = model, tokenizer
        self.max_q, self.max_a, self.batch_size = max_question_tokens, max_answer_tokens, batch_size
        self.temperature, self.top_p = temperature, top_p
        self.pad_id = pad_id_of(tokenizer)
        self.window = _window(model)

    def enc(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def chunk_budget(self, chunk_len: int | None = None) -> int:
        """The longest chunk (tokens) whose prompt, question, forced tags and answer fit the generator's window."""
        overhead = max(len(self.enc(render_prompt(self.tok, p.format(chunk="")) + "<question>")) for p in
                       PROMPTS.values()) + len(self.enc("</question>\n<answer>")) + self.max_q + self.max_a + 4
        room = self.window - overhead
        if room < 16:
            raise DataError(f"the generator's window ({self.window} tokens) leaves {room} tokens for a chunk; "
                            "use a model with a longer window or fewer --max-new-tokens")
        return min(room, chunk_len) if chunk_len else room

    def _generate(self, prompts: list[str], max_new: int, stops: Sequence[Sequence[str]], seed: int) -> list[str]:
        """Continuations of `prompts` (left-padded batch), each cut at the first of its stop strings."""
        import torch

        ids = [self.enc(p)[-(self.window - max_new):] for p in prompts]
        inp, mask = left_padded(ids, self.pad_id)
        width = inp.shape[1]
        sample = self.temperature > 0
        kw = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if sample else dict(do_sample=False)
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tok

        class StopOnText(StoppingCriteria):  # cheaper than generate(stop_strings=…) for a few dozen new tokens
            def __call__(self, input_ids, scores, **kwargs):
                texts = tok.batch_decode(input_ids[:, width:].cpu(), skip_special_tokens=True)
                return torch.tensor([any(x in t for x in ss) for t, ss in zip(texts, stops, strict=True)],
                                    device=input_ids.device)

        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=inp.to(self.model.device), attention_mask=mask.to(self.model.device),
                                      max_new_tokens=max_new, pad_token_id=self.pad_id, use_cache=True,
                                      eos_token_id=self.tok.eos_token_id,
                                      stopping_criteria=StoppingCriteriaList([StopOnText()]), **kw)
        texts = self.tok.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
        cut = []
        for text, ss in zip(texts, stops, strict=True):
            ends = [text.find(s) for s in ss if s in text]
            cut.append(text[: min(ends)] if ends else text)
        return cut

    def write(self, chunks: list[str], items: list[QA], seed: int) -> None:
        """Fill `question`, `answer`, `raw` of `items` (one chunk text each), one batch."""
        first = [render_prompt(self.tok, PROMPTS[it.kind].format(chunk=c)) + "<question>"
                 for c, it in zip(chunks, items, strict=True)]
        questions = self._generate(first, self.max_q, [["</question>", "\n"]] * len(first), seed)
        second = [p + q + "</question>\n<answer>" for p, q in zip(first, questions, strict=True)]
        a_stops = [["</answer>", "\n"] if it.kind == "short" else ["</answer>", "\n\n"] for it in items]
        answers = self._generate(second, self.max_a, a_stops, seed + 1)
        for it, q, a in zip(items, questions, answers, strict=True):
            it.raw = f"<question>{q}</question>\n<answer>{a}</answer>"
            it.question, it.answer = parse_qa(it.raw) or ("", "")

    def check(self, chunks: list[str], items: list[QA]) -> None:
        """Self-critique: `passed` = the model puts more probability on "yes" than on "no" after CHECK_PROMPT."""
        import torch

        prompts = [render_prompt(self.tok, CHECK_PROMPT.format(chunk=c, question=it.question, answer=it.answer))
                   + ("" if getattr(self.tok, "chat_template", None) else "Reply:")
                   for c, it in zip(chunks, items, strict=True)]
        yes = sorted({self.enc(w)[0] for w in (" yes", " Yes", "yes", "Yes")})
        no = sorted({self.enc(w)[0] for w in (" no", " No", "no", "No")})
        ids = [self.enc(p)[-self.window:] for p in prompts]
        inp, mask = left_padded(ids, self.pad_id)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        dev = self.model.device
        with torch.no_grad():
            logits = self.model(input_ids=inp.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                use_cache=False).logits[:, -1].float()
        lp = torch.log_softmax(logits, -1)
        verdict = torch.logsumexp(lp[:, yes], -1) > torch.logsumexp(lp[:, no], -1)
        for it, v in zip(items, verdict.tolist(), strict=True):
            it.passed = bool(v)


def plan_questions(doc_lengths: Sequence[int], count: int, chunk_len: int, rng: np.random.Generator,
                   short_share: float = 0.5) -> list[QA]:
    """`count` QA slots: document i cycles over a shuffled order of the usable documents, a random chunk of it
    (spans of `chunk_len` generator tokens), kind "short" with probability `short_share`."""
    usable = [i for i, n in enumerate(doc_lengths) if n > 0]
    if not usable:
        raise DataError("no document is long enough to ask a question about")
    order = rng.permutation(usable)
    items = []
    for j in range(count):
        d = int(order[j % len(order)])
        spans = chunk_spans(int(doc_lengths[d]), chunk_len)
        kind = "short" if rng.random() < short_share else "normal"
        items.append(QA(d, kind, spans[int(rng.integers(len(spans)))]))
    return items


def generate_qas(writer: QAWriter, docs: Sequence[np.ndarray], items: list[QA], *, seed: int = 0,
                 self_check: bool = False, progress: Callable[[int], None] | None = None) -> list[QA]:
    """Run `writer` over `items` in batches (docs are token arrays in the generator's tokenizer); returns the
    items, filled in. `progress(n)` is called after each batch of n."""
    for b in range(0, len(items), writer.batch_size):
        batch = items[b : b + writer.batch_size]
        chunks = [writer.tok.decode(docs[it.doc][it.chunk[0] : it.chunk[1]]) for it in batch]
        writer.write(chunks, batch, seed * 1_000_003 + b)
        good = [i for i, it in enumerate(batch) if it.question and it.answer]
        if self_check and good:
            writer.check([chunks[i] for i in good], [batch[i] for i in good])
        if progress is not None:
            progress(len(batch))
    return items


def row_template(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the document in a training prompt: a chat user turn (and the assistant's
    header) when the tokenizer has a chat template, otherwise nothing before and ROW_QUESTION after."""
    text = _DOC + ROW_QUESTION.format(question=question)
    if getattr(tokenizer, "chat_template", None):
        text = render_prompt(tokenizer, text)
    before, _, after = text.partition(_DOC)

    def enc(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False)["input_ids"] if t else []

    return enc(before), enc(after)


def selfinstruct_row(tokenizer, doc_ids: np.ndarray, question: str, answer: str, length: int, *, pad_id: int = 0,
                     eos_id: int | None = None, input_loss: bool = False) -> dict[str, np.ndarray]:
    """One row of exactly `length` tokens: [template] + document (truncated to what fits) + question + answer +
    EOS, then padding (its own segment, positions restarting at 0). Labels: the answer and EOS; with
    `input_loss`, also the document tokens (Llama 2 Long's LM loss on the long input). Fields (length,) int64."""
    before, after = row_template(tokenizer, question)
    ans = tokenizer(" " + answer if not getattr(tokenizer, "chat_template", None) else answer,
                    add_special_tokens=False)["input_ids"] + ([eos_id] if eos_id is not None else [])
    room = length - len(before) - len(after) - len(ans)
    if room < 1:
        raise DataError(f"a question and answer of {len(after) + len(ans)} tokens leave no room for the document "
                        f"in a row of {length}")
    doc = np.asarray(doc_ids[:room], dtype=np.int64)
    prompt = np.concatenate([np.asarray(before, dtype=np.int64), doc, np.asarray(after, dtype=np.int64)])
    out = answer_row(prompt, np.asarray(ans, dtype=np.int64), length, pad_id)
    if input_loss:
        start = max(1, len(before))  # the first token of a row has nothing before it to predict it from
        out["labels"][start : len(before) + len(doc)] = out["input_ids"][start : len(before) + len(doc)]
    return out
