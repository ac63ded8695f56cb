"""The pipeline's generate stage: samples of every model in the format it was trained for, batch-1
decode speed (plain, prompt lookup, speculative with the distilled draft, quantized), and the
quantization speed-up measured at a size where decoding is memory-bound.

Speeds are medians of interleaved repeats (each repeat times every decoding method once, prompt by
prompt), so a noisy machine slows all methods alike instead of whichever happened to run during the
noise.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

FINAL = "final (sft, merged)"
SPECULATIVE = "speculative (draft model)"


def measure_generation(
    gcfg: dict, models: dict[str, Path], heldout: dict | None = None, data: Path | None = None
) -> dict:
    """Samples, decode tokens/s for every model, speculative decoding on the final model, and the
    quantization speed-up at scale (`generate.quant_at_scale`). `heldout`: BuiltinConfig fields of
    the run's document split (fine-tuned models are asked about held-out functions). `data`: the
    run's token shards, whose frequencies pick the draft's vocabulary (`generate.draft_vocab`)."""
    import torch

    from lmforge.checkpoint import load_model, load_tokenizer_if_any
    from lmforge.infer.prepare import prepare_for_inference
    from lmforge.infer.speculative import DraftProposer, LookupProposer, frequent_tokens

    prompts = gcfg.get("prompts") or ["def main():"]
    new = int(gcfg.get("max_new_tokens", 64))
    k = int(gcfg.get("speculative_k", 4))
    repeats = int(gcfg.get("repeats", 3))
    out: dict = {
        "max_new_tokens": new,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "rows": [],
        "samples": {},
        "sample_format": {},
    }
    tok = load_tokenizer_if_any(next(iter(models.values()))) if models else None
    if tok is None:
        return out
    loaded = {label: load_model(path) for label, path in models.items()}
    if "draft" in loaded and gcfg.get("draft_quant"):  # a cheaper proposer; the target still verifies every token
        from lmforge.quant import swap

        swap(loaded["draft"], str(gcfg["draft_quant"]), skip=("embed",))
        out["draft_quant"] = str(gcfg["draft_quant"])
    loaded = {label: prepare_for_inference(model) for label, model in loaded.items()}
    encoded = [tok.encode(p) for p in prompts]
    methods: dict[tuple[str, str], tuple] = {}
    for label, model in loaded.items():
        if label != "draft":
            methods[(label, "plain greedy")] = (model, None)
    if FINAL in loaded:
        methods[(FINAL, "prompt lookup")] = (loaded[FINAL], LookupProposer())
        if "draft" in loaded:
            # Drafting stops where the draft is unsure (k is then a bound): a weak guess costs less.
            length = max(map(len, encoded)) + new + k + 2
            confidence = float(gcfg.get("draft_min_confidence", 0.0))
            n_vocab, vocab_size = int(gcfg.get("draft_vocab") or 0), loaded["draft"].config.vocab_size
            vocab = None
            if 0 < n_vocab < vocab_size and data is not None:
                counts = token_counts(data, vocab_size)
                vocab = frequent_tokens(counts, n_vocab)
                out["draft_vocab"] = {
                    "tokens": n_vocab,
                    "of": vocab_size,
                    "coverage": round(float(counts[vocab].sum() / max(1, counts.sum())), 4),
                }
            methods[(FINAL, SPECULATIVE)] = (
                loaded[FINAL],
                DraftProposer(loaded["draft"], length, confidence, vocab=vocab),
            )
            if vocab is not None:  # the whole head beside it: what the smaller head gains
                methods[(FINAL, SPECULATIVE + ", whole vocabulary")] = (
                    loaded[FINAL],
                    DraftProposer(loaded["draft"], length, confidence),
                )
    threads = torch.get_num_threads()
    if FINAL in loaded:  # batch-1 decoding of a small model may run faster on fewer threads: use the faster
        torch.set_num_threads(decode_threads(loaded[FINAL], encoded[0]))
    try:
        results = _timed(methods, encoded, new, k, repeats)
        out["threads"] = torch.get_num_threads()
        if (FINAL, SPECULATIVE) in methods:  # what a verification costs: why the draft gains what it does
            out["verify_cost"] = {"rows": k + 1, "steps": round(verify_cost(loaded[FINAL], encoded[0], k), 2)}
    finally:
        torch.set_num_threads(threads)
    for (label, decoding), r in results.items():
        row = {"model": label, "decoding": decoding, "tokens_per_s": r["tokens_per_s"]}
        if decoding != "plain greedy":
            row["acceptance_rate"] = r["acceptance_rate"]
            row["identical_to_plain"] = r["tokens"] == results[(label, "plain greedy")]["tokens"]
            row["speedup"] = round(r["tokens_per_s"] / results[(label, "plain greedy")]["tokens_per_s"], 2)
        out["rows"].append(row)
    chat_prompts = gcfg.get("chat_prompts") or _heldout_signatures(int(gcfg.get("num_chat_samples", 3)), heldout or {})
    for label, model in loaded.items():
        if label.startswith("final"):  # fine-tuned in the chat format: asked in it
            out["samples"][label] = _chat_samples(model, tok, chat_prompts, new)
            out["sample_format"][label] = "chat"
        else:
            out["samples"][label] = [
                p + tok.decode(results[(label, "plain greedy")]["tokens"][i])
                if (label, "plain greedy") in results
                else p
                for i, p in enumerate(prompts)
            ]
            out["sample_format"][label] = "completion"
    if "draft" in loaded:  # the draft's own completions, plain decoding
        out["samples"]["draft"] = [
            p + tok.decode(_plain(loaded["draft"], ids, new)) for p, ids in zip(prompts, encoded)
        ]
        out["sample_format"]["draft"] = "completion"
    scale = gcfg.get("quant_at_scale")
    if scale:
        out["quant_at_scale"] = quant_speed_at_scale(scale, k if "verify_cost" in out else 0)
    return out


def verify_cost(model, ids: list[int], k: int, repeats: int = 15) -> float:
    """How many batch-1 decode steps of `model` one speculative verification of k drafts (a forward of
    k + 1 rows) costs: medians of interleaved timings of both forwards at the same cache position."""
    import torch

    from lmforge.model import KVCache

    cache = KVCache.for_model(model, 1, len(ids) + k + 2)
    one, rows = torch.tensor([ids[-1:]]), torch.tensor([ids[-1:] * (k + 1)])
    seconds: dict[int, list[float]] = {1: [], k + 1: []}
    with torch.inference_mode():
        model(torch.tensor([ids]), kv_cache=cache, logits_to_keep=1)
        for _ in range(repeats):
            for x in (one, rows):
                start = time.perf_counter()
                model(x, kv_cache=cache, start_pos=len(ids) - 1)
                seconds[x.shape[1]].append(time.perf_counter() - start)
    return statistics.median(seconds[k + 1]) / statistics.median(seconds[1])


def token_counts(data: Path, vocab_size: int):
    """How often each token id occurs in a shard folder's training split (np.int64 [vocab_size])."""
    import numpy as np

    from lmforge.data.shards import read_index

    index, folder = read_index(data)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in index["splits"].get("train", {}).get("shards", []):
        tokens = np.memmap(folder / shard["file"], dtype=np.dtype(index["dtype"]), mode="r")
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return counts


