"""`lmforge rag` from the command line, the embedding models (an HF encoder folder, the lmforge
bi-encoder trained with CLIP's loss), the built-in stdlib QA set and the `rag` task of `lmforge eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("bm25s")

from lmforge.cli import main  # noqa: E402
from lmforge.rag.index import IndexSettings, RagIndex, build_index  # noqa: E402
from lmforge.rag.retrieve import search  # noqa: E402


@pytest.fixture()
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "cache.md").write_text(
        "# Cache\n\nThe cache keeps results for one hour. It is cleared on restart.\n\n"
        "# Vectors\n\nFaiss finds the nearest vectors.\n",
        encoding="utf-8",
    )
    (folder / "zh.md").write_text("# 索引\n\n检索增强生成先把文档分块。然后建立索引！\n", encoding="utf-8")
    return folder


def test_rag_index_and_search_json_lines(docs, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    assert main(["rag", "index", str(docs), "-o", idx]) == 0
    assert "2 indexed" in capsys.readouterr().out
    assert main(["rag", "index", str(docs), "-o", idx]) == 0
    assert "0 indexed, 2 unchanged" in capsys.readouterr().out
    assert main(["rag", "search", idx, "how long is the cache kept", "--top-k", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2][: len(rows)] and rows
    top = rows[0]
    assert set(top) >= {"rank", "score", "id", "file", "lines", "text"}
    assert top["file"].endswith("cache.md") and top["lines"] == [1, 3] and "one hour" in top["text"]
    assert top["id"] == f"{top['file']}:1-3" and top["score"] > 0
    assert main(["rag", "search", idx, "建立索引", "--top-k", "1"]) == 0
    assert "zh.md:1-3" in capsys.readouterr().out


def test_rag_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert main(["rag", "index", str(tmp_path / "missing"), "-o", str(tmp_path / "idx")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["rag", "search", str(tmp_path / "noindex"), "query"]) == 2
    err = capsys.readouterr().err
    assert "not an lmforge rag index" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["rag", "index", str(tmp_path / "empty"), "-o", str(tmp_path / "idx")]) == 2
    assert "no readable file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from lmforge.checkpoint import save_model
    from lmforge.model import build_model
    from lmforge.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("rag_model") / "model"
    tok = train_tokenizer([open(json.__file__).read()], 320)  # default specials: a ChatML template
    torch.manual_seed(0)
    save_model(build_model("tiny", vocab_size=320), folder, tokenizer=tok)
    return folder


def test_rag_ask_with_a_local_model_prints_sources(docs, tmp_path, capsys, tiny_model):
    idx = str(tmp_path / "idx")
    assert main(["rag", "index", str(docs), "-o", idx]) == 0
    capsys.readouterr()
    argv = ["rag", "ask", idx, "how long is the cache kept?", "--model", str(tiny_model)]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Sources:" in out and "cache.md:1-3" in out
    assert main([*argv, "--max-new-tokens", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["question"] == "how long is the cache kept?" and row["sources"][0]["file"].endswith("cache.md")


def test_rag_ask_against_a_running_lmforge_serve(docs, tmp_path, capsys, tiny_model):
    from test_serve_utils import ServerThread

    from lmforge.serve import ServeConfig

    idx = str(tmp_path / "idx")
    assert main(["rag", "index", str(docs), "-o", idx]) == 0
    capsys.readouterr()
    with ServerThread(ServeConfig(model=str(tiny_model), engine_process=False)) as s:
        argv = ["rag", "ask", idx, "how long is the cache kept?", "--endpoint", s.url, "--max-new-tokens", "4"]
        assert main([*argv, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert isinstance(row["answer"], str) and row["sources"][0]["file"].endswith("cache.md")
    assert main([*argv[:-2], "--max-new-tokens", "4"]) == 2  # the server is gone: one clear line
    assert "cannot reach the endpoint" in capsys.readouterr().err


def _tiny_bert(folder):
    transformers = pytest.importorskip("transformers")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ] + "the cache keeps results hour faiss nearest vectors".split()
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = transformers.BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(folder)


def test_hf_encoder_mean_pooling_matches_a_manual_pass(docs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from lmforge.rag.embedders import load_embedder

    _tiny_bert(tmp_path / "bert")
    emb = load_embedder(tmp_path / "bert")
    texts = ["the cache keeps results", "faiss nearest vectors hour the the"]
    got = emb.embed(texts)
    tok, model = AutoTokenizer.from_pretrained(tmp_path / "bert"), AutoModel.from_pretrained(tmp_path / "bert")
    for text, row in zip(texts, got):  # one text at a time: no padding at all
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        want = hidden.mean(0) / hidden.mean(0).norm()
        np.testing.assert_allclose(row, want.numpy(), atol=1e-5)
    out = str(tmp_path / "idx")
    assert main(["rag", "index", str(docs), "-o", out, "--embedder", str(tmp_path / "bert")]) == 0
    index = RagIndex.load(out)
    assert index.vectors.shape == (len(index.chunks), 16)
    assert len(search(index, "nearest vectors", 2, "hybrid")) == 2  # the embedder reloads from the manifest


@pytest.mark.parametrize("layers", [0, 1])  # static embeddings, a Transformer
def test_biencoder_learns_pairs_with_the_clip_loss(tmp_path, layers):
    from lmforge.rag.biencoder import BiEncoder, BiEncoderConfig, train_biencoder

    topics = ["cache", "vector", "parser", "socket", "thread", "string", "number", "file"]
    pairs = [(f"what handles the {t}?", f"def handle_{t}(x):\n    '''Handle a {t} value.'''") for t in topics]
    cfg = BiEncoderConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        projection_dim=16, max_length=32, steps=60, batch_size=8, lr=3e-3,
    )  # fmt: skip
    enc = train_biencoder(pairs, tmp_path / "enc", cfg)
    q = enc.embed([p[0] for p in pairs], "query")
    d = enc.embed([p[1] for p in pairs], "passage")
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    assert (np.argmax(q @ d.T, axis=1) == np.arange(len(pairs))).mean() >= 0.75
    again = BiEncoder.load(tmp_path / "enc")
    np.testing.assert_allclose(again.embed([pairs[0][0]], "query"), q[:1], atol=1e-5)


def test_builtin_qa_set_is_held_out_and_points_at_def_lines():
    from lmforge.eval.builtin import BuiltinConfig
    from lmforge.rag.qa import builtin_qa, training_pairs

    examples, files = builtin_qa(BuiltinConfig(), num_examples=20)
    assert len(examples) == 20 and files
    ex = examples[0]
    assert ex["question"].startswith("What does `") and ex["answer"]
    src = ex["sources"][0]
    line = open(src["file"], encoding="utf-8").read().split("\n")[src["line"] - 1]
    assert "def " in line and ex["question"].split("`")[1].rsplit(".", 1)[1] in line
    train_files = {p[1].split("\n")[0] for p in training_pairs(BuiltinConfig(), max_files=5)}
    held = {"/".join(str(f).split("/")[-3:]) for f in files}
    assert train_files and not (train_files & held)  # the bi-encoder never trains on a test module


def test_eval_rag_task_scores_retrieval_answers_and_citations(docs, tmp_path):
    from lmforge.eval.suite import run_task
    from lmforge.eval.tasks import TaskConfig

    idx = tmp_path / "idx"
    build_index([str(docs)], idx, IndexSettings())
    qa = tmp_path / "qa.jsonl"
    rows = [
        {"question": "How long does the cache keep results?", "answer": "one hour",
         "sources": [{"file": str(docs / "cache.md"), "line": 3}]},
        {"question": "What finds the nearest vectors in a cache?", "answer": "Faiss", "sources": [{"file": str(docs / "cache.md")}]},
    ]  # fmt: skip
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    class Reader:  # cites passage 1 and copies its answer-bearing words
        name = "reader"

        def generate(self, prompts, max_new_tokens=64, **kw):
            return ["The cache keeps results for one hour [1]." if "How long" in p else "Faiss [2]"
                    for p in prompts]  # fmt: skip

    import lmforge.rag.evaluate  # noqa: F401  (registers the task type)

    cfg = TaskConfig(name="rag", type="rag", path=str(qa), index=str(idx), rag_mode="bm25", rag_passages=2)
    result = run_task(Reader(), cfg)
    m = result.metrics
    assert m["examples"] == 2 and m["recall@1"] == 1.0 and m["mrr"] == 1.0
    assert m["citation_rate"] == 1.0 and 0 < m["rouge_l"] < 1
    first = result.examples[0]
    assert first["scores"]["citation_faithfulness"] == 1.0 and first["citations"] == [1]
    # The second answer cites [2], a passage that does not hold "Faiss": unfaithful.
    assert result.examples[1]["scores"]["citation_faithfulness"] == 0.0
