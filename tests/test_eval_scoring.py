"""Log-likelihood with the shared-context KV cache equals full forwards; perplexity windows; the
task pipeline scores an oracle at 100%."""

import json
import math

import pytest
import torch
from test_eval_common import OracleLM, tiny_lm

from lmforge.eval.lm import cut_at_stop, encode_pair
from lmforge.eval.perplexity import token_nll, windows
from lmforge.eval.tasks import TaskConfig, run_generation, run_multiple_choice


def full_forward_logprob(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0, :-1].float(), -1)
    steps = logp[len(ctx) - 1 :]
    target = ids[0, len(ctx) :]
    return float(steps.gather(-1, target[:, None]).sum()), bool((steps.argmax(-1) == target).all())


def test_shared_context_cache_equals_full_forward():
    lm = tiny_lm(batch_size=2)  # 3 choices -> two batches on one context
    ctx = lm.tokenizer.encode("def add(a, b):\n    return")
    conts = [lm.tokenizer.encode(c) for c in (" a + b", " None", " add(a - 1, b) + 1 if a else b")]
    got = lm.loglikelihood(
        [("def add(a, b):\n    return", c) for c in (" a + b", " None", " add(a - 1, b) + 1 if a else b")]
    )
    for (ll, greedy), c in zip(got, conts):
        ref_ll, ref_greedy = full_forward_logprob(lm.model, ctx, c)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_greedy_flag_true_for_the_models_own_argmax():
    lm = tiny_lm()
    ctx = lm.tokenizer.encode("import os")
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    [(ll, greedy)] = lm.score_choices(ctx, [ids[len(ctx) :]])
    assert greedy and ll == pytest.approx(full_forward_logprob(lm.model, ctx, ids[len(ctx) :])[0], abs=1e-4)


def test_long_context_keeps_its_end():
    lm = tiny_lm(max_position_embeddings=32, position="learned")
    ctx, cont = list(range(5, 60)), [7, 8, 9]
    [(ll, _)] = lm.score_choices(ctx, [cont])
    kept = ctx[-(32 - len(cont)) :]
    assert ll == pytest.approx(full_forward_logprob(lm.model, kept, cont)[0], abs=1e-4)


def test_encode_pair_moves_trailing_space_to_continuation():
    tok = tiny_lm().tokenizer
    ctx, cont = encode_pair(tok, "x = ", "1")
    assert tok.decode(ctx) == "x =" and tok.decode(cont) == " 1"


def test_windows_score_every_token_once():
    for n, L, s in [(10, 4, 4), (10, 4, 1), (37, 8, 3), (3, 8, 8)]:
        spans = windows(n, L, s)
        scored = [t for b, e, first in spans for t in range(first, e)]
        assert scored == list(range(1, n))
        assert all(e - b - 1 <= L for b, e, _ in spans)  # never more inputs than the context
        assert all(first - b >= min(L - s, first - 1) for b, e, first in spans)  # context kept after the first


def test_sliding_window_perplexity_matches_token_by_token_reference():
    lm = tiny_lm()
    ids = lm.tokenizer.encode("def f(x):\n    return x * 2 + 1  # a comment that goes on for a while")
    L, s = 8, 3
    total, n = token_nll(lm.model, ids, lm.prefix_id, L, s, batch_size=4)
    seq = [lm.prefix_id] + ids
    ref = 0.0
    with torch.no_grad():
        for b, e, first in windows(len(seq), L, s):
            for t in range(first, e):
                logp = torch.log_softmax(lm.model(torch.tensor([seq[b:t]]))[0, -1], -1)
                ref -= float(logp[seq[t]])
    assert n == len(ids) and total == pytest.approx(ref, rel=1e-5)
    whole, _ = token_nll(lm.model, ids, lm.prefix_id, 512)  # fits in one window
    assert lm.loglikelihood_rolling([lm.tokenizer.decode(ids)])[0] == pytest.approx(-whole, rel=1e-5)


