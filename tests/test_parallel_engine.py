"""The continuous-batching engine on a tensor-parallel model, 2 gloo processes (torchrun): rank 0
schedules, both ranks step. Several concurrent greedy requests (some arriving while others decode)
give the tokens one process gives, with chunked prefill, prompt logprobs, KV offload (swap) and
recompute preemption, prompt-lookup and draft-model speculation; a direct model call (the
embeddings path) runs on both ranks. One torchrun launch serves every case."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from test_parallel_tp import BASE, SHAPES, torchrun

PROMPT_LENS, NEW_TOKENS = (3, 9, 17, 5, 12, 30), (8, 12, 6, 10, 9, 7)
VARIANTS = {  # name -> Engine keyword arguments; block_size 4 so that sequences span several blocks
    "plain": dict(block_size=4, max_batch_tokens=24),
    "swap": dict(block_size=4, num_blocks=16, max_seqs=6),  # too few blocks for all: preemption, KV offload
    "recompute": dict(block_size=4, num_blocks=16, preemption="recompute"),
    "lookup": dict(block_size=4, lookup=True, num_speculative=3),
    "draft": dict(block_size=4, num_speculative=2),
}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, BASE["vocab_size"], (n,), generator=g).tolist() for n in PROMPT_LENS]


def _run(engine) -> dict:
    """Half the requests first, the rest after two steps (they join sequences already decoding)."""
    from lmforge.infer.sampling import SamplingParams

    prompts, ids = _prompts(), []

    def add(i: int) -> None:
        lp = 2 if i == 1 else None  # one request with prompt logprobs (every position's logits)
        ids.append(engine.add_request(prompts[i], SamplingParams(max_new_tokens=NEW_TOKENS[i]), prompt_logprobs=lp))

    for i in range(3):
        add(i)
    for _ in range(2):
        engine.step()
    for i in range(3, len(prompts)):
        add(i)
    while engine.has_unfinished():
        engine.step()
    logprobs = [e[1] for e in engine.requests[ids[1]].prompt_token_logprobs[1:]]  # the first has none
    return dict(tokens=[engine.output(i) for i in ids], prompt_logprobs=logprobs, stats=engine.stats)


def _worker(out: str) -> None:
    import torch.distributed as dist

    from lmforge.infer.engine import Engine
    from lmforge.infer.engine_tp import TPEngine, control_group, follow
    from lmforge.model import ModelConfig, Transformer
    from lmforge.parallel import apply_tensor_parallel

    torch.manual_seed(0)  # the same weights on every rank
    full = Transformer(ModelConfig(**BASE, **SHAPES["llama"])).eval()
    sharded = apply_tensor_parallel(copy.deepcopy(full).requires_grad_(False), 2, torch.device("cpu"))
    group = control_group()
    if dist.get_rank() != 0:
        for _ in VARIANTS:
            follow(sharded, group)
        return
    draft = Transformer(ModelConfig(**{**BASE, "hidden_size": 16, "num_hidden_layers": 1})).eval()
    results = {}
    for name, kwargs in VARIANTS.items():
        kwargs = {**kwargs, "draft": draft} if name == "draft" else kwargs
        engine = TPEngine(sharded, group=group, **kwargs)
        results[name] = {"tp": _run(engine), "one": _run(Engine(full, **kwargs))}
        if name == "plain":  # a direct call of the engine's model (what /v1/embeddings does) runs on both ranks
            ids = torch.tensor([_prompts()[2]])
            with torch.no_grad():
                results["direct_call_diff"] = float((engine.model(ids) - full(ids)).abs().max())
        engine.close()
    with open(out, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tp-engine") / "engine.json"
    torchrun(__file__, str(out), timeout=240)
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp_engine_gives_one_process_tokens(engine_run, variant):
    r = engine_run[variant]
    assert r["tp"]["tokens"] == r["one"]["tokens"], variant
    assert [len(t) for t in r["tp"]["tokens"]] == list(NEW_TOKENS)
    assert len({t for row in r["tp"]["tokens"] for t in row}) > 4  # varied tokens: a wrong shard would show
    assert max(abs(a - b) for a, b in zip(r["tp"]["prompt_logprobs"], r["one"]["prompt_logprobs"])) <= 1e-5
    assert len(r["tp"]["prompt_logprobs"]) == PROMPT_LENS[1] - 1
    stats = r["tp"]["stats"]
    if variant in ("swap", "recompute"):
        assert stats["preemptions"] > 0, stats
    if variant == "swap":
        assert stats["swaps_out"] > 0 and stats["swaps_in"] == stats["swaps_out"], stats
    if variant in ("lookup", "draft"):
        assert stats["drafted_tokens"] > 0, stats


def test_tp_engine_direct_model_call_runs_on_every_rank(engine_run):
    assert engine_run["direct_call_diff"] <= 1e-5


def test_tp_engine_refuses_an_unsharded_model():
    from lmforge.common import LmforgeError
    from lmforge.infer.engine_tp import TPEngine
    from lmforge.model import ModelConfig, Transformer

    with pytest.raises(LmforgeError, match="apply_tensor_parallel"):
        TPEngine(Transformer(ModelConfig(**BASE)))


if __name__ == "__main__":  # the torchrun worker
    import torch.distributed as dist

    _worker(sys.argv[1])
    if dist.is_initialized():
        dist.destroy_process_group()
