"""Structured output: per-token cost of grammar-constrained decoding (a JSON Schema, llguidance masks)
vs unconstrained decoding in lmforge's continuous-batching engine, at 1 and 16 concurrent requests.
Same random weights and prompts on both sides, sampling at temperature 1.0 with per-request seeds
(the schema's free-text field has a minLength, so every constrained row runs to --new tokens as the
free ones do and the batch stays full); the paths take turns within each repeat; medians of
--repeats runs. The slowdown is measured in this process's CPU time (one thread), which other
programs on a shared machine move far less than wall time.

    python bench/structured.py                 # ~1-2 minutes on 2 idle CPU cores
    python bench/structured.py --vocab 32000   # a larger vocabulary (bigger masks)
    python bench/structured.py --libraries     # llguidance vs xgrammar mask cost (needs `pip install xgrammar`)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "kind": {"enum": ["note", "task", "event"]},
        "text": {"type": "string", "minLength": 1000},  # every row runs to --new tokens: the batch stays full
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
    },
    "required": ["id", "kind", "text", "tags"],
    "additionalProperties": False,
}
# A document to walk token by token for the library comparison (nested, enums, bounds, a pattern).
LIB_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "score"],
    "additionalProperties": False,
}
LIB_DOC = {
    "name": "Ada Lovelace of the analytical engine, " * 4 + "def f(x): return x + 1 # comment",
    "age": 36,
    "tags": ["a", "ccc", "bb", "a"],
    "address": {"city": "London town", "zip": "12345"},
    "score": 3.14159,
}


def stdlib_tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on Python's standard library (no download)."""
    from lmforge.tokenizer import train_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:3000]
    return train_tokenizer((f.read_text(errors="ignore") for f in files), vocab)


def run_engine(model, tok, prompts, new: int, grammar) -> tuple[float, int]:
    """(wall seconds, this process's CPU seconds, generated tokens) of the prompts through one engine."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    engine = Engine(model, tok, max_seqs=32, num_blocks=len(prompts) * 8 + 16, prefix_caching=False)
    params = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=i, grammar=grammar) for i in range(len(prompts))]
    start, cpu = time.perf_counter(), time.process_time()
    out = engine.generate_batch(prompts, params)
    return time.perf_counter() - start, time.process_time() - cpu, sum(len(o) for o in out)


def bench_engine(args) -> None:
    from lmforge.infer.grammar import GrammarSpec, compile_grammar
    from lmforge.model import ModelConfig, Transformer

    tok = stdlib_tokenizer(args.vocab)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(
        "tiny",
        vocab_size=tok.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=1024,
    )
    model = Transformer(cfg).eval()
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    compile_grammar(spec, tok, tok.vocab_size)  # compiled once, as a server would have it cached
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tok.vocab_size, (24,), generator=g).tolist() for _ in range(16)]
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, vocab {tok.vocab_size} (BPE on the stdlib); "
        f"{args.new} new tokens/request, temperature 1.0; {torch.get_num_threads()} thread(s)"
    )
    paths = {}
    for c in (1, 16):
        for name, grammar in (("unconstrained", None), ("JSON Schema", spec)):
            paths[(c, name)] = lambda c=c, grammar=grammar: run_engine(model, tok, prompts[:c], args.new, grammar)
    runs: dict = {key: [] for key in paths}  # per repeat: (wall, CPU) seconds per generated token
    lengths: dict = {}
    for _ in range(args.repeats):  # turns within each repeat: a drift in the machine's speed hits all
        for key, fn in paths.items():
            wall, cpu, tokens = fn()
            runs[key].append((wall / tokens, cpu / tokens))
            lengths[key] = tokens / key[0]
    print(
        f"\n{'concurrent':>10}  {'path':<14} {'wall ms/tok':>11} {'CPU ms/tok':>10} {'tok/request':>11} {'vs free (CPU)':>13}"
    )
    for c in (1, 16):
        # The slowdown compares this process's CPU time (1 thread: its compute, which other programs on a
        # shared machine barely move, unlike wall time), as the median of each repeat's own ratio.
        ratios = [b[1] / a[1] for a, b in zip(runs[(c, "unconstrained")], runs[(c, "JSON Schema")])]
        for name in ("unconstrained", "JSON Schema"):
            wall, cpu = (statistics.median(x[i] for x in runs[(c, name)]) for i in (0, 1))
            slower = f"{(statistics.median(ratios) - 1) * 100:+.1f}%" if name == "JSON Schema" else ""
            print(f"{c:>10}  {name:<14} {wall * 1e3:11.3f} {cpu * 1e3:10.3f} {lengths[(c, name)]:11.1f} {slower:>13}")
        print(f"{'':>10}  per-repeat CPU slowdowns: {' '.join(f'{(r - 1) * 100:+.1f}%' for r in ratios)}")


def bench_libraries(args) -> None:
    """Per-token mask + advance cost of llguidance and xgrammar over one JSON document."""
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar is not installed (pip install xgrammar): only llguidance is measured")
        xgr = None
    import llguidance
    from llguidance.torch import allocate_token_bitmask

    torch.set_num_threads(1)
    for vocab in (1000, 32000):
        tok = stdlib_tokenizer(vocab)
        ids = tok.encode(json.dumps(LIB_DOC))
        V, schema = tok.vocab_size, json.dumps(LIB_SCHEMA)
        libs = {}
        t0 = time.perf_counter()
        lt = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=V, eos_token=tok.eos_id)
        t1 = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        t2 = time.perf_counter()
        mask = allocate_token_bitmask(1, V)
        libs["llguidance"] = (
            t1 - t0,
            t2 - t1,
            m.reset,
            lambda: m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4),
            m.consume_token,
        )
        if xgr is not None:
            from transformers import PreTrainedTokenizerFast

            t0 = time.perf_counter()
            info = xgr.TokenizerInfo.from_huggingface(
                PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|endoftext|>"), vocab_size=V
            )
            compiler = xgr.GrammarCompiler(info, max_threads=1)
            t1 = time.perf_counter()
            xm = xgr.GrammarMatcher(compiler.compile_json_schema(schema))
            t2 = time.perf_counter()
            xmask = xgr.allocate_token_bitmask(1, V)
            libs["xgrammar"] = (t1 - t0, t2 - t1, xm.reset, lambda: xm.fill_next_token_bitmask(xmask), xm.accept_token)
        for name, (init, compile_s, reset, fill, advance) in libs.items():
            per = []
            for _ in range(5):
                reset()
                for x in ids:
                    a = time.perf_counter()
                    fill()
                    assert advance(x), (name, x)
                    per.append(time.perf_counter() - a)
            print(
                f"vocab {V:6d}  {name:<10} tokenizer {init * 1e3:7.1f} ms  compile {compile_s * 1e3:6.1f} ms  "
                f"mask+advance median {statistics.median(per) * 1e6:6.1f} us  mean {statistics.mean(per) * 1e6:6.1f} us  "
                f"({len(ids)} tokens)"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--new", type=int, default=48, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="2+ only on an idle machine")
    ap.add_argument("--libraries", action="store_true", help="compare llguidance and xgrammar instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_libraries(args) if args.libraries else bench_engine(args)


if __name__ == "__main__":
    main()
