"""`lmforge serve MODEL --rag INDEX`: the RAG model name over the OpenAI API, driven by the official
openai client against a running server (passages in the prompt, sources in the answer, refusals)."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("bm25s")
openai = pytest.importorskip("openai")

from test_serve_utils import ServerThread, make_checkpoint  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.common import LmforgeError  # noqa: E402
from lmforge.rag.answer import user_message  # noqa: E402
from lmforge.rag.index import IndexSettings, RagIndex, build_index  # noqa: E402
from lmforge.rag.retrieve import search  # noqa: E402
from lmforge.serve import ServeConfig, build_state  # noqa: E402

QUESTION = "how long is the cache kept for a query?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag_serve")
    docs = root / "docs"
    docs.mkdir()
    (docs / "cache.md").write_text("# Cache\n\nThe cache keeps results for one hour. It is cleared on restart.\n")
    (docs / "vectors.md").write_text("# Vectors\n\nFaiss finds the nearest vectors of a query.\n")
    (docs / "tokens.md").write_text("# Tokens\n\nThe tokenizer splits text into tokens.\n")
    build_index([str(docs)], root / "idx", IndexSettings())
    model_dir, _ = make_checkpoint(root)
    return model_dir, root / "idx"


@pytest.fixture(scope="module")
def server(setup):
    model_dir, idx = setup
    with ServerThread(ServeConfig(model=str(model_dir), rag=str(idx), rag_top_k=2, engine_process=False)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_rag_model_is_listed_with_the_base_as_parent(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-chat", "tiny-chat-rag"]
    assert client.models.retrieve("tiny-chat-rag").model_extra["parent"] == "tiny-chat"


def test_rag_answer_is_the_base_model_answering_the_augmented_prompt(client, setup):
    _, idx = setup
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="tiny-chat-rag", messages=asked, max_tokens=6, temperature=0)
    sources = r.model_extra["sources"]
    hits = search(RagIndex.load(idx), QUESTION, 2, "bm25")
    assert [s["id"] for s in sources] == [h.chunk.id for h in hits] and len(sources) == 2
    assert sources[0]["file"].endswith("cache.md") and sources[0]["n"] == 1 and sources[0]["lines"] == [1, 3]
    assert r.model == "tiny-chat-rag" and isinstance(r.choices[0].model_extra["citations"], list)
    # the same answer as the base model given the passages by hand: retrieval went into the last user turn
    by_hand = [asked[0], {"role": "user", "content": user_message(QUESTION, hits, 1200)}]
    base = client.chat.completions.create(model="tiny-chat", messages=by_hand, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == base.choices[0].message.content
    assert r.usage.prompt_tokens == base.usage.prompt_tokens
    plain = client.chat.completions.create(model="tiny-chat", messages=asked, max_tokens=6, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_rag_stream_carries_the_sources_in_its_first_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat-rag", messages=[{"role": "user", "content": QUESTION}], max_tokens=4, stream=True, n=2
        )
    )
    assert chunks[0].model_extra["sources"][0]["file"].endswith("cache.md")
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}  # n is honoured


def test_passages_that_do_not_fit_the_context_are_left_out(client, server):
    limit = server.state.max_model_len
    prompt = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="tiny-chat-rag", messages=prompt, max_tokens=limit - 60)
    assert len(r.model_extra["sources"]) < 2  # what the model saw, not what was retrieved


def test_rag_model_refuses_what_retrieval_cannot_honour(client, server):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    user = {"role": "user", "content": QUESTION}
    with pytest.raises(openai.BadRequestError, match="tools are not supported"):
        client.chat.completions.create(model="tiny-chat-rag", messages=[user], tools=[tool], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="last user message"):
        client.chat.completions.create(
            model="tiny-chat-rag", messages=[user, {"role": "assistant", "content": "hm"}], max_tokens=2
        )
    with pytest.raises(openai.BadRequestError, match="question is empty"):
        client.chat.completions.create(model="tiny-chat-rag", messages=[{"role": "user", "content": " "}])
    with pytest.raises(openai.BadRequestError, match="chat/completions only"):
        client.completions.create(model="tiny-chat-rag", prompt="x", max_tokens=2)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny-chat-rag", "messages": [user], "k": 1})
    assert r.status_code == 400 and "k" in json.dumps(r.json())  # unknown fields: the server's usual 400


def test_bad_rag_index_is_a_clear_startup_error(setup, tmp_path, capsys):
    model_dir, _ = setup
    with pytest.raises(LmforgeError, match="--rag .*no such folder"):
        build_state(ServeConfig(model=str(model_dir), rag=str(tmp_path / "missing"), engine_process=False))
    (tmp_path / "notindex").mkdir()
    assert main(["serve", str(model_dir), "--rag", str(tmp_path / "notindex"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--rag" in err and "not an lmforge rag index" in err and "Traceback" not in err
    assert main(["serve", str(model_dir), "--rag-top-k", "5", "--port", "0"]) == 2
    assert "give --rag too" in capsys.readouterr().err