def _plain(model, ids: list[int], new: int) -> list[int]:
    from lmforge.infer.generate import generate

    return generate(model, ids, max_new_tokens=new)[0].tolist()


def decode_threads(model, ids: list[int], new: int = 16, repeats: int = 3) -> int:
    """The thread count (1 or all) at which plain batch-1 greedy decoding of `model` is faster (medians
    of interleaved runs). Every decoding method is then timed at it: for a model of a few million
    parameters a matrix-vector product is microseconds of work and a second thread mostly adds
    synchronisation, while at 100M+ parameters more threads win."""
    import torch

    most = torch.get_num_threads()
    if most == 1:
        return 1

    def at(n: int):
        torch.set_num_threads(n)
        _plain(model, ids, new)

    rates = _interleaved_rates({n: lambda n=n: at(n) for n in (1, most)}, new, repeats)
    torch.set_num_threads(most)
    return max(rates, key=lambda n: statistics.median(rates[n]))


def _interleaved_rates(runs: dict, tokens: int, repeats: int) -> dict:
    """{key: [tokens/s of each repeat]}: every run once per repeat, in turn, so machine noise slows all
    of them alike."""
    rates: dict = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            rates[key].append(tokens / (time.perf_counter() - start))
    return rates


def _timed(methods: dict, encoded: list[list[int]], new: int, k: int, repeats: int) -> dict:
    """{method: tokens_per_s (median over repeats of the total over prompts), tokens, acceptance}."""
    from lmforge.infer.sampling import SamplingParams
    from lmforge.infer.speculative import speculative_generate

    params = SamplingParams(max_new_tokens=new, stop_token_ids=[])
    rates = {m: [] for m in methods}
    tokens: dict = {}
    acceptance: dict = {}
    for model, _ in methods.values():  # warm-up: kernel pre-packing, allocator
        _plain(model, encoded[0], 4)
    for _ in range(repeats):
        # Interleaved prompt by prompt (every method decodes a prompt before the next prompt), so a
        # burst of load on a shared machine slows every method alike.
        seconds = {m: 0.0 for m in methods}
        rows: dict = {m: [] for m in methods}
        counted = {m: [0, 0] for m in methods}  # accepted, proposed
        for ids in encoded:
            for m, (model, proposer) in methods.items():
                start = time.perf_counter()
                if proposer is None:
                    rows[m].append(_plain(model, ids, new))
                else:
                    row, stats = speculative_generate(model, ids, params, proposer, k=k)
                    rows[m].append(row)
                    counted[m][0] += stats.accepted
                    counted[m][1] += stats.proposed
                seconds[m] += time.perf_counter() - start
        for m in methods:
            rates[m].append(sum(map(len, rows[m])) / seconds[m])
            tokens[m], acceptance[m] = rows[m], round(counted[m][0] / max(1, counted[m][1]), 3)
    return {
        m: {
            "tokens_per_s": round(statistics.median(rates[m]), 1),
            "tokens": tokens[m],
            "acceptance_rate": acceptance[m],
        }
        for m in methods
    }


