"""Training throughput: lmforge vs a plain `transformers` model with a hand-written AdamW loop.

Same config (GPT-2 small and a Llama ~110M shape), batch 4 x 256 random tokens, CPU fp32, AdamW,
same number of steps. Each (framework, shape) runs in its own subprocess, alternating frameworks
over several rounds, so a peak-RSS measure is per framework and machine noise hits both alike.
Prints median tokens/s, the ratio lmforge / transformers, peak memory (RSS above the process's
baseline), and model FLOPs utilisation against a measured fp32 matmul peak.

    python bench/train.py                    # both shapes, 2 rounds x 3 steps (a few minutes)
    python bench/train.py --shapes gpt2 --rounds 3 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"gpt2": "gpt2", "llama": "llama-100m"}


def model_flops_per_token(config, seq_len: int) -> float:
    """6 x matmul parameters (the tied head included) + attention scores/values (12 L h T, PaLM)."""
    n = config.num_parameters(include_embeddings=False) + config.vocab_size * config.hidden_size
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build(framework: str, preset: str):
    import torch

    from lmforge.model import ModelConfig

    config = ModelConfig.preset(preset, max_position_embeddings=1024)
    torch.manual_seed(0)
    if framework == "lmforge":
        from lmforge.model import Transformer

        return config, Transformer(config)
    import transformers as tf

    from lmforge.model.hf_keys import config_to_hf

    hf = config_to_hf(config)
    hf.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, attention_dropout=0.0)  # lmforge has no dropout
    hf_config = tf.AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    hf_config._attn_implementation = "sdpa"
    return config, tf.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")


def worker(framework: str, preset: str, batch: int, seq_len: int, steps: int) -> dict:
    """One framework, one shape: warm-up step, then `steps` timed optimizer steps."""
    import psutil
    import torch

    base = psutil.Process().memory_info().rss
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    config, model = build(framework, preset)
    model.train()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g) for _ in range(steps + 1)]
    if framework == "lmforge":
        from lmforge.train import OptimConfig, SpikeGuard, build_optimizer, clm_batch, train_step

        opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.1))
        guard = SpikeGuard(factor=0)

        def step(x):
            return train_step(
                model,
                opt,
                [clm_batch(x)],
                device=torch.device("cpu"),
                dtype=torch.float32,
                clip_grad=1.0,
                world_size=1,
                guard=guard,
            ).loss
    else:
        # The hand-written loop: forward with labels (HF shifts and computes the loss), backward, clip, AdamW.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))

        def step(x):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

    step(data[0])  # warm-up: kernels, optimizer state
    times = [_timed(lambda: step(x)) for x in data[1:]]
    with open("/proc/self/status") as f:  # not ru_maxrss: Linux carries the parent's over fork+exec
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")) - base
    return {"step_s": times, "peak_bytes": peak, "flops_per_token": model_flops_per_token(config, seq_len)}


def run_worker(framework: str, preset: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the OS: honest RSS peaks
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        framework,
        "--shapes",
        preset,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{framework} {preset} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="gpt2,llama")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shapes, args.batch, args.seq_len, args.steps)))
        return
    import torch

    peak = statistics.median(matmul_peak() for _ in range(3))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; batch {args.batch} x {args.seq_len}, {args.rounds} rounds x {args.steps} steps"
    )
    tokens = args.batch * args.seq_len
    header = f"{'shape':<10} {'framework':<13} {'tokens/s':>9} {'MFU':>6} {'peak MiB':>9}"
    rows, ratios = [], {}
    for shape in args.shapes.split(","):
        preset = SHAPES.get(shape, shape)
        results = {"lmforge": [], "transformers": []}
        for _ in range(args.rounds):
            for fw in ("transformers", "lmforge"):
                results[fw].append(run_worker(fw, preset, args))
        stats = {}
        for fw, reps in results.items():
            tps = tokens / statistics.median(t for r in reps for t in r["step_s"])
            mfu = tps * reps[0]["flops_per_token"] / peak
            mem = max(r["peak_bytes"] for r in reps) / 2**20
            stats[fw] = (tps, mem)
            rows.append(f"{shape:<10} {fw:<13} {tps:>9.1f} {mfu:>6.1%} {mem:>9.0f}")
        ratios[shape] = (stats["lmforge"][0] / stats["transformers"][0], stats["lmforge"][1] / stats["transformers"][1])
        print("\n".join([header] + rows[-2:]), flush=True)
    for shape, (speed, mem) in ratios.items():
        print(f"{shape}: lmforge / transformers tokens/s = {speed:.2f}x (target >= 1.1x), peak memory ratio {mem:.2f}")


if __name__ == "__main__":
    main()
