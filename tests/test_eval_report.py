"""Reports, the `lmforge eval` command, --compare, contamination flags, the built-in stdlib tasks,
and scoring through an OpenAI-compatible endpoint (a fake local server)."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from test_eval_common import OracleLM, tiny_lm, tiny_tokenizer

from lmforge.cli import main as cli
from lmforge.eval.builtin import (
    BuiltinConfig,
    docstring_examples,
    docstring_mc_examples,
    functions,
    held_out,
    run_builtin,
)
from lmforge.eval.report import load_results, write_report
from lmforge.eval.suite import evaluate
from lmforge.eval.tasks import TaskConfig

_WORDS = (
    "amber basalt cobalt dune ember fjord glacier harbor island jungle kelp lagoon meadow nebula oasis prairie "
    "quartz reef savanna tundra umber valley willow xenon yarrow zephyr"
).split()
# Contexts share no 13-word run (distinct word orders), so contamination is per example.
MC = [
    {
        "id": f"q{i}",
        "context": " ".join(_WORDS[(i * 5 + j * (i + 1)) % 26] for j in range(16)) + " - the count is",
        "choices": [f" {10 * i}", f" {10 * i + 1}", f" {10 * i + 2}"],
        "gold": 0,
    }
    for i in range(6)
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmforge.checkpoint import save_model

    lm = tiny_lm()
    out = tmp_path_factory.mktemp("m") / "tiny"
    save_model(lm.model, out, tokenizer=tiny_tokenizer())
    return out


def _shard_corpus(folder, texts):
    """A packed data folder (train split) with its tokenizer, as `lmforge data prepare` writes."""
    import numpy as np

    from lmforge.data.shards import ShardWriter, write_index

    tok = tiny_tokenizer()
    writer = ShardWriter(folder, "train", tok.vocab_size, tok.eos_id, shard_tokens=1 << 16)
    for t in texts:
        writer.add(np.asarray(tok.encode(t)))
    tok.save(folder / "tokenizer")
    write_index(folder, {"train": writer.close()}, tok.vocab_size, tok.eos_id)
    return folder


@pytest.mark.parametrize("kind", ["text", "shards", "sft-jsonl"])
def test_contamination_flags_and_clean_subset(tmp_path, kind):
    path = _write(tmp_path / "mc.jsonl", MC)
    texts = ["unrelated text. " + MC[1]["context"] + MC[1]["choices"][0] + " more.", MC[4]["context"]]
    if kind == "text":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(" ".join(texts))
    elif kind == "sft-jsonl":  # fine-tuning data: prompt/response or chat records
        corpus = _write(
            tmp_path / "sft.jsonl",
            [{"prompt": "q", "response": texts[0]}, {"messages": [{"role": "user", "content": texts[1]}]}],
        )
    else:
        corpus = _shard_corpus(tmp_path / "data", texts)
    oracle = OracleLM({})  # right on examples 1 and 4 only (golds end in 0: 10 and 40 score best, others worst)
    oracle.loglikelihood = lambda reqs: [
        (0.0 if c.strip() in ("10", "40") else -1.0 if c.endswith("0") else -0.5, True) for _, c in reqs
    ]
    results = evaluate(
        oracle, [TaskConfig("mc", "multiple_choice", path=str(path), target_delimiter="")], contamination=str(corpus)
    )
    t = results["tasks"][0]
    assert [e["contaminated"] for e in t["examples"]] == [False, True, False, False, True, False]
    assert t["contamination"]["contaminated"] == 2
    assert t["metrics"]["acc"] == pytest.approx(2 / 6) and t["metrics_clean"]["acc"] == 0.0


def test_report_files_and_every_prediction(tmp_path):
    path = _write(tmp_path / "mc.jsonl", MC)
    results = evaluate(
        OracleLM({r["context"]: r["choices"][0] for r in MC}), [TaskConfig("mc", "multiple_choice", path=str(path))]
    )
    paths = write_report(results, tmp_path / "out")
    saved = load_results(tmp_path / "out")
    assert [e["prediction"] for e in saved["tasks"][0]["examples"]] == [0] * 6
    md = paths["markdown"].read_text()
    assert "| mc | multiple_choice | acc | 1 |" in md and "![score by task](scores.png)" in md
    assert (tmp_path / "out" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in paths["html"].read_text() and "&lt;" not in "".join(md)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_builtin_tasks_are_deterministic_and_held_out():
    from lmforge.data.shards import is_validation

    cfg = BuiltinConfig(num_examples=6)
    assert all(is_validation(doc_id, 0.05, 0) for doc_id, _ in held_out(cfg))
    assert docstring_examples(cfg) == docstring_examples(BuiltinConfig(num_examples=6))
    mc = docstring_mc_examples(cfg)
    assert all(len(set(e["choices"])) == 4 and 0 <= e["gold"] < 4 for e in mc)
    assert docstring_mc_examples(BuiltinConfig(num_examples=6, seed=1)) != mc
    assert len(functions(cfg)) >= 20


def test_evaluate_builtin_for_a_model_in_memory(tmp_path):
    from lmforge.eval import evaluate_builtin

    lm = tiny_lm()
    lm.model.train()
    results = evaluate_builtin(
        lm.model, lm.tokenizer, tmp_path / "r", name="mine", num_examples=2, max_docs=1, max_chars=200, max_new_tokens=4
    )
    assert [t["name"] for t in results["tasks"]][-1] == "stdlib_docstring_mc" and results["model"] == "mine"
    assert (tmp_path / "r" / "report.html").is_file() and lm.model.training  # mode restored


def test_builtin_oracle_and_tiny_model():
    cfg = BuiltinConfig(num_examples=4, max_docs=2, max_chars=300, max_new_tokens=8)
    gold = {e["prompt"]: e["answers"][0] + "\n    More detail." for e in docstring_examples(cfg)}
    gold.update({e["context"]: e["choices"][e["gold"]] for e in docstring_mc_examples(cfg)})
    oracle = run_builtin(OracleLM(gold, junk='\n    """'), cfg, tasks=["stdlib_docstring", "stdlib_docstring_mc"])
    assert oracle[0].metrics["rouge_l"] == pytest.approx(1.0) and oracle[0].metrics["exact_match"] == 1.0
    assert oracle[1].metrics["acc"] == 1.0 and oracle[1].metrics["acc_mutual_info"] == 1.0
    results = {r.name: r for r in run_builtin(tiny_lm(), cfg)}
    assert set(results) == {"stdlib_code_ppl", "stdlib_prose_ppl", "stdlib_docstring", "stdlib_docstring_mc"}
    assert 5 < results["stdlib_code_ppl"].metrics["bits_per_byte"] < 20  # random 320-token model: ~log2(320)/1.5