def _heldout_signatures(n: int, heldout: dict) -> list[str]:
    """Signatures of functions from modules no model trained on (the eval split's)."""
    from lmforge.eval.builtin import BuiltinConfig, functions

    fns = functions(BuiltinConfig(**heldout))
    step = max(1, len(fns) // max(1, n))
    return [f["signature"] for f in fns[::step][:n]]


def _chat_samples(model, tok, user_turns: list[str], new: int) -> list[str]:
    from lmforge.infer.generate import generate
    from lmforge.tokenizer.text import end_of_turn_ids

    out, ends = [], end_of_turn_ids(tok)
    for turn in user_turns:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": turn}], add_generation_prompt=True))
        reply = [t for t in generate(model, ids, max_new_tokens=new, stop_token_ids=ends)[0].tolist() if t not in ends]
        out.append(f"user: {turn}\nassistant: {tok.decode(reply)}")
    return out


def quant_speed_at_scale(scfg: dict, k: int = 0) -> dict:
    """Batch-1 decode tokens/s of a randomly initialised model of a memory-bound size (speed depends
    on shapes, not weight values), fp32 against RTN-quantized copies; medians of interleaved repeats.
    k > 0: also what verifying k drafts costs in fp32 there (`verify_cost`)."""
    import torch

    from lmforge.infer.prepare import prepare_for_inference
    from lmforge.model import build_model
    from lmforge.quant import QuantOptions, quantize_model

    torch.manual_seed(0)
    preset = scfg.get("preset", "llama-100m")
    base = build_model(preset, **(scfg.get("overrides") or {})).eval()
    variants = {"fp32": base}
    for scheme in scfg.get("schemes") or ["int8", "int4-g128"]:
        model = copy.deepcopy(base)
        quantize_model(model, QuantOptions(method="rtn", scheme=scheme), None, progress=False)
        variants[scheme] = model
    new, repeats = int(scfg.get("new_tokens", 32)), int(scfg.get("repeats", 3))
    prompt = list(range(1, 17))
    for m in variants.values():
        prepare_for_inference(m)
        _plain(m, prompt, 4)
    rates = _interleaved_rates({name: lambda m=m: _plain(m, prompt, new) for name, m in variants.items()}, new, repeats)
    params = sum(p.numel() for p in base.parameters())
    fp32 = statistics.median(rates["fp32"])
    return {
        **({"verify_cost": {"rows": k + 1, "steps": round(verify_cost(base, prompt, k, 5), 2)}} if k else {}),
        "preset": preset,
        "parameters": params,
        "new_tokens": new,
        "threads": torch.get_num_threads(),
        "rows": [
            {
                "scheme": name,
                "tokens_per_s": round(statistics.median(r), 1),
                "speedup": round(statistics.median(r) / fp32, 2),
            }
            for name, r in rates.items()
        ],
    }