def test_uniform_model_bits_per_byte_hand_computed():
    from lmforge.eval.perplexity import text_perplexity

    lm = tiny_lm()
    torch.nn.init.zeros_(lm.model.lm_head.weight)  # tied: embeddings zero too -> uniform next-token distribution
    text = "hello world, hello lmforge"
    metrics, records = text_perplexity(lm, [("doc", text)])
    n = len(lm.tokenizer.encode(text))
    V = lm.model.config.vocab_size
    assert metrics["perplexity"] == pytest.approx(V, rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(n * math.log2(V) / len(text.encode()), rel=1e-4)


MC = [
    {
        "context": f"Question {i}: what is {i} plus {i}?\nAnswer:",
        "choices": [str(2 * i + d) for d in (-1, 0, 1, 2)],
        "gold": 1,
    }
    for i in range(12)
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_oracle_scores_100_on_multiple_choice_with_fewshot(tmp_path):
    path = _write(tmp_path / "mc.jsonl", MC)
    oracle = OracleLM({r["context"]: r["choices"][r["gold"]] for r in MC})
    cfg = TaskConfig("mc", "multiple_choice", path=path, num_fewshot=3, seed=7)
    res = run_multiple_choice(oracle, cfg)
    assert res.metrics["acc"] == 1.0 and res.metrics["acc_norm"] == 1.0 and res.metrics["examples"] == 12
    first = res.examples[0]["prompt"]
    assert first.count("Question") == 4 and first.endswith(MC[0]["context"])  # 3 shots + the question
    assert MC[0]["context"] not in first[: -len(MC[0]["context"])]  # never its own answer as a shot
    assert run_multiple_choice(oracle, cfg).examples[0]["prompt"] == first  # seeded
    limited = TaskConfig("mc", "multiple_choice", path=path, num_fewshot=3, seed=7, limit=2)
    assert [e["prompt"] for e in run_multiple_choice(oracle, limited).examples] == [
        e["prompt"] for e in res.examples[:2]
    ]  # the same shots whatever the limit
    wrong = OracleLM({r["context"]: r["choices"][0] for r in MC})
    assert run_multiple_choice(wrong, cfg).metrics["acc"] == 0.0


def test_oracle_scores_100_on_generation_metrics(tmp_path):
    rows = [
        {"prompt": f"Translate number {i} to words:", "answer": [f"the number {w} as words", "other"]}
        for i, w in enumerate(["zero", "one", "two", "three"])
    ]
    path = _write(tmp_path / "gen.jsonl", rows)
    oracle = OracleLM({r["prompt"]: r["answer"][0] for r in rows})
    cfg = TaskConfig(
        "gen", "generation", path=path, num_fewshot=1, metrics=["exact_match", "f1", "rouge_l", "bleu", "chrf"]
    )
    m = run_generation(oracle, cfg).metrics
    assert m["exact_match"] == 1.0 and m["f1"] == 1.0 and m["rouge_l"] == pytest.approx(1.0)
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0)


def test_answer_regex_extracts(tmp_path):
    rows = [{"prompt": "2+2?", "answer": "4"}]
    oracle = OracleLM({"2+2?": "Let me think. The answer is 4."}, junk="")
    cfg = TaskConfig("g", "generation", path=_write(tmp_path / "g.jsonl", rows), answer_regex=r"answer is (\d+)")
    res = run_generation(oracle, cfg)
    assert res.examples[0]["prediction"] == "4" and res.metrics["exact_match"] == 1.0


def test_real_model_generation_and_choice_run(tmp_path):
    lm = tiny_lm()
    res = run_multiple_choice(lm, TaskConfig("mc", "multiple_choice", path=_write(tmp_path / "mc.jsonl", MC[:4])))
    assert 0 <= res.metrics["acc"] <= 1 and len(res.examples[0]["loglikelihoods"]) == 4
    rows = [{"prompt": "def f(x):\n", "answer": "return x"}]
    g = run_generation(lm, TaskConfig("g", "generation", path=_write(tmp_path / "g.jsonl", rows), max_new_tokens=5))
    assert isinstance(g.examples[0]["output"], str) and "f1" in g.metrics


@pytest.mark.parametrize(
    "row, message",
    [
        ({"choices": ["a", "b"], "gold": 0}, "missing field 'context'"),
        ({"context": "q", "choices": ["a"], "gold": 0}, "at least 2"),
        ({"context": "q", "choices": ["a", "b"], "gold": 5}, "'gold' must be an index"),
    ],
)
def test_bad_task_rows_name_the_line(tmp_path, row, message):
    from lmforge.common import LmforgeError

    path = _write(tmp_path / "bad.jsonl", [MC[0], row])
    with pytest.raises(LmforgeError, match=message) as e:
        run_multiple_choice(OracleLM({}), TaskConfig("mc", "multiple_choice", path=path))
    assert "bad.jsonl:2" in str(e.value)


def test_validation_shard_perplexity_equals_text_perplexity(tmp_path):
    import numpy as np

    from lmforge.data.shards import ShardWriter, write_index
    from lmforge.eval.perplexity import shard_perplexity, text_perplexity

    lm = tiny_lm()
    texts = ["def f(x):\n    return x\n", "import os\nprint(os.sep)\n", "# a comment\nclass A:\n    pass\n"]
    writer = ShardWriter(tmp_path, "val", lm.tokenizer.vocab_size, lm.tokenizer.eos_id, shard_tokens=20)
    for t in texts:
        writer.add(np.asarray(lm.tokenizer.encode(t)))
    write_index(tmp_path, {"val": writer.close()}, lm.tokenizer.vocab_size, lm.tokenizer.eos_id)
    from_shards, records = shard_perplexity(lm, tmp_path, "val")
    from_text, _ = text_perplexity(lm, [(str(i), t) for i, t in enumerate(texts)])
    assert len(records) == 3 and from_shards["bits_per_byte"] == pytest.approx(from_text["bits_per_byte"], rel=1e-6)
    assert len(shard_perplexity(lm, tmp_path, "val", limit=2)[1]) == 2


def test_batched_generation_matches_infer_generate_and_cuts_at_stop():
    from lmforge.infer.generate import generate

    lm = tiny_lm(batch_size=3)
    prompts = ["def f(x):", "import os\n", "class A:\n    def", "x = 1\ny ="]
    eos = lm.tokenizer.eos_id
    ref = []
    for row in generate(
        lm.model, [lm.tokenizer.encode(p) for p in prompts], max_new_tokens=10, stop_token_ids=[eos]
    ).tolist():
        ref.append(lm.tokenizer.decode(row[: row.index(eos)] if eos in row else row))
    assert lm.generate(prompts, max_new_tokens=10) == ref
    # Rows stopped early still give the text before the first stop string.
    assert lm.generate(prompts, max_new_tokens=10, stop=[":", "\n"]) == [cut_at_stop(r, [":", "\n"]) for r in ref]