def test_cli_eval_then_compare(tmp_path, model_dir, capsys):
    data = _write(tmp_path / "mc.jsonl", MC)
    args = [str(model_dir), "--task", f"multiple_choice:{data}", "--set", "builtin=null"]
    assert cli(["eval", *args, "--out", str(tmp_path / "a")]) == 0
    assert cli(["eval", *args, "--out", str(tmp_path / "b"), "--batch-size", "2"]) == 0
    a, b = load_results(tmp_path / "a"), load_results(tmp_path / "b")
    assert a["tasks"][0]["metrics"]["acc"] == b["tasks"][0]["metrics"]["acc"]  # batch size changes nothing
    assert cli(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "| mc | acc |" in table and (tmp_path / "c" / "compare-scores.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", "/nonexistent/model", "--set", "builtin=null", "--task", "generation:x.jsonl"],
            "model path not found",
        ),
        (["eval", "MODEL", "--task", "bogus:x.jsonl"], "unknown type 'bogus'"),
        (["eval", "MODEL", "--task", "nocolon"], "expected TYPE:PATH"),
        (["eval", "MODEL", "--set", "builtin=null"], "nothing to evaluate"),
        (["eval", "MODEL", "--set", "nosuch=1"], "unknown field 'nosuch'"),
        (["eval", "--compare", "missing-a", "missing-b"], "eval results not found"),
    ],
)
def test_cli_errors(argv, message, model_dir, tmp_path, capsys):
    argv = [str(model_dir) if a == "MODEL" else a for a in argv] + ["--out", str(tmp_path / "o")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "o" / "results.json").exists()


