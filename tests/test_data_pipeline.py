"""`prepare` end to end on a small corpus, resume, worker-count independence, the loader, the CLI."""

import json
import random
import sys

import numpy as np
import pytest
import torch

from lmforge.cli import main as cli
from lmforge.data.config import load_config
from lmforge.data.loader import ShardLoader
from lmforge.data.prepare import prepare

WORDS = (
    "the of and to in is was for that with as on by it from at this which be are an or his her their "
    "river city market harbour stone wall church festival summer winter people trade ship road bridge "
    "garden tower castle village mountain forest field school book letter story music"
).split()


def _doc(rng, n=120):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    news = [_doc(rng) for _ in range(40)]
    news.append(news[3])  # exact duplicate
    words = news[7].split()
    words[10] = "bridge" if words[10] != "bridge" else "tower"
    news.append(" ".join(words))  # near duplicate
    with open(root / "news.jsonl", "w") as f:
        for i, t in enumerate(news):
            f.write(json.dumps({"id": f"news-{i}", "text": t}) + "\n")
        f.write("{broken\n")
        f.write(json.dumps({"id": "short", "text": "too short"}) + "\n")
    books = root / "books"
    books.mkdir()
    for i in range(12):
        (books / f"b{i}.txt").write_text(_doc(rng, 300))
    return root


def _cfg(corpus, **values):
    base = {
        "input.paths": [str(corpus / "news.jsonl"), str(corpus / "books")],
        "tokenize.vocab_size": 400,
        "pack.val_fraction": 0.1,
        "input.shard_bytes": 20_000,
        "workers": 1,
        "mix.weights": None,
        "filters.sources": None,
    }
    return load_config(values=base | values)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    stats = prepare(_cfg(corpus), out, progress=False)
    return out, stats


def test_prepare_outputs(prepared):
    out, stats = prepared
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 400
    assert stats["read"]["skipped"] == {"bad JSON (Expecting property name enclosed in double quotes at column 2)": 1}
    assert stats["rejected"] == {"gopher_min_words": 1}
    assert stats["dedup"]["exact_duplicates"] == 1 and stats["dedup"]["near_duplicates"] == 1
    clusters = [json.loads(line) for line in (out / "dedup" / "clusters.jsonl").read_text().splitlines()]
    assert {(c["kept"], c["kind"], tuple(c["members"])) for c in clusters} == {
        ("news-3", "exact", ("news-40",)),
        ("news-7", "near", ("news-41",)),
    }
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "lang"} for r in rejected] == [
        {"id": "short", "source": "news", "rule": "gopher_min_words"}
    ]
    assert all(isinstance(r["lang"], str) for r in rejected)  # the detected language, for the language rule
    kept = 40 + 12
    train, val = stats["tokens"]["train"], stats["tokens"]["val"]
    assert train["documents"] + val["documents"] == kept and val["documents"] > 0
    tokens = np.memmap(out / index["splits"]["train"]["shards"][0]["file"], dtype=np.uint16, mode="r")
    assert (tokens == index["eos_id"]).sum() == train["documents"] and tokens[-1] == index["eos_id"]
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert len((out / "train_docs.jsonl").read_text().splitlines()) == train["documents"]
    assert "| quality filters |" in (out / "stats.md").read_text()
    assert "news" in stats["mix"] and all(s == "news" or s.startswith("b") for s in stats["mix"])  # file stems


def test_resume_and_worker_count_give_the_same_shards(prepared, corpus, tmp_path):
    out, _ = prepared
    again = prepare(_cfg(corpus), out, progress=False)
    assert again["resumed_units"] == again["work_units"] > 1
    two = tmp_path / "two"
    prepare(_cfg(corpus, workers=2, **{"tokenize.tokenizer": str(out / "tokenizer")}), two, progress=False)
    for split in ("train", "val"):
        a = (out / f"{split}-00000.bin").read_bytes()
        assert a == (two / f"{split}-00000.bin").read_bytes()


