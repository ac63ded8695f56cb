"""`data prepare` on a user's own folder with the default recipe: sources in natural proportion,
the quality filters on prose (not code), language ID by lingua, CJK text n-grammed by character
for contamination and dedup."""

import json
import logging
import random

import pytest

from lmforge.cli import main as cli
from lmforge.common import LmforgeError
from lmforge.data.config import load_config
from lmforge.data.dedup import DedupConfig, MinHasher, dedup_texts
from lmforge.data.filters import FilterConfig, apply_filters
from lmforge.data.langid import detect_language
from lmforge.data.mix import resolve_weights
from lmforge.data.ngram import NGramIndex, check_examples
from lmforge.data.prepare import prepare
from lmforge.data.stdlib import BUILTIN_WEIGHTS
from lmforge.data.words import token_strings, whitespace_spans

WORDS = (
    "the of and to in is was for that with as on by it from at this which be are an or his her their "
    "river city market harbour stone wall church festival summer winter people trade ship road bridge "
    "garden tower castle village mountain forest field school book letter story music"
).split()
FRENCH = (
    "La ville est située au bord de la rivière et les habitants vont au marché chaque matin pour acheter "
    "du pain, du fromage et des légumes. Pendant l'été, les touristes visitent le château et se promènent "
    "le long des murs anciens. Les enfants jouent dans le parc pendant que leurs parents boivent un café "
    "sur la place. Le soir, on entend la musique du festival qui dure toute la semaine."
)
ENGLISH = (
    "The town lies on the bank of the river and the people who live there go to the market every "
    "morning to buy bread, cheese and vegetables. In the summer the visitors walk along the old walls "
    "and the children play in the park while their parents drink coffee in the square. In the evening "
    "the music of the festival can be heard all over the town."
)
CHINESE = (
    "北京是中国的首都，也是一座历史悠久的城市。这里有许多古老的建筑和美丽的公园，每年都有很多游客来参观。"
    "城市的交通非常方便，地铁可以到达大部分地方。人们喜欢在周末去公园散步，或者和朋友一起吃饭。"
)
CHINESE_OTHER = (
    "上海位于长江入海口，是一座国际化的大都市。黄浦江两岸高楼林立，夜景十分迷人。"
    "这里的小笼包和生煎包非常有名，吸引了许多美食爱好者前来品尝。春天的时候，公园里开满了鲜花。"
)


def _english(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="module")
def mydocs(tmp_path_factory):
    """A user's folder: .txt, .md, .jsonl (several sources), French and Chinese prose, a .py file too
    short for the prose rules, and one prose document the rules must reject."""
    root = tmp_path_factory.mktemp("mydocs")
    rng = random.Random(0)
    (root / "notes.txt").write_text(_english(rng, 150))
    (root / "guide.md").write_text("# Guide\n\n" + _english(rng, 250) + "\n\n" + _english(rng, 100))
    (root / "french.txt").write_text(FRENCH)
    (root / "chinese.txt").write_text(CHINESE)
    (root / "spam.txt").write_text("buy now")  # prose under min_words: rejected by default
    (root / "tool.py").write_text("import os\n\n\ndef main():\n    print(os.getcwd())\n")  # code: not filtered
    with open(root / "posts.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"post-{i}", "text": _english(rng, 120)}) + "\n")
        f.write(json.dumps({"id": "snippet", "kind": "code", "text": "x = 1"}) + "\n")  # a code record
    return root


@pytest.fixture(scope="module")
def prepared(mydocs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert cli(["data", "prepare", str(mydocs), "-o", str(out), "--no-progress"]) == 0  # no --set, no --config
    return out, json.loads((out / "stats.json").read_text())


def test_user_folder_prepares_with_the_default_recipe_in_natural_proportion(prepared, mydocs):
    out, stats = prepared
    mix = stats["mix"]
    # The mix counts training documents. The validation split is a hash of each document's id, which
    # for a file is its path, so which few land there depends on where the folder is: leave them out.
    from lmforge.data.config import PackConfig
    from lmforge.data.shards import is_validation

    pack = PackConfig()
    files = [p for p in mydocs.iterdir() if p.suffix != ".jsonl"]  # a JSONL's records have their own ids
    in_val = {p.name.split(".")[0] for p in files if is_validation(str(p), pack.val_fraction, pack.seed)}
    expected = {"notes", "guide", "french", "chinese", "tool", "posts"} - in_val  # file stems; spam rejected
    assert set(mix) == expected
    assert stats["mix_weights"] == "natural"
    total = sum(m["tokens_available"] for m in mix.values())
    for m in mix.values():  # every training document once, each source its own share
        assert m["epochs"] == 1.0 and m["documents_out"] == m["documents"]
        assert m["share"] == pytest.approx(m["tokens_available"] / total, abs=1e-3)
    assert "training split by the natural proportions" in (out / "stats.md").read_text()


def test_filters_apply_to_prose_not_code_and_are_counted(prepared):
    out, stats = prepared
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["rule"]) for r in rejected] == [("spam", "gopher_min_words")]
    assert stats["by_source"]["tool"]["documents"] == 1  # 5 words of code pass: the rules skip code
    assert stats["by_source"]["posts"]["documents"] == 7  # the "kind": "code" record too
    assert stats["filter_scope"] == {"checked": 11, "not_checked": 2, "applies_to": "prose"}
    assert "11 of 13 documents checked" in (out / "stats.md").read_text()


