"""Data stages one by one: readers, stdlib corpus, normalize, filters, language id, mix, n-gram index."""

import gzip
import json

import pytest

from lmforge.common import LmforgeError
from lmforge.data.filters import FilterConfig, apply_filters, words_of
from lmforge.data.mix import MixItem, mix
from lmforge.data.ngram import NGramIndex, check_examples, decontaminate, summarize
from lmforge.data.normalize import NormalizeConfig, detect_language, normalize_text, redact_pii
from lmforge.data.readers import Document, ReadReport, read_inputs
from lmforge.data.stdlib import comments, docstrings, documented_functions, read_stdlib, signature, stdlib_files

PROSE = (
    "The history of the city is long and varied. It was founded by traders who came from the coast "
    "and built their houses with stone from the hills. Over the years the town grew into a busy port, "
    "and the people who lived there learned to trade with many nations. Today it is known for its "
    "markets, its old churches and the festival that is held every summer in the main square. "
    "Visitors come from all over the world to see the harbour and to walk along the walls."
)


def test_readers_all_formats_and_bad_input_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("# title\nbody")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    lines = [
        json.dumps({"id": "x1", "content": "first"}),
        "{not json",
        json.dumps({"content": ""}),
        json.dumps({"other": 1}),
        json.dumps({"content": "second"}),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "gz doc"}) + "\n")
    (tmp_path / "e.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"content": "zst doc"}) + "\n").encode())
    )
    pq.write_table(pa.table({"content": ["pq one", "pq two"]}), tmp_path / "f.parquet")
    report = ReadReport()
    docs = list(read_inputs([tmp_path], text_field="content", report=report))
    texts = [d.text for d in docs]
    assert texts == ["plain text", "# title\nbody", "first", "second", "gz doc", "zst doc", "pq one", "pq two"]
    assert docs[2].id == "x1" and docs[3].id.endswith("c.jsonl:5") and docs[0].source == "a"
    assert report.skipped == {
        "undecodable bytes (not UTF-8 at byte 3)": 1,
        "empty document": 2,
        "bad JSON (Expecting property name enclosed in double quotes at column 2)": 1,
        "no string field 'content'": 1,
    }
    assert any(
        p.endswith("c.jsonl:2: bad JSON (Expecting property name enclosed in double quotes at column 2)")
        for p in report.problems
    )
    assert [d.text for d in read_inputs([str(tmp_path / "*.txt")])] == ["plain text"]
    with pytest.raises(LmforgeError, match="matches no file"):
        list(read_inputs([str(tmp_path / "*.nothing")]))


def test_stdlib_corpus_has_code_and_prose():
    files = stdlib_files()
    assert len(files) > 300 and not any("site-packages" in p.parts for p in files)
    docs = list(read_stdlib([f for f in files if f.name == "textwrap.py"], ReadReport()))
    assert [d.source for d in docs] == ["code", "prose"]
    assert "Text wrapping and filling" in docs[1].text and "import re" not in docs[1].text
    src = 'x = 1  # inline\n# first\n# second\ns = """\n# not a comment\n"""\n# third\n'
    assert comments(src) == ["first second", "third"]
    import ast

    assert docstrings(ast.parse('"""mod"""\nclass A:\n    """cls"""\n    def f(self):\n        """fn"""\n')) == [
        "mod",
        "cls",
        "fn",
    ]


def test_documented_functions_signature_and_first_sentence():
    src = '''
@decorator
def area(w: float, h: float = 1.0) -> float:
    """Return the   area. Of a rectangle.

    More."""

def bare():
    pass

class C:
    async def fetch(self, *, timeout=3):
        """No full stop here
        at all"""
def broken(:
'''
    assert list(documented_functions(src)) == []  # does not parse
    src = src.replace("def broken(:", "")
    got = [(signature(node), sentence) for node, sentence in documented_functions(src)]
    assert got == [
        ("def area(w: float, h: float=1.0) -> float:", "Return the area."),
        ("async def fetch(self, *, timeout=3):", "No full stop here at all"),
    ]


def test_normalize():
    cfg = NormalizeConfig()
    assert normalize_text("Ｈｅｌｌｏ\u3000ｗｏｒｌｄ！", cfg) == "Hello world!"
    assert normalize_text("a\x00b\u200bc\r\nd   \n\n\n\ne", cfg) == "abc\nd\n\ne"
    assert normalize_text("  indented  code", NormalizeConfig(whitespace="trailing")) == "indented  code"
    assert normalize_text("a   b", NormalizeConfig(whitespace="all")) == "a b"
    assert normalize_text("ﬁ", NormalizeConfig(unicode_form=None)) == "ﬁ"
    assert redact_pii("mail bob@example.com from 192.168.1.20 now") == "mail <EMAIL> from <IP_ADDRESS> now"
    with pytest.raises(LmforgeError, match="unicode_form"):
        NormalizeConfig(unicode_form="NFX")


def test_language_by_lingua():
    assert detect_language(PROSE)[0] == "en"
    assert detect_language("这是一个关于城市历史的中文段落。")[0] == "zh"
    assert detect_language("これは日本語の文章です。")[0] == "ja"
    assert detect_language("Это русский текст.")[0] == "ru"