def test_mix_weights_realised(corpus, tmp_path):
    # no validation split: with one b0 document, a hash of its (temp) path could send it there
    cfg = _cfg(
        corpus,
        **{
            "input.source": None,
            "mix.weights": {"news": 0.8, "b0": 0.2},
            "pack.val_fraction": 0.0,
            "input.paths": [str(corpus / "news.jsonl"), str(corpus / "books" / "b0.txt")],
        },
    )
    stats = prepare(cfg, tmp_path, progress=False)
    assert stats["mix"]["news"]["share"] == pytest.approx(0.8, abs=0.05)
    assert stats["mix"]["b0"]["epochs"] > 1  # one small book up-sampled


def test_loader_batches_shift_resume_and_ranks(prepared):
    out, _ = prepared
    loader = ShardLoader(out, seq_len=16, batch_size=4, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for _ in range(3):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(5)]
    resumed = ShardLoader(out, seq_len=16, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    for (ex, ey), (rx, ry) in zip(expected, (next(resumed) for _ in range(5))):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)
    # ranks: disjoint windows in the same step, together the single-process global batch
    ranks = [ShardLoader(out, seq_len=16, batch_size=2, seed=1, rank=r, world_size=2, prefetch=0) for r in (0, 1)]
    single = ShardLoader(out, seq_len=16, batch_size=4, seed=1, prefetch=0)
    for _ in range(3):
        r0, r1, s = next(ranks[0])[0], next(ranks[1])[0], next(single)[0]
        assert torch.equal(torch.cat([r0, r1]), s)
        assert not any(torch.equal(a, b) for a in r0 for b in r1)
    loader.close()
    resumed.close()


def test_loader_errors(prepared):
    from lmforge.common import LmforgeError

    out, _ = prepared
    with pytest.raises(LmforgeError, match="no split 'test'"):
        ShardLoader(out, seq_len=8, batch_size=1, split="test")
    with pytest.raises(LmforgeError, match="too few"):
        ShardLoader(out, seq_len=100_000, batch_size=1, split="val")
    loader = ShardLoader(out, seq_len=8, batch_size=2, seed=0, prefetch=0)
    with pytest.raises(LmforgeError, match="seed=5"):
        loader.load_state_dict(loader.state_dict() | {"seed": 5})


def test_cli_prepare_and_contamination(prepared, corpus, tmp_path, capsys):
    out, _ = prepared
    assert (
        cli(
            [
                "data",
                "prepare",
                str(corpus / "books"),
                "-o",
                str(tmp_path / "p"),
                "--no-progress",
                "--workers",
                "1",
                "--tokenizer",
                str(out / "tokenizer"),
                "--set",
                "mix.weights=null",
                "--set",
                "dedup.threshold=0.7",
                "--set",
                "pack.val_fraction=0",
            ]
        )
        == 0
    )
    assert "training tokens" in capsys.readouterr().out
    assert cli(["data", "prepare", "-o", str(tmp_path / "q"), "--set", "dedup.nope=1"]) == 2
    assert "override 'dedup.nope': unknown field 'nope'" in capsys.readouterr().err  # refused when set
    book = (corpus / "books" / "b2.txt").read_text().split()
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(
        json.dumps({"id": "leak", "text": " ".join(book[50:80])})
        + "\n"
        + json.dumps({"id": "fresh", "text": "entirely new words " * 10})
        + "\n"
    )
    report, clean = tmp_path / "report.json", tmp_path / "clean.jsonl"
    assert (
        cli(
            [
                "data",
                "contamination",
                "--train",
                str(tmp_path / "p"),
                "--eval",
                str(evalset),
                "--report",
                str(report),
                "--decontaminate",
                str(clean),
            ]
        )
        == 0
    )
    result = json.loads(report.read_text())
    assert result["summary"]["contaminated"] == 1
    assert [e["id"] for e in result["examples"] if e["contaminated"]] == ["leak"]
    assert result["examples"][0]["longest_overlap"] == 30
    clean_ids = [json.loads(line)["id"] for line in clean.read_text().splitlines()]
    assert not any(i.endswith("b2.txt") for i in clean_ids) and len(clean_ids) > 0


