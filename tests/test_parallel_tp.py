"""Tensor parallelism on 2 gloo processes (torchrun): logits and greedy tokens equal the
single-process model's for Llama (GQA), Qwen2 (q/k/v biases, tied embeddings) and Mixtral (MoE)
shapes; `pretrain --tp 2` gives the losses of one process for 20 steps; a TP checkpoint loads in
one process and a single-process checkpoint loads into a TP run (`generate --tp 2`). One torchrun
launch (a module fixture) serves every test: start-up dominates on CPU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from parallel_engine_cases import VARIANTS, check_variant
from parallel_guard import run_guarded

SHAPES = {  # tiny, but every axis TP must get right: GQA (4 query / 2 kv heads), biases, ties, experts
    "llama": dict(arch="llama", num_key_value_heads=2),
    "qwen2": dict(arch="qwen2", num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True),
    "mixtral": dict(arch="mixtral", num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
}
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
BASE["initializer_range"] = 0.2  # large random weights: greedy tokens vary, so a wrong shard shows


def torchrun(*args: str, nproc: int = 2, timeout: int = 300):
    root = str(Path(__file__).resolve().parent.parent)  # a script's sys.path starts at tests/, not the repo
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_LOG_LEVEL": "WARNING", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = run_guarded(cmd, env, timeout)  # torchrun's workers die with the test, on a timeout too
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def tiny_corpus(tmp_path_factory) -> str:
    """The built-in corpus, built once per session for every parallel test (it is cached by folder)."""
    from lmforge.train.stdlib_data import builtin_pretrain_data

    return str(builtin_pretrain_data(tmp_path_factory.getbasetemp() / "parallel-corpus", 100_000, 300))


ARGS = ["--seq-len", "32", "--batch-size", "4", "--steps", "20", "--set", "train.eval_every=0"]
ARGS += ["--set", "train.save_every=10", "--set", "train.keep_last=0"]
for key, value in {**BASE, "num_key_value_heads": 2, "initializer_range": 0.02}.items():
    if key != "vocab_size":  # the data's tokenizer sets it
        ARGS += ["--set", f"model.{key}={value}"]

MEMORY_BATCH = (4, 64)  # the micro-batch whose training step each TP rank measures
GENERATE = ["--prompt-ids", "5,6,7,8", "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "3"]


def _worker(out: str, checkpoint: str, runs: str, data: str) -> None:
    """Run under torchrun: each shape's full model on every rank, then its TP-sharded copy. The Llama
    shape comes from a checkpoint written by one process (it loads into the TP run)."""
    import copy

    from parallel_engine_cases import engine_results

    from lmforge.checkpoint import load_model
    from lmforge.infer.decode import decode_ids
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model import ModelConfig, Transformer
    from lmforge.parallel import apply_tensor_parallel

    results = {}
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    for name, shape in SHAPES.items():
        torch.manual_seed(0)  # the same weights on every rank
        full = (load_model(checkpoint) if name == "llama" else Transformer(ModelConfig(**BASE, **shape))).eval()
        sharded = apply_tensor_parallel(copy.deepcopy(full), 2, torch.device("cpu"))
        params = SamplingParams(max_new_tokens=8)
        if name == "llama":  # the continuous-batching engine runs on this one (parallel_engine_cases.py)
            engine_models = (full, sharded)
        with torch.no_grad():
            results[name] = {
                "max_abs_diff": float((full(ids) - sharded(ids)).abs().max()),
                "local_q_weight": list(sharded.model.layers[0].self_attn.q_proj.weight.to_local().shape),
                "tokens_full": decode_ids(full, params, ids[:, :5].tolist()),
                "tokens_tp": decode_ids(sharded, params, ids[:, :5].tolist()),
                "tied": sharded.lm_head.weight is sharded.model.embed_tokens.weight,
                "local_params": sum(
                    p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in sharded.parameters()
                ),
            }
    results["engine"] = engine_results(engine_models[0], engine_models[1])
    # A TP rank's memory in one training step, measured (weights, grads, AdamW states, saved activations).
    from test_parallel_estimate import measure_step

    from lmforge.train.objectives import lm_loss_sum

    torch.manual_seed(0)
    model = apply_tensor_parallel(Transformer(ModelConfig(**BASE, **SHAPES["llama"])), 2, torch.device("cpu"))
    batch = torch.randint(0, BASE["vocab_size"], MEMORY_BATCH, generator=torch.Generator().manual_seed(1))
    results["memory"] = measure_step(model, lambda: lm_loss_sum(model(batch), batch)[0] / batch.numel())
    # The same launch runs the CLI (one torchrun start-up fewer): `generate --tp 2` on the checkpoint
    # written by one process, then 20 steps of `pretrain --tp 2`.
    import contextlib
    import io

    from lmforge.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["generate", "--tp", "2", "--model", checkpoint, *GENERATE]) == 0
    results["generate_cli"] = printed.getvalue()
    if int(os.environ["RANK"]) == 0:
        Path(out).write_text(json.dumps(results))
    assert main(["pretrain", "--name", "tp", "--tp", "2", "--runs-dir", runs, "--data", data, *ARGS]) == 0


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory) -> Path:
    """One torchrun launch of the worker below; -> its folder (tp.json, runs/tp, data)."""
    from lmforge.checkpoint import save_model
    from lmforge.model import ModelConfig, Transformer

    root = tmp_path_factory.mktemp("tp")
    data = tiny_corpus(tmp_path_factory)
    (root / "data").write_text(str(data))
    torch.manual_seed(1)
    save_model(Transformer(ModelConfig(**BASE, **SHAPES["llama"])), root / "llama")
    torchrun(__file__, str(root / "tp.json"), str(root / "llama"), str(root / "runs"), str(data))
    return root


def test_tp_logits_and_greedy_tokens_match_one_process(tp_run):
    from lmforge.model import ModelConfig
    from lmforge.train.parallel_memory import per_rank_parameters

    results = json.loads((tp_run / "tp.json").read_text())
    for key in ("generate_cli", "memory", "engine"):
        results.pop(key)
    assert set(results) == set(SHAPES)
    for name, r in results.items():
        assert r["local_q_weight"] == [BASE["hidden_size"] // 2, BASE["hidden_size"]], name  # really sharded
        assert r["max_abs_diff"] <= 1e-5, (name, r["max_abs_diff"])
        assert r["tokens_tp"] == r["tokens_full"] and len({t for row in r["tokens_full"] for t in row}) > 2, (name, r)
        assert r["tied"] == SHAPES[name].get("tie_word_embeddings", False)
        if not SHAPES[name].get("attention_bias"):  # the estimate counts no biases
            assert r["local_params"] == per_rank_parameters(ModelConfig(**BASE, **SHAPES[name]), tp=2), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp_engine_gives_one_process_tokens(tp_run, variant):
    check_variant(json.loads((tp_run / "tp.json").read_text())["engine"], variant)


def test_tp_engine_direct_model_call_runs_on_every_rank(tp_run):
    assert json.loads((tp_run / "tp.json").read_text())["engine"]["direct_call_diff"] <= 1e-5


def test_tp_engine_refuses_an_unsharded_model():
    from lmforge.common import LmforgeError
    from lmforge.infer.engine_tp import TPEngine
    from lmforge.model import ModelConfig, Transformer

    with pytest.raises(LmforgeError, match="apply_tensor_parallel"):
        TPEngine(Transformer(ModelConfig(**BASE)))


def test_tp_rank_memory_equals_the_estimate(tp_run):
    """`lmforge estimate --tp 2`'s per-rank weights, gradients and AdamW states equal what a rank holds
    after a real training step; its activations are within 15% of what autograd saved on the rank."""
    from test_parallel_estimate import check_against_estimate

    from lmforge.model import ModelConfig
    from lmforge.train.parallel_memory import parallel_estimate

    measured = json.loads((tp_run / "tp.json").read_text())["memory"]
    check_against_estimate(measured, parallel_estimate(ModelConfig(**BASE, **SHAPES["llama"]), *MEMORY_BATCH, tp=2))


def test_generate_cli_with_tp_prints_what_one_process_prints(tp_run, capsys):
    """Seeded sampling too: every rank draws the same numbers from the same gathered logits."""
    from lmforge.cli import main

    assert main(["generate", "--model", str(tp_run / "llama"), *GENERATE]) == 0
    one = capsys.readouterr().out
    assert len(one.strip().split(",")) == 10
    assert json.loads((tp_run / "tp.json").read_text())["generate_cli"] == one


def _losses(run: Path) -> dict[int, float]:
    from lmforge.recipes._common import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_tp_training_matches_one_process_and_checkpoints_cross(tp_run, tmp_path):
    """20 steps of `pretrain --tp 2` give one process's losses; its step-10 checkpoint (weights and
    optimizer state, gathered from the shards) resumes in one process onto the same trajectory."""
    from lmforge.checkpoint import load_model
    from lmforge.cli import main

    common = ["--runs-dir", str(tmp_path), "--data", (tp_run / "data").read_text(), *ARGS]
    assert main(["pretrain", "--name", "single", *common]) == 0
    resume = tp_run / "runs" / "tp" / "checkpoints" / "step-00000010"
    assert main(["pretrain", "--name", "resumed", "--resume", str(resume), *common]) == 0
    tp, single, resumed = (_losses(d) for d in (tp_run / "runs" / "tp", tmp_path / "single", tmp_path / "resumed"))
    assert sorted(tp) == sorted(single) == list(range(1, 21)) and sorted(resumed) == list(range(11, 21))
    for step, loss in single.items():
        assert abs(tp[step] - loss) <= 1e-5, (step, tp, single)
        assert step <= 10 or abs(resumed[step] - loss) <= 1e-5, (step, resumed, single)
    a, b = load_model(tp_run / "runs" / "tp" / "final"), load_model(tmp_path / "single" / "final")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)


if __name__ == "__main__":  # the torchrun worker
    import torch.distributed as dist

    _worker(*sys.argv[1:5])
    if dist.is_initialized():
        dist.destroy_process_group()