def test_languages_in_the_stats(prepared):
    out, stats = prepared
    langs = stats["by_language"]
    assert langs["fr"]["documents"] == 1 and langs["zh"]["documents"] == 1 and langs["code"]["documents"] == 2
    assert langs["en"]["documents"] == 8
    assert "| fr | 1 |" in (out / "stats.md").read_text()


def test_languages_en_drops_french_and_chinese_keeps_english(mydocs, tmp_path):
    stats = prepare(
        load_config(values={"input.paths": [str(mydocs)], "filters.languages": ["en"], "workers": 1}),
        tmp_path,
        progress=False,
    )
    rejected = {json.loads(line)["source"]: json.loads(line) for line in (tmp_path / "rejected.jsonl").open()}
    assert rejected["french"]["rule"] == "language" and rejected["french"]["lang"] == "fr"
    assert rejected["chinese"]["rule"] == "language" and rejected["chinese"]["lang"] == "zh"
    assert {"notes", "guide", "posts", "tool"} <= set(stats["mix"])
    assert apply_filters(FRENCH, "web", FilterConfig(languages=["en"]))[1] == "language"
    assert apply_filters(ENGLISH, "web", FilterConfig(languages=["en"]))[1] is None
    assert apply_filters(FRENCH, "web", FilterConfig(languages=["fr"]))[1] is None


def test_lingua_labels_short_texts():
    samples = {
        "en": "Open the file, read every line and close it when you are done.",
        "fr": "Ouvrez le fichier, lisez chaque ligne puis fermez-le.",
        "de": "Öffnen Sie die Datei und lesen Sie jede Zeile.",
        "es": "Abra el archivo, lea cada línea y ciérrelo al terminar.",
        "it": "Questa funzione restituisce il numero di elementi corrispondenti.",
        "ru": "Эта функция возвращает количество подходящих элементов.",
        "zh": "打开文件，读取每一行，然后关闭它。",
        "ja": "ファイルを開いて、各行を読み、最後に閉じてください。",
        "ko": "파일을 열고 각 줄을 읽은 다음 닫으세요.",
    }
    assert {lang: detect_language(text)[0] for lang, text in samples.items()} == {k: k for k in samples}
    assert detect_language("12345 678") == ("unknown", 0.0)
    assert detect_language(ENGLISH)[1] > 0.9


def test_language_config_errors_name_the_field():
    with pytest.raises(LmforgeError, match="filters.languages: 'xx'"):
        FilterConfig(languages=["xx"])
    with pytest.raises(LmforgeError, match="filters.language_accuracy"):
        FilterConfig(language_accuracy="medium")
    assert FilterConfig(languages="EN").languages == ["en"]


