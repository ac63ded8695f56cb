"""Scoring retrieval and answers: recall@k and MRR of the retrieved chunks, ROUGE-L and token F1 of the
answer, and citation faithfulness; plus the `rag` task type of `lmforge eval`.

Citation faithfulness: a cited passage supports the answer when it contains most of the answer's
words (recall of the answer's search terms among the passage's >= 0.5). An answer scores the fraction
of its cited passages that support it (0 when it cites none); `citation_rate` is the fraction of
answers that cite any existing passage at all.

A `rag` task (`lmforge eval` config) reads a JSONL of {"question", "answer", "sources": [{"file",
"line"?, "record"?}]} and retrieves from `index` (an `lmforge rag index` folder):

    - {name: stdlib_rag, type: rag, path: qa.jsonl, index: runs/rag/index, rag_mode: hybrid, rag_passages: 3}

`rag_passages: 0` asks without retrieval (the no-RAG baseline); retrieval metrics are still reported.
"""

from __future__ import annotations

from lmforge.eval import metrics as M
from lmforge.eval.suite import TASK_RUNNERS
from lmforge.eval.task_data import TaskConfig, TaskResult, _field, load_examples
from lmforge.eval.tasks import aggregate
from lmforge.rag.answer import Answer, answer_batch, strip_citations
from lmforge.rag.qa import is_relevant
from lmforge.rag.retrieve import Hit

KS = (1, 5, 10)
SUPPORT_RECALL = 0.5


def retrieval_scores(hits: list[Hit], sources: list[dict], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """recall@k (a relevant chunk among the first k) and reciprocal rank of the first relevant chunk."""
    first = next((h.rank for h in hits if is_relevant(h.chunk, sources)), None)
    out = {f"recall@{k}": float(first is not None and first <= k) for k in ks}
    out["mrr"] = 1.0 / first if first else 0.0
    return out


def _words(text: str) -> set[str]:
    from lmforge.rag.terms import terms

    return set(terms(M.normalize_answer(text), "bigram"))  # no dictionary to load for a comparison of words


def supports(passage: str, answer: str) -> bool:
    want = _words(answer)
    return bool(want) and len(want & _words(passage)) / len(want) >= SUPPORT_RECALL


def answer_scores(ans: Answer, references: list[str]) -> dict[str, float]:
    """ROUGE-L and F1 against the references (citation markers removed), and the citation scores."""
    text = strip_citations(ans.text)
    out = {"rouge_l": M.rouge_l(text, references), "f1": M.token_f1(text, references)}
    out["citation_rate"] = float(bool(ans.citations))
    supported = sum(supports(ans.hits[n - 1].chunk.text, strip_citations(ans.text)) for n in ans.citations)
    out["citation_faithfulness"] = supported / len(ans.citations) if ans.citations else 0.0
    return out


def normalize_rag(row: dict, where: str) -> dict:
    question = _field(row, ("question", "query", "prompt"), where)
    answers = _field(row, ("answer", "answers"), where)
    sources = row.get("sources", [])
    if not isinstance(sources, list) or any(not isinstance(s, dict) or "file" not in s for s in sources):
        from lmforge.common import LmforgeError

        raise LmforgeError(f"{where}: 'sources' must be a list of {{'file': ..., 'line': ...}} objects")
    return {
        "id": str(row.get("id", where)),
        "question": str(question),
        "answers": [answers] if isinstance(answers, str) else [str(a) for a in answers],
        "sources": sources,
    }


def run_rag(lm, cfg: TaskConfig) -> TaskResult:
    """The `rag` task: retrieve from `cfg.index`, answer with `lm` from `cfg.rag_passages` passages."""
    from lmforge.common import LmforgeError
    from lmforge.rag.index import RagIndex
    from lmforge.rag.retrieve import search_batch

    if not cfg.index:
        raise LmforgeError(f"task {cfg.name!r}: type rag needs 'index' (an `lmforge rag index` folder)")
    examples = load_examples(cfg, normalize_rag)
    index = RagIndex.load(cfg.index)
    hits = search_batch(index, [e["question"] for e in examples], max(KS), cfg.rag_mode)
    passages = [h[: cfg.rag_passages] for h in hits]
    answers = answer_batch(
        lm, [e["question"] for e in examples], passages, cfg.max_new_tokens, stop=cfg.stop or [], seed=cfg.seed
    )
    records = []
    for ex, h, ans in zip(examples, hits, answers):
        scores = {**retrieval_scores(h, ex["sources"]), **answer_scores(ans, ex["answers"])}
        records.append(
            {"id": ex["id"], "input": ex["question"], **ans.to_dict(), "answers": ex["answers"], "scores": scores}
        )
    return TaskResult(cfg.name, cfg.type, aggregate(cfg, records), records)


TASK_RUNNERS["rag"] = run_rag  # `lmforge eval` dispatches the rag type here
