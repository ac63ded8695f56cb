"""Throughput of one process vs TP 2 vs PP 2 vs DDP 2, for training and for greedy decoding, with the
bytes each rank sends per training step (lmforge.train.parallel_memory, the ring-collective
arithmetic that tests/test_parallel_estimate.py checks against the sharded modules).

Training: `lmforge pretrain` on the built-in corpus, the same global batch everywhere (one process
and PP accumulate `--micro-batches` micro-batches; DDP splits them over its ranks; TP runs the whole
batch on both ranks' shards), tokens/s from the run's own summary. Decoding: `lmforge generate
--prompt-ids` with `--max-new-tokens`; DDP 2 is two independent replicas (twice the requests), PP
decoding is not implemented (training only). Each row runs under torchrun (gloo on CPU, nccl on GPU).

    python bench/parallel.py                                    # CPU: a tiny model, a few minutes
    python bench/parallel.py --device cuda --hidden 2048 --layers 16 --heads 16 --seq-len 1024 \\
        --micro-batch 8 --steps 30 --new-tokens 256               # 2 GPUs: nccl, same table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "lmforge", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc


def model_flags(a) -> list[str]:
    sets = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads)
    sets.update(num_key_value_heads=a.heads // 2, intermediate_size=a.hidden * 2, tie_word_embeddings="false")
    return [x for k, v in sets.items() for x in ("--set", f"model.{k}={v}")]


def train_row(name: str, nproc: int, extra: list[str], a, data: str, out: Path, env: dict) -> dict:
    args = ["pretrain", "--runs-dir", str(out), "--name", name, "--data", data, "--device", a.device]
    args += ["--seq-len", str(a.seq_len), "--batch-size", str(a.micro_batch), "--steps", str(a.steps)]
    args += ["--set", "train.eval_every=0", "--set", "train.save_every=0", *model_flags(a), *extra]
    torchrun(nproc, args, env)
    summary = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()][-1]["summary"]
    return {"tokens_per_s": summary["tokens_per_s"]}


def decode_rates(nproc: int, extra: list[str], model: Path, a, env: dict) -> list[float]:
    """Generated tokens/s of each process, as `generate` times its own decoding (start-up, loading and
    the torchrun launch excluded): `[~N tokens in Xs]` on stderr."""
    args = ["generate", "--model", str(model), "--prompt", "def main(", "--device", a.device]
    proc = torchrun(nproc, [*args, "--max-new-tokens", str(a.new_tokens), *extra], env)
    found = re.findall(r"\[~(\d+) tokens in ([\d.]+)s\]", proc.stderr)
    if not found:
        raise SystemExit(f"generate printed no timing:\n{proc.stderr[-2000:]}")
    return [int(n) / max(float(t), 1e-9) for n, t in found]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=4, help="per step: accumulation / pipeline depth")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="rounds of every row, interleaved; medians reported")
    a = p.parse_args()

    from lmforge.model import ModelConfig
    from lmforge.train.parallel_memory import parallel_estimate
    from lmforge.train.stdlib_data import builtin_pretrain_data

    env = {**os.environ, "LMFORGE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # every rank one thread: the rows compare the same compute
    out = Path(tempfile.mkdtemp(prefix="lmforge-bench-parallel-"))
    data = str(builtin_pretrain_data(out / "corpus", max_bytes=300_000, vocab_size=512))
    m = a.micro_batches
    rows = {  # name: (run folder, processes, training flags, layout for the estimate)
        "1 process": ("single", 1, ["--grad-accum", str(m)], {}),
        "TP 2": ("tp2", 2, ["--grad-accum", str(m), "--tp", "2"], {"tp": 2}),
        "PP 2 (1F1B)": ("pp2", 2, ["--grad-accum", str(m), "--pp", "2"], {"pp": 2}),
        "DDP 2": ("ddp2", 2, ["--grad-accum", str(m // 2), "--strategy", "ddp"], {"dp": 2}),
    }
    config = ModelConfig(
        vocab_size=512,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads // 2,
        intermediate_size=a.hidden * 2,
    )
    # Each round runs every row once, so a change in the machine's load hits every row alike (the
    # machine may be shared); each figure is the median of its rounds.
    runs: dict[str, dict[str, list[float]]] = {name: {"tokens_per_s": []} for name in rows}
    for r in range(a.repeats):
        for name, (run, nproc, extra, _) in rows.items():
            runs[name]["tokens_per_s"].append(train_row(f"{run}-{r}", nproc, extra, a, data, out, env)["tokens_per_s"])
        model = out / "single-0" / "final"
        decodes = {
            "1 process": decode_rates(1, [], model, a, env)[0],
            "TP 2": decode_rates(2, ["--tp", "2"], model, a, env)[0],  # both ranks print the same
            "DDP 2": sum(decode_rates(2, [], model, a, env)),  # two replicas at once
        }
        for name, rate in decodes.items():
            runs[name].setdefault("decode", []).append(rate)
    results = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in runs.items()}
    for name, (_, _, _, layout) in rows.items():
        est = parallel_estimate(config, a.micro_batch, a.seq_len, micro_batches=m // layout.get("dp", 1), **layout)
        results[name]["sent_per_step"] = sum(est.comm.values())

    print(f"\n{a.device}, hidden {a.hidden} x {a.layers} layers, batch {a.micro_batch} x {m} x {a.seq_len} tokens")
    print(f"medians of {a.repeats} interleaved round(s); load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'layout':<12} {'train tok/s':>12} {'vs 1':>6} {'decode tok/s':>13} {'sent/step/rank':>15}")
    base = results["1 process"]["tokens_per_s"]
    for name, r in results.items():
        dec = f"{r['decode']:.1f}" if "decode" in r else "n/a"
        sent = f"{r['sent_per_step'] / 2**20:.1f} MiB"
        print(f"{name:<12} {r['tokens_per_s']:>12,.0f} {r['tokens_per_s'] / base:>5.2f}x {dec:>13} {sent:>15}")


if __name__ == "__main__":
    main()