def test_weights_auto_explicit_and_missing_sources(mydocs, tmp_path, capsys):
    assert resolve_weights("auto", BUILTIN_WEIGHTS) == BUILTIN_WEIGHTS  # the built-in corpus
    assert resolve_weights("auto", None) is None  # user inputs: natural
    assert resolve_weights({"a": 1.0}, None) == {"a": 1.0}
    with pytest.raises(LmforgeError, match="mix.weights: 'natural'"):
        resolve_weights("natural", None)
    assert load_config().mix.weights == "auto"
    # weights the user names are the user's: a source with no documents stays an error
    code = cli(
        [
            "data",
            "prepare",
            str(mydocs),
            "-o",
            str(tmp_path / "a"),
            "--no-progress",
            "--set",
            "mix.weights={notes: 1, prose: 1}",
        ]
    )
    assert code != 0 and "mix.weights: no documents from source(s) prose" in capsys.readouterr().err


def test_explicit_weights_on_user_sources(mydocs, tmp_path):
    stats = prepare(
        load_config(values={"input.paths": [str(mydocs)], "workers": 1, "mix.weights": {"posts": 0.5, "guide": 0.5}}),
        tmp_path,
        progress=False,
    )
    assert stats["mix"]["posts"]["share"] == pytest.approx(0.5, abs=0.15)
    assert stats["mix"]["notes"]["tokens"] == 0 and stats["mix_weights"] == {"posts": 0.5, "guide": 0.5}


def test_filters_sources_matching_nothing_is_logged(mydocs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lmforge.data"):
        stats = prepare(
            load_config(values={"input.paths": [str(mydocs)], "workers": 1, "filters.sources": ["prose"]}),
            tmp_path,
            progress=False,
        )
    assert stats["filter_scope"]["checked"] == 0 and "spam" in stats["mix"]  # nothing filtered...
    assert "the filters checked no document" in caplog.text  # ...and said so


def test_everything_filtered_writes_the_rejected_file_it_names(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("too short")
    (tmp_path / "in" / "b.txt").write_text("also too short")
    with pytest.raises(LmforgeError, match="rejected.jsonl") as e:
        prepare(
            load_config(values={"input.paths": [str(tmp_path / "in")], "workers": 1}), tmp_path / "out", progress=False
        )
    path = tmp_path / "out" / "rejected.jsonl"
    assert str(path) in str(e.value)
    assert [json.loads(line)["rule"] for line in path.read_text().splitlines()] == ["gopher_min_words"] * 2


# ----------------------------------------------------------------------------- CJK n-grams


def test_words_split_cjk_characters_and_keep_the_rest():
    assert token_strings("Hello, world! 天气很冷，所以abc我们 한국어 カタカナ。 end") == [
        "Hello,",
        "world!",
        "天",
        "气",
        "很",
        "冷",
        "，",
        "所",
        "以",
        "abc",
        "我",
        "们",
        "한",
        "국",
        "어",
        "カ",
        "タ",
        "カ",
        "ナ",
        "。",
        "end",
    ]
    english = "plain  english\ttext,\nunchanged"
    data = english.encode()
    import numpy as np

    spans = whitespace_spans(np.frombuffer(data, dtype=np.uint8))
    assert token_strings(english) == [data[s:e].decode() for s, e in zip(*spans)]


def test_verbatim_chinese_paragraph_is_contaminated_and_a_different_one_is_not():
    from lmforge.eval.contamination import index_from_texts

    index = index_from_texts([ENGLISH, CHINESE])
    same, other, part = check_examples(
        index, [("same", CHINESE), ("other", CHINESE_OTHER), ("part", "问题：" + CHINESE[10:60])]
    )
    assert same.contaminated and same.ngrams > 50 and same.matched / same.ngrams == 1.0
    assert not other.contaminated and other.matched == 0 and other.ngrams > 50
    assert part.contaminated and part.longest_overlap >= 40  # characters
    assert NGramIndex.build([CHINESE]).longest_overlap(CHINESE) == len(index.ngram_hashes(CHINESE)) + 12


def test_chinese_near_duplicates_found_by_word_shingle_dedup():
    near = CHINESE.replace("美丽", "漂亮").replace("吃饭", "聚餐")  # two words changed
    keep, cluster = dedup_texts([CHINESE, CHINESE_OTHER, near, ENGLISH], DedupConfig())  # shingle: word
    assert cluster.tolist() == [0, 1, 0, 3]
    shingles = MinHasher(ngram=5).shingle_strings("北京是中国的首都")
    assert shingles[0] == "北 京 是 中 国".encode() and len(shingles) == 4
