"""Serving throughput and latency: `lmforge serve` (a real subprocess on 127.0.0.1) under 1, 4 and
16 concurrent streaming clients: requests/s, generated tokens/s, p50/p99 time to first token and
inter-token latency, the server's CPU time per generated token; the same prompts run one by one
through transformers `generate` (in this process) as the baseline. Random GPT-2-shaped weights
saved by transformers, a BPE tokenizer trained here, greedy decoding, every request runs to
max_tokens. Medians of --repeats runs, the client counts taking turns within each repeat; the
16-to-1-client ratio is the median of the repeats' own ratios (other work on the machine moves the
rates between repeats, much less within one).

    python bench/serve.py                      # a few minutes on 2 CPU cores
    python bench/serve.py --layers 12 --hidden 768 --vocab 8192   # GPT-2-small-sized body (slow on CPU)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import torch


def build_checkpoint(args, folder: Path):
    """A transformers GPT-2 with random weights + a BPE tokenizer trained on some stdlib files, saved
    as one HF folder."""
    import transformers as tf

    from lmforge.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [f.read_text(errors="replace") for f in sorted(stdlib.glob("*.py"))[:60]]
    tok = train_tokenizer(corpus, vocab_size=args.vocab)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(
        vocab_size=tok.vocab_size,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.hidden // 64,
        n_positions=1024,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
    )
    hf = tf.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # special tokens never win greedy decoding: every request runs to max_tokens
        for name in ("<|endoftext|>", "<|im_end|>", "<|pad|>"):
            hf.transformer.wte.weight[tok.token_to_id(name)] = 0
    hf.save_pretrained(folder)
    tok.save(folder)
    return hf


def prompts_for(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(5, vocab, (int(torch.randint(16, 49, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], new: int) -> dict:
    # logprobs=0: a chunk for every token, even one whose bytes do not complete a character yet
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "stream": True,
        "logprobs": 0,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                stamps.append(time.perf_counter())
            elif chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return dict(ttft=stamps[0] - start, itl=[b - a for a, b in zip(stamps, stamps[1:])], tokens=tokens)


async def load(url: str, prompts: list[list[int]], new: int, concurrency: int) -> dict:
    queue = list(prompts)
    results = []

    async def worker(client):
        while queue:
            results.append(await one_request(client, url, queue.pop(), new))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    return dict(
        req_s=len(results) / wall,
        tok_s=sum(r["tokens"] for r in results) / wall,
        ttft50=pct(ttft, 0.5),
        ttft99=pct(ttft, 0.99),
        itl50=pct(itl, 0.5),
        itl99=pct(itl, 0.99),
    )


@torch.inference_mode()
def transformers_sequential(hf, prompts: list[list[int]], new: int) -> dict:
    ttft, start = [], time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        hf.generate(input_ids=torch.tensor([p]), max_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft.append(time.perf_counter() - t)
        hf.generate(
            input_ids=torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
    wall = time.perf_counter() - start - sum(ttft)
    return dict(
        req_s=len(prompts) / wall,
        tok_s=len(prompts) * new / wall,
        ttft50=pct(ttft, 0.5),
        ttft99=pct(ttft, 0.99),
        itl50=float("nan"),
        itl99=float("nan"),
        cpu_tok=float("nan"),
    )


def start_server(folder: Path, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "serve",
        "--model",
        str(folder),
        "--served-model-name",
        "bench",
        "--port",
        str(port),
        "--max-seqs",
        str(max(args.concurrency)),
        "--max-queue",
        "256",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its live child processes (the
    engine process), from /proc; nan where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [
            int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()
        ]
    except OSError:
        return float("nan")
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(c) for c in children)


def measured(proc: subprocess.Popen, url: str, prompts: list[list[int]], new: int, concurrency: int) -> dict:
    """One load run plus the server's CPU time (all threads) per generated token: a figure that
    a machine loaded by other work disturbs much less than the wall-clock rates."""
    before = cpu_seconds(proc.pid)
    r = asyncio.run(load(url, prompts, new, concurrency))
    r["cpu_tok"] = (cpu_seconds(proc.pid) - before) / (len(prompts) * new)
    return r


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer (and model) vocabulary size")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=32, help="requests per run at each concurrency")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads for the server and for transformers (default: all cores but one, which the clients use)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, model GPT-2 {args.layers}x{args.hidden} "
        f"vocab {args.vocab}, {args.requests} requests x {args.new_tokens} new tokens, greedy"
    )
    with tempfile.TemporaryDirectory() as d:
        hf = build_checkpoint(args, Path(d))
        prompts = prompts_for(args.requests, hf.config.vocab_size)
        rows = {}
        proc, url = start_server(Path(d), args)
        try:
            asyncio.run(load(url, prompts[:4], 8, 4))  # warm-up
            runs = {c: [] for c in args.concurrency}
            for _ in range(args.repeats):  # the levels interleaved: a change in the machine's load hits all
                for c in args.concurrency:
                    runs[c].append(measured(proc, url, prompts, args.new_tokens, c))
            for c in args.concurrency:
                rows[f"lmforge serve, {c} clients"] = median_of(runs[c])
        finally:
            proc.terminate()
            proc.wait(60)
        seq = prompts[: max(4, args.requests // 4)]  # transformers is the slow side: a quarter of the prompts
        rows["transformers generate, sequential"] = median_of(
            [transformers_sequential(hf, seq, args.new_tokens) for _ in range(args.repeats)]
        )
    print(
        f"\n{'':36} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
        f"{'srv CPU/tok':>11}"
    )
    for name, r in rows.items():
        print(
            f"{name:36} {r['req_s']:7.2f} {r['tok_s']:8.1f} {r['ttft50'] * 1e3:7.1f}ms {r['ttft99'] * 1e3:7.1f}ms "
            f"{r['itl50'] * 1e3:6.1f}ms {r['itl99'] * 1e3:6.1f}ms {r['cpu_tok'] * 1e3:9.3f}ms"
        )
    one, many = (
        rows[f"lmforge serve, {args.concurrency[0]} clients"],
        rows[f"lmforge serve, {args.concurrency[-1]} clients"],
    )
    base = rows["transformers generate, sequential"]
    lo, hi = args.concurrency[0], args.concurrency[-1]
    ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(runs[lo], runs[hi])]
    print(
        f"\naggregate tok/s, {hi} clients / {lo} client: {statistics.median(ratios):.2f}x, the median of each "
        f"repeat's ratio ({', '.join(f'{r:.2f}' for r in ratios)}; target >= 4x)"
    )
    print(
        f"lmforge serve {args.concurrency[-1]} clients / transformers sequential: {many['tok_s'] / base['tok_s']:.2f}x"
    )
    print(f"lmforge serve 1 client / transformers sequential: {one['tok_s'] / base['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