def test_filters_pass_prose_and_name_the_rule():
    cfg = FilterConfig()
    assert apply_filters(PROSE, "web", cfg)[1] is None
    assert apply_filters("too short text", "web", cfg)[1] == "gopher_min_words"
    assert apply_filters(PROSE + " lorem ipsum dolor", "web", cfg)[1] == "c4_lorem_ipsum"
    assert apply_filters(PROSE + " {x}", "web", cfg)[1] == "c4_curly_brace"
    repeated = "\n".join(["buy the cheap watches now and save money with us today"] * 20)
    assert apply_filters(repeated, "web", cfg)[1] == "gopher_dup_lines"
    symbols = " ".join(["# heading ..."] * 40) + " " + PROSE
    assert apply_filters(symbols, "web", cfg)[1] == "gopher_symbol_word_ratio"
    # English (as lingua says) without two of Gopher's stop words; the rule is English-only
    no_stop = (
        "Rivers flow quickly through green valleys near quiet villages. Farmers grow wheat, barley, "
        "apples, pears; children play football after school while dogs chase cats around gardens. "
        "Old bridges cross wide streams where fishermen catch trout every morning. Markets sell fresh "
        "bread, cheese, honey plus warm soup during cold winter months. Visitors enjoy long walks along "
        "ancient walls, stopping at small cafes serving coffee, tea or lemonade."
    )
    assert apply_filters(no_stop, "web", cfg)[1] == "gopher_stop_words"
    assert apply_filters("x = 1", "code", FilterConfig(sources=["prose"]))[1] is None  # rules skip other sources
    assert apply_filters(PROSE, "web", FilterConfig(languages=["zh"]))[1] == "language"


def test_chinese_measured_in_characters():
    zh = (
        "北京是中国的首都，也是一座历史悠久的城市。这里有许多古老的建筑和美丽的公园，每年都有很多游客来参观。"
        "城市的交通非常方便，地铁可以到达大部分地方。人们喜欢在周末去公园散步，或者和朋友一起吃饭。"
    )
    assert len(words_of(zh)) > 50  # one word per character, not one giant word
    text, rule, lang = apply_filters(zh, "web", FilterConfig())
    assert lang == "zh" and rule is None


def test_mix_weights_upsample_and_report():
    items = [MixItem(("a", i), "a", 100) for i in range(10)] + [MixItem(("b", i), "b", 100) for i in range(2)]
    order, report = mix(items, {"a": 0.5, "b": 0.5}, seed=0)
    assert report["b"]["epochs"] == 3.0 and report["a"]["epochs"] == 0.6
    assert report["a"]["share"] == report["b"]["share"] == 0.5
    assert sum(1 for k in order if k[0] == "b") == 6 and len(order) == 12
    assert mix(items, {"a": 0.5, "b": 0.5}, seed=0)[0] == order
    assert mix(items, {"a": 0.5, "b": 0.5}, seed=1)[0] != order
    natural, rep = mix(items, None)
    assert len(natural) == 12 and rep["a"]["share"] == pytest.approx(10 / 12, abs=1e-4)
    with pytest.raises(LmforgeError, match="source\\(s\\) c"):
        mix(items, {"c": 1.0})


def test_ngram_index_finds_planted_contamination_and_only_it():
    train = [PROSE, "Completely unrelated sentence about gardening, soil, and the care of tomato plants in summer."]
    index = NGramIndex.build(train, n=13)
    planted = "Question: " + " ".join(PROSE.split()[20:45]) + "? Answer: yes"
    clean = "The capital of France is Paris and it has many museums, cafes and parks for the visitors to enjoy."
    short = "a short question"
    results = check_examples(index, [("planted", planted), ("clean", clean), ("short", short)])
    by_id = {r.id: r for r in results}
    assert by_id["planted"].contaminated and by_id["planted"].longest_overlap == 25
    assert not by_id["clean"].contaminated and by_id["clean"].longest_overlap == 0
    assert by_id["short"].ngrams == 0 and not by_id["short"].contaminated
    assert summarize(results)["contaminated_fraction"] == pytest.approx(1 / 3)
    # case and punctuation do not hide an overlap
    assert index.contains(planted.upper().replace(" ", " , "))
    eval_index = NGramIndex.build([planted], n=13)
    removed = []
    kept = list(decontaminate([Document("d0", train[0], "s"), Document("d1", train[1], "s")], eval_index, removed))
    assert removed == ["d0"] and [d.id for d in kept] == ["d1"]


def test_ngram_index_save_load(tmp_path):
    index = NGramIndex.build([PROSE], n=8)
    index.save(tmp_path / "idx.npy")
    again = NGramIndex.load(tmp_path / "idx.npy")
    assert again.n == 8 and (again.hashes == index.hashes).all()


def test_vectorised_ngram_repetition_matches_the_plain_definition():
    import random
    from collections import Counter

    from lmforge.data.filters import _NGrams

    def top(words, n):  # characters in all occurrences of the most frequent n-gram
        gram, count = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)).most_common(1)[0]
        return count * sum(map(len, gram)) / sum(map(len, words)) if count > 1 else 0.0

    def dup(words, n):  # characters of words inside a repeated (not first) occurrence of an n-gram
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if gram in seen:
                covered[i : i + n] = [True] * n
            seen.add(gram)
        return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words))

    rng = random.Random(0)
    for _ in range(60):
        vocab = [f"w{i}" * rng.randint(1, 3) for i in range(rng.randint(2, 30))]
        words = [rng.choice(vocab) for _ in range(rng.randint(12, 150))]
        words += words[: rng.randint(0, len(words))]
        grams = _NGrams(words)
        for n in range(2, 11):
            assert grams.top_char_frac(n) == pytest.approx(top(words, n))
            assert grams.dup_char_frac(n) == pytest.approx(dup(words, n))
