"""`lmforge serve MODEL --rag INDEX`: retrieval-augmented answers as one more model name on the API.

A chat completion whose `model` is the RAG name (default: the served model's name + "-rag", listed by
/v1/models with the base model as its parent) is answered by the base model after retrieval: the last
user message is the query, the top `--rag-top-k` passages of the index go numbered into that message
(the prompt `lmforge rag ask` builds: lmforge.rag.answer.user_message) and the model is asked to cite
them as [n]. Every other request field works as for the base model (sampling, n, stop, logprobs,
response_format, streaming), except what retrieval cannot honour, refused with a 400: tools, image or
audio parts, a conversation whose last message is not the user's. /v1/completions refuses the RAG name
(a completion prompt has no question to retrieve for).

The answer carries its sources in extra fields the OpenAI clients keep (`response.model_extra`):
  sources            [{n, id, file, lines, title, score, cited}] the passages given, numbered as cited
  choices[i].citations   the passage numbers choice i cites (numbers with no passage left out)
A stream sends `sources` in its first chunk (citations are known only at the end: read them off the text).

Passages that would not leave room for the answer in the model's context are dropped from the end
(`sources` lists only the passages the model saw).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError, get_logger

from .protocol import APIError, ChatRequest
from .text import chat_prompt_ids

log = get_logger(__name__)
PASSAGE_CHARS = 1200  # of each passage in the prompt (as `lmforge rag ask`)
MIN_ANSWER_TOKENS = 64  # room kept for the answer when the request sets no max_tokens


@dataclass
class RagModel:
    name: str
    index: object  # lmforge.rag.index.RagIndex
    top_k: int = 3
    mode: str = "bm25"

    @classmethod
    def load(cls, folder: str, name: str, top_k: int) -> RagModel:
        """The index, loaded and checked at startup (a bad path is an error before the model loads)."""
        from lmforge.rag.index import RagIndex

        if top_k < 1:
            raise LmforgeError(f"--rag-top-k must be >= 1, got {top_k}")
        if not Path(folder).is_dir():
            raise LmforgeError(f"--rag {folder}: no such folder (build an index with `lmforge rag index`)")
        try:
            index = RagIndex.load(folder)
        except LmforgeError as e:
            raise LmforgeError(f"--rag: {e}") from None
        mode = "hybrid" if index.vectors is not None else "bm25"
        if mode == "hybrid":
            index.embedder()  # the embedding model too: a missing one fails now, not on the first request
        log.info("RAG model %r: %d chunks from %s (%s retrieval)", name, len(index.chunks), folder, mode)
        return cls(name, index, top_k, mode)

    def retrieve(self, question: str) -> list:
        from lmforge.rag.retrieve import search

        return search(self.index, question, self.top_k, self.mode)


def _question(req: ChatRequest) -> str:
    last = req.messages[-1]
    where = f"messages.{len(req.messages) - 1}"
    if last.role != "user":
        raise APIError(
            400, f"{where}: the RAG model answers the last user message (this one is {last.role})", param=where
        )
    if isinstance(last.content, list):
        if any(p.type != "text" for p in last.content):
            raise APIError(400, f"{where}.content: the RAG model takes text only", param=f"{where}.content")
        text = "\n".join(p.text for p in last.content)
    else:
        text = last.content or ""
    if not text.strip():
        raise APIError(400, f"{where}.content: the question is empty", param=f"{where}.content")
    return text


def _check(req: ChatRequest) -> None:
    if req.tools and req.tool_mode() != "none":
        raise APIError(400, "tools are not supported by the RAG model", param="tools")
    for i, m in enumerate(req.messages[:-1]):
        if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
            raise APIError(400, f"messages.{i}.content: the RAG model takes text only", param=f"messages.{i}.content")


def augmented(state, rag: RagModel, req: ChatRequest) -> tuple[ChatRequest, list]:
    """The request for the base model (passages in the last user message) and the passages given."""
    from lmforge.rag.answer import user_message

    _check(req)
    question = _question(req)
    hits = rag.retrieve(question)
    asked = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    room = state.max_model_len - (asked if asked is not None else MIN_ANSWER_TOKENS)
    while True:
        last = req.messages[-1].model_copy(update={"content": user_message(question, hits, PASSAGE_CHARS)})
        new = req.model_copy(update={"model": state.model_name, "messages": [*req.messages[:-1], last]})
        if not hits or len(chat_prompt_ids(state.tokenizer, new.messages)) < room:
            return new, hits
        hits = hits[:-1]  # the model's context cannot hold them all: the lowest-ranked goes


def sources(hits: list, cited: set[int]) -> list[dict]:
    out = []
    for n, h in enumerate(hits, start=1):
        d = h.to_dict()
        out.append(
            {
                "n": n,
                "id": d["id"],
                "file": d["file"],
                "lines": d["lines"],
                "title": d["title"],
                "score": d["score"],
                "cited": n in cited,
            }
        )
    return out


async def chat(request, state, req: ChatRequest, serve_job):
    """The RAG model's chat completion: retrieve, answer with the base model, attach the sources."""
    from lmforge.rag.answer import parse_citations

    from .jobs import chat_job

    rag: RagModel = state.rag
    new, hits = await asyncio.to_thread(augmented, state, rag, req)  # BM25/embedding off the event loop
    job = chat_job(state, new)
    job.req = new.model_copy(update={"model": rag.name})  # the response names the model asked for
    result = await serve_job(request, state, job)

    def attach(body: dict) -> dict:
        valid = range(1, len(hits) + 1)
        cited: set[int] = set()
        for choice in body["choices"]:
            choice["citations"] = [n for n in parse_citations(choice["message"].get("content") or "") if n in valid]
            cited.update(choice["citations"])
        body["sources"] = sources(hits, cited)
        return body

    if isinstance(result, dict):
        return attach(result)
    if hasattr(result, "body_iterator"):  # a stream: the sources ride on its first chunk
        result.body_iterator = _with_sources(result.body_iterator, sources(hits, set()))
    elif result.status_code == 200:  # a routed answer (--fallback): a JSONResponse with its route header
        from fastapi.responses import JSONResponse

        headers = {k: v for k, v in result.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(attach(json.loads(result.body)), headers=headers)
    return result


async def _with_sources(chunks, given: list[dict]):
    first = True
    async for text in chunks:
        if first and text.startswith("data: {"):
            body = json.loads(text[len("data: ") :])
            body["sources"] = [{k: v for k, v in s.items() if k != "cited"} for s in given]
            text, first = f"data: {json.dumps(body)}\n\n", False
        yield text