def test_ray_executor_matches_local(prepared, corpus, tmp_path, monkeypatch):
    """`--executor ray` on a local Ray cluster that the executor starts itself (as the CLI does): the
    shards are byte-identical to the local executor's. Without Ray the error names the extra."""
    import ray

    from lmforge.common import LmforgeError

    out, _ = prepared
    cfg = _cfg(corpus, executor="ray", workers=2, **{"tokenize.tokenizer": str(out / "tokenizer")})
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # as if not installed
        with pytest.raises(LmforgeError, match="pip install 'lmforge\\[ray\\]'"):
            prepare(cfg, tmp_path / "no-ray", progress=False)
    assert not ray.is_initialized()
    try:
        prepare(cfg, tmp_path, progress=False)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2  # workers=2 sized the cluster
    finally:
        ray.shutdown()
    for split in ("train", "val"):
        assert (out / f"{split}-00000.bin").read_bytes() == (tmp_path / f"{split}-00000.bin").read_bytes()


@pytest.mark.slow
def test_default_recipe_on_the_stdlib(tmp_path):
    """`lmforge data prepare` with no input: the stdlib corpus, both sources, the recipe's mix."""
    stats = prepare(load_config(), tmp_path, progress=False)
    assert stats["by_source"]["code"]["documents"] > 300 and stats["by_source"]["prose"]["documents"] > 100
    assert stats["mix"]["code"]["share"] == pytest.approx(0.7, abs=0.02)
    assert stats["tokens"]["train"]["tokens"] > 1_000_000
    loader = ShardLoader(tmp_path, seq_len=128, batch_size=4, prefetch=0)
    x, _ = next(loader)
    assert int(x.max()) < loader.vocab_size


def test_contamination_from_token_shards_alone(prepared, corpus, tmp_path, capsys):
    """Without train_docs.jsonl the packed shards are decoded with the folder's tokenizer."""
    import shutil

    out, _ = prepared
    shards = tmp_path / "shards"
    shutil.copytree(out, shards, ignore=shutil.ignore_patterns("train_docs.jsonl", "work"))
    first = json.loads((out / "train_docs.jsonl").read_text().splitlines()[0])["text"].split()
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(json.dumps({"id": "leak", "text": " ".join(first[5:40])}) + "\n")
    assert cli(["data", "contamination", "--train", str(shards), "--eval", str(evalset)]) == 0
    assert "1 of 1 evaluation examples contaminated" in capsys.readouterr().out


def test_loader_names_an_empty_split(tmp_path):
    from lmforge.common import LmforgeError

    (tmp_path / "index.json").write_text(json.dumps({"dtype": "uint16", "splits": {"val": {"shards": []}}}))
    with pytest.raises(LmforgeError, match=f"{tmp_path}: split 'val' has no tokens"):
        ShardLoader(tmp_path, seq_len=8, batch_size=1, split="val")


def test_data_tokenizer_of_a_shard_folder(prepared, tmp_path):
    from lmforge.common import LmforgeError
    from lmforge.data.shards import data_tokenizer

    out, _ = prepared
    tok = data_tokenizer(out)
    assert tok.decode(tok.encode("def add(a, b)")) == "def add(a, b)"
    with pytest.raises(LmforgeError, match="data index not found"):
        data_tokenizer(tmp_path)


def test_shard_documents_and_texts_agree(prepared):
    from lmforge.data.shards import data_tokenizer, iter_shard_texts
    from lmforge.eval.perplexity import shard_documents

    out, _ = prepared
    docs, texts = shard_documents(out, "train"), list(iter_shard_texts(out, "train"))
    tok = data_tokenizer(out)
    assert len(docs) == len(texts) > 10 and docs[0].dtype == np.int64
    assert [tok.decode(d.tolist()) for d in docs] == texts
    assert len(shard_documents(out, "train", limit=3)) == 3
