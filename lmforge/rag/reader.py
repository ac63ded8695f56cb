"""A reader for the built-in set: SFT examples that teach a small model to answer from a passage and cite
it (extractive reading), and the RAG vs no-RAG comparison of one model on the held-out questions.

    lmforge rag reader-data --out reader.jsonl          # training modules only
    lmforge sft --data reader.jsonl --seq-len 384 ...   # any model with a chat template
    lmforge rag benchmark --out bench --embedder ENC --reader runs/.../final

Each example is the prompt `lmforge rag ask` builds (answer.py) with the passage that holds the
function's `def`, and the answer "<first docstring sentence> [1]".
"""

from __future__ import annotations

import random

from lmforge.eval import metrics as M
from lmforge.eval.builtin import BuiltinConfig
from lmforge.rag.answer import answer_batch, focus, user_message
from lmforge.rag.chunking import Chunk
from lmforge.rag.evaluate import answer_scores
from lmforge.rag.retrieve import Hit

PASSAGE_CHARS = 300  # of the passage shown to the reader: its window around the question's best line (answer.focus)


def _passage(indexed: str) -> Chunk:
    head, _, text = indexed.partition("\n")
    return Chunk(head, head, None, 1, 1, head, text)


def reader_examples(
    cfg: BuiltinConfig | None = None,
    max_files: int | None = None,
    seed: int = 0,
    closed_book: float = 0.15,
    counterfactual: float = 0.0,
) -> list[dict]:
    """{"messages": [user: passage + question, assistant: sentence [1]]} from the training modules.

    `closed_book`: a share asked the question alone (answer: the sentence, no citation), so the same
    model also answers without retrieval as well as it can: the RAG vs no-RAG comparison is then fair,
    not a model asked a prompt it never saw. `counterfactual`: a share whose passage has the docstring
    sentence swapped for another function's, which is then the answer (knowledge-conflict augmentation,
    Longpre et al. 2021): one question, two answers depending on the passage, so a reader cannot answer
    from memory of the question and must copy from what it is shown."""
    from lmforge.rag.qa import QUESTION, training_pairs

    rng = random.Random(seed)
    pairs = training_pairs(cfg, max_files=max_files)
    kept = []
    for sentence_pair, question_pair in zip(pairs[::2], pairs[1::2]):
        sentence, passage = sentence_pair
        question = question_pair[0]
        if question.startswith(QUESTION.split("`")[0]) and sentence in _shown(passage, question):
            kept.append((question, sentence, passage))  # the reader can only copy what its passage shows
    sentences = sorted({s for _, s, _ in kept})
    out = []
    for question, sentence, passage in kept:
        if rng.random() < closed_book:
            out.append(_example(user_message(question, [], PASSAGE_CHARS), sentence))
            continue
        if rng.random() < counterfactual and sentence in passage:
            other = rng.choice(sentences)
            swapped = passage.replace(sentence, other, 1)
            if other != sentence and other in _shown(swapped, question):
                sentence, passage = other, swapped
        hit = Hit(1, 1.0, _passage(passage))
        out.append(_example(user_message(question, [hit], PASSAGE_CHARS), f"{sentence} [1]"))
    rng.shuffle(out)
    return out


def _shown(passage: str, question: str) -> str:
    """The reader's window of an indexed passage, whitespace-normalised (a sentence may wrap lines)."""
    return " ".join(focus(passage.partition("\n")[2], question, PASSAGE_CHARS)[0].split())


def _example(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def rag_vs_closed_book(lm, examples: list[dict], hits: list[list[Hit]], passages: int = 1) -> dict[str, dict]:
    """Answer scores of `lm` with the top `passages` hits and with none (the same questions)."""
    questions = [e["question"] for e in examples]
    out = {}
    for name, given in (("rag", [h[:passages] for h in hits]), ("no_rag", [[] for _ in hits])):
        answers = answer_batch(lm, questions, given, max_new_tokens=48, max_chars=PASSAGE_CHARS)
        per = [answer_scores(a, [e["answer"]]) for a, e in zip(answers, examples)]
        out[name] = {k: M.mean([p[k] for p in per]) for k in per[0]}
        out[name]["example"] = {"question": questions[0], "answer": answers[0].text}
    return out
