"""The continuous-batching engine on a tensor-parallel model (run inside test_parallel_tp.py's torchrun
worker, one launch for every TP test): rank 0 schedules, both ranks step. Several concurrent greedy
requests (some arriving while others decode) give the tokens one process gives, with chunked prefill,
prompt logprobs, KV offload (swap) and recompute preemption, prompt-lookup and draft-model
speculation; a direct model call (the embeddings path) runs on both ranks."""

from __future__ import annotations

import torch

VOCAB = 64  # test_parallel_tp.BASE's
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
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


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


def engine_results(full, sharded) -> dict | None:
    """Under torchrun: on rank 0, each variant's tokens from the TPEngine on `sharded` and from a
    single-process Engine on `full` (its unsharded copy); the other ranks follow (-> None)."""
    import torch.distributed as dist

    from lmforge.infer.engine import Engine
    from lmforge.infer.engine_tp import TPEngine, control_group, follow
    from lmforge.model import ModelConfig, Transformer

    group = control_group()
    if dist.get_rank() != 0:
        for _ in VARIANTS:
            follow(sharded, group)
        return None
    c = full.config
    draft = Transformer(
        ModelConfig(
            vocab_size=c.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).eval()
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
    return results


def check_variant(results: dict, variant: str) -> None:
    """The TP engine's tokens (and prompt logprobs) are one process's; the variant did what it names."""
    r = results[variant]
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