class _FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/completions: plain completions answer with the gold text; echo requests return
    per-character log-probabilities (-0.1 on a gold continuation, -1 elsewhere)."""

    gold: dict = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        if body.get("echo"):
            good = any(prompt == ctx + cont for ctx, cont in self.gold.items())
            lp = [None] + [-0.1 if good else -1.0] * (len(prompt) - 1)
            logprobs = {
                "tokens": list(prompt),
                "token_logprobs": lp,
                "text_offset": list(range(len(prompt))),
                "top_logprobs": [None] * len(prompt),
            }
            choice = {"index": 0, "text": prompt, "finish_reason": "length", "logprobs": logprobs}
        else:
            text = next((v for k, v in self.gold.items() if prompt.endswith(k)), "?")
            choice = {"index": 0, "text": text.strip() + "\n\nextra", "finish_reason": "stop", "logprobs": None}
        out = json.dumps(
            {"id": "x", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_endpoint_scoring_through_openai_client(tmp_path):
    from lmforge.eval.lm import load_lm

    _FakeOpenAI.gold = {r["context"]: r["choices"][0] for r in MC}
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lm = load_lm(f"http://127.0.0.1:{server.server_port}", endpoint_model="fake")
        path = _write(tmp_path / "mc.jsonl", MC)
        gen = _write(tmp_path / "gen.jsonl", [{"prompt": r["context"], "answer": r["choices"][0].strip()} for r in MC])
        text = tmp_path / "doc.txt"
        text.write_text("abcdefghij")
        results = evaluate(
            lm,
            [
                TaskConfig("mc", "multiple_choice", path=str(path), target_delimiter=""),
                TaskConfig("gen", "generation", path=str(gen)),
                TaskConfig("ppl", "perplexity", path=str(text)),
            ],
        )
    finally:
        server.shutdown()
    assert results["tasks"][0]["metrics"]["acc"] == 1.0
    assert results["tasks"][1]["metrics"]["exact_match"] == 1.0
    # 9 scored characters at -1 nat each (the first has no prediction) over 10 bytes.
    assert results["tasks"][2]["metrics"]["bits_per_byte"] == pytest.approx(9 / math.log(2) / 10)
    assert results["model"] == "fake"


def test_judge_task_through_evaluate(tmp_path):
    from test_eval_judge import StubJudge, _answer

    rows = [{"question": f"Name a colour ({i})", "baseline": "bad answer"} for i in range(4)]
    path = _write(tmp_path / "q.jsonl", rows)
    model = OracleLM({r["question"]: "good answer" for r in rows}, junk="")
    judge = StubJudge(lambda p: "[[A]]" if "good" in _answer(p, "A") else "[[B]]")
    cfg = TaskConfig("vs", "judge_pairwise", path=str(path), judge="stub-judge")
    results = evaluate(model, [cfg], load=lambda spec: judge)
    m = results["tasks"][0]["metrics"]
    assert m["win_rate"] == 1.0 and m["wins"] == 4 and m["consistency"] == 1.0
    write_report(results, tmp_path / "out")  # judge tasks have a plot with the CI
    assert (tmp_path / "out" / "scores.png").is_file()


def test_quantized_checkpoint_loads_through_its_manifest(tmp_path):
    from lmforge.checkpoint import save_model
    from lmforge.eval.lm import LocalLM
    from lmforge.quant import QuantLinear, QuantOptions, quantize_model

    lm = tiny_lm()
    quantize_model(lm.model, QuantOptions(method="rtn", scheme="int8"), progress=False)
    save_model(lm.model, tmp_path / "q", tokenizer=tiny_tokenizer())
    loaded = LocalLM.load(tmp_path / "q")
    assert any(isinstance(m, QuantLinear) for m in loaded.model.modules())
    req = [("def f(x):", " return x"), ("def f(x):", " pass")]
    assert loaded.loglikelihood(req) == pytest.approx(lm.loglikelihood(req), abs=1e-4)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt_tuning"])
def test_adapter_checkpoint_scores_like_its_full_forward(tmp_path, method):
    """Adapters come back through the manifest, and the shared-context cache path still equals a
    plain forward of context + continuation (prefix/prompt slots shift the cache correctly)."""
    import torch
    from test_eval_scoring import full_forward_logprob

    from lmforge import peft
    from lmforge.checkpoint import save_model
    from lmforge.eval.lm import LocalLM

    lm = tiny_lm()
    config = {
        "lora": peft.LoraConfig(r=4),
        "prefix": peft.PrefixConfig(num_virtual_tokens=3, projection=False),
        "prompt_tuning": peft.PromptTuningConfig(num_virtual_tokens=3),
    }[method]
    model = peft.apply(lm.model, config)
    with torch.no_grad():  # make the adapter matter (LoRA's B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    save_model(model, tmp_path / method, tokenizer=tiny_tokenizer())
    loaded = LocalLM.load(tmp_path / method)
    ctx, cont = lm.tokenizer.encode("def f(x):"), lm.tokenizer.encode(" return x + 1")
    [(ll, _)] = loaded.score_choices(ctx, [cont])
    assert ll == pytest.approx(full_forward_logprob(model.eval(), ctx, cont)[0], abs=1e-3)
    assert ll != pytest.approx(full_forward_logprob(tiny_lm().model, ctx, cont)[0], abs=1e-3)


def test_against_the_lmforge_server(tmp_path):
    """Generation through `lmforge.serve` gives what the local model generates, and log-likelihoods
    through the server's echo=True prompt logprobs equal the local model's."""
    from test_serve_utils import ServerThread, make_checkpoint

    from lmforge.eval.lm import LocalLM, load_lm
    from lmforge.serve import ServeConfig

    model_dir, _ = make_checkpoint(tmp_path)
    rows = [{"prompt": p, "answer": "x"} for p in ("The quick brown", "Hello there,", "A server")]
    gen = _write(tmp_path / "gen.jsonl", rows)
    cfg = TaskConfig("gen", "generation", path=str(gen), max_new_tokens=6, stop=[])
    local = evaluate(LocalLM.load(model_dir), [cfg])
    with ServerThread(ServeConfig(model=str(model_dir))) as server:
        remote = load_lm(server.url)  # the served model's name comes from /v1/models
        results = evaluate(remote, [cfg])
        pairs = [("The quick", " brown"), ("Hello", " there, friend")]
        remote_ll = remote.loglikelihood(pairs)
    local_ll = LocalLM.load(model_dir).loglikelihood(pairs)
    for (r, r_greedy), (l, l_greedy) in zip(remote_ll, local_ll):
        assert r == pytest.approx(l, abs=1e-3) and r_greedy == l_greedy
    assert [e["output"] for e in results["tasks"][0]["examples"]] == [
        e["output"] for e in local["tasks"][0]["examples"]
    ]
    assert results["model"] == model_dir.name


def test_cli_code_task_with_a_real_model(tmp_path, model_dir):
    from test_eval_codeexec import PROBLEMS

    data = _write(tmp_path / "code.jsonl", PROBLEMS)
    assert (
        cli(["eval", str(model_dir), "--task", f"code:{data}", "--set", "builtin=null", "--out", str(tmp_path / "o")])
        == 0
    )
    [task] = load_results(tmp_path / "o")["tasks"]
    assert task["metrics"]["pass@1"] == 0.0  # a random tiny model writes no working code...
    assert all(s in ("failed", "timeout") for e in task["examples"] for s in e["results"])  # ...and nothing escapes


def test_contamination_corpus_bad_jsonl_line_is_named(tmp_path):
    from lmforge.common import LmforgeError
    from lmforge.eval.contamination import load_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(LmforgeError, match=f"{corpus}:2: invalid JSON"):
        load_index(corpus)
