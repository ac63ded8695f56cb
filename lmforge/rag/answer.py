"""Answering from retrieved passages: numbered passages go into the chat template, the model is asked to
cite them as [n], and the answer's citations are parsed back to the passages (and their files/lines).

    hits = search(index, question)
    result = answer(lm, question, hits)      # lm: lmforge.eval.lm.LocalLM or EndpointLM (chat=True)
    result.text, result.citations, result.sources

A local model's prompt is its own chat template (a base model without one gets a plain "Question: ...
Answer:" layout); an endpoint gets the same instruction as the user turn of a chat completion.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.rag.retrieve import Hit

INSTRUCTION = (
    "Answer the question using only the numbered passages. Cite the passages you use as [n]. "
    "If the passages do not contain the answer, say so."
)
_CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")


def focus(text: str, question: str, max_chars: int) -> tuple[str, int]:
    """The `max_chars` window of a long passage that answers best, and the number of lines skipped
    before it: a query-biased snippet (Tombros & Sanderson 1998), as search engines show. The window
    starts at the line sharing the most question terms, each weighted by its rarity among the
    passage's lines (log(lines / lines holding it)): a term on every line weighs nothing, so the
    function's own name outweighs its module's. A passage that fits, or shares no term, keeps its head."""
    if len(text) <= max_chars:
        return text, 0
    from lmforge.rag.terms import terms

    lines = text.split("\n")
    words = [set(terms(line, "bigram")) for line in lines]
    asked = set(terms(question, "bigram"))
    held = {t: sum(t in w for w in words) for t in asked}
    weight = {t: math.log(len(lines) / n) for t, n in held.items() if n}
    scores = [sum(weight.get(t, 0.0) for t in w & asked) for w in words]
    best = max(range(len(lines)), key=lambda i: (scores[i], -i))
    if scores[best] <= 0:
        return text[:max_chars], 0
    start = sum(len(line) + 1 for line in lines[:best])
    return text[start : start + max_chars], best


def format_passages(hits: list[Hit], max_chars: int = 1200, question: str | None = None) -> str:
    """[n] file:lines (title)\\n text, one block per passage; a passage longer than `max_chars` shows the
    window that best matches `question` (`focus`), or its head without one."""
    blocks = []
    for n, h in enumerate(hits, start=1):
        c = h.chunk
        text, skipped = focus(c.text, question, max_chars) if question else (c.text[:max_chars], 0)
        short = "/".join(Path(c.file).parts[-3:])  # as indexed_text: the folders nearest the file
        first = c.start_line + skipped
        last = c.end_line if len(c.text) <= max_chars else max(first, min(c.end_line, first + text.count("\n")))
        where = f"{short}{'#' + c.record if c.record else ''}:{first}-{last}"
        blocks.append(f"[{n}] {where}\n{text}")
    return "\n\n".join(blocks)


def user_message(question: str, hits: list[Hit], max_chars: int = 1200) -> str:
    if not hits:
        return f"Question: {question}"
    return f"{INSTRUCTION}\n\nPassages:\n{format_passages(hits, max_chars, question)}\n\nQuestion: {question}"


def build_prompt(tokenizer, question: str, hits: list[Hit], max_chars: int = 1200) -> str:
    """The prompt a local model completes: its chat template when it has one, else plain text."""
    content = user_message(question, hits, max_chars)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return f"{content}\nAnswer:"


def parse_citations(text: str) -> list[int]:
    """Passage numbers cited as [n], [n, m] or [n][m], in order of first appearance, each once."""
    out: list[int] = []
    for m in _CITATION.finditer(text):
        for part in re.split(r"[,;]", m.group(1)):
            n = int(part)
            if n not in out:
                out.append(n)
    return out


def strip_citations(text: str) -> str:
    """The answer without its [n] markers (for scoring its words against a reference)."""
    return " ".join(_CITATION.sub(" ", text).split())


@dataclass
class Answer:
    question: str
    text: str
    hits: list[Hit]
    citations: list[int] = field(default_factory=list)  # valid passage numbers cited, 1-based
    invalid_citations: list[int] = field(default_factory=list)  # cited numbers with no such passage

    @property
    def sources(self) -> list[dict]:
        return [{"n": n, **self.hits[n - 1].to_dict()} for n in range(1, len(self.hits) + 1)]

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.text,
            "citations": self.citations,
            "invalid_citations": self.invalid_citations,
            "sources": [{k: v for k, v in s.items() if k != "text"} for s in self.sources],
        }


def make_answer(question: str, text: str, hits: list[Hit]) -> Answer:
    cited = parse_citations(text)
    valid = [n for n in cited if 1 <= n <= len(hits)]
    return Answer(question, text.strip(), hits, valid, [n for n in cited if n not in valid])


def answer_batch(
    lm, questions: list[str], hits: list[list[Hit]], max_new_tokens: int = 128, max_chars: int = 1200, **gen
) -> list[Answer]:
    """Generate one answer per question from its passages (`hits` may be empty: no retrieval)."""
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is not None:
        prompts = [build_prompt(tokenizer, q, h, max_chars) for q, h in zip(questions, hits)]
    else:  # an endpoint: the instruction is the user turn of its own chat template
        prompts = [user_message(q, h, max_chars) for q, h in zip(questions, hits)]
    texts = lm.generate(prompts, max_new_tokens=max_new_tokens, **gen)
    return [make_answer(q, t, h) for q, t, h in zip(questions, texts, hits)]
