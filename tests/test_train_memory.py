"""Memory estimates against measured peak memory, auto-fit, and the estimate command.

Measuring on CPU: torch has no CPU allocator statistics, so a fresh subprocess measures its peak
resident set size (VmHWM in /proc/self/status, reset through /proc/self/clear_refs after a warm-up
step on a tiny model: the first backward loads kernels and thread pools, memory that is not the
model's; not ru_maxrss, which Linux carries over from the parent across fork+exec). glibc's mmap
threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed tensors go back to the OS instead of being
kept on the heap, which would overstate the peak. On CUDA, torch.cuda.max_memory_allocated is the
direct measure and is used instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmforge.model import ModelConfig
from lmforge.train import TrainConfig
from lmforge.train.memory import auto_fit, estimate

PROBE = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from lmforge.model import ModelConfig, Transformer
    from lmforge.train import OptimConfig, build_optimizer, clm_batch
    from lmforge.train.loop import forward_loss
    mode, B, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def steps(model, batch, n):
        opt = build_optimizer(model, OptimConfig(fused=True))
        for _ in range(n):
            loss, _, count = forward_loss(model, batch, 0.0)  # the training path: fused head + loss
            (loss / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss

    steps(Transformer(ModelConfig.preset("tiny")), clm_batch(torch.randint(0, 512, (2, 17))), 1)  # warm-up
    cfg = ModelConfig.preset("small")
    batch = clm_batch(torch.randint(0, cfg.vocab_size, (B, T + 1)))
    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
    base = psutil.Process().memory_info().rss
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    model = Transformer(cfg)
    if mode == "lora":
        from lmforge import peft
        peft.apply(model, peft.LoraConfig(r=8))
    steps(model, batch, 2)
    print(json.dumps({"peak": hwm() - base}))
""")


@pytest.mark.parametrize("mode,batch", [("full", 8), ("lora", 8)])
def test_estimate_within_25_percent_of_measured(mode, batch):
    pytest.importorskip("psutil")
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak memory")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(batch), "128"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    est = estimate(ModelConfig.preset("small"), mode, batch, 128).total
    assert abs(est - measured) / measured < 0.25, (mode, est / 2**20, measured / 2**20)


def test_estimate_components():
    c = ModelConfig.preset("small")
    full, lora, qlora = (estimate(c, m, 2, 128) for m in ("full", "lora", "qlora"))
    n = c.num_parameters()
    assert full.weights == 4 * n and full.gradients == 4 * n and full.optimizer == 8 * n
    assert lora.gradients < full.gradients / 50 and lora.activations == full.activations
    assert qlora.weights < lora.weights / 2
    inf = estimate(c, "inference", 2, 128)
    # K and V for every layer, batch and position: 2 * L * B * T * Hkv * hd * 4 bytes
    assert inf.kv_cache == 2 * c.num_hidden_layers * 2 * 128 * c.num_key_value_heads * c.head_dim * 4
    assert estimate(c, "full", 2, 128, checkpointing=True).activations < full.activations


def test_auto_fit_keeps_the_global_batch():
    c = ModelConfig.preset("small")
    cfg = TrainConfig(micro_batch_size=32, grad_accum=1, seq_len=256)
    cpu = torch.device("cpu")
    need8 = estimate(c, "full", 8, 256).total
    out = auto_fit(c, cfg, cpu, budget=need8 / 0.85 * 1.01)
    assert (out.micro_batch_size, out.grad_accum, out.activation_checkpointing) == (8, 4, False)
    tiny_budget = estimate(c, "full", 1, 256, checkpointing=True).total / 0.85 * 1.01
    out = auto_fit(c, cfg, cpu, budget=tiny_budget)
    assert out.activation_checkpointing and out.micro_batch_size * out.grad_accum == 32
    from lmforge.common import LmforgeError

    with pytest.raises(LmforgeError, match="auto-fit"):
        auto_fit(c, cfg, cpu, budget=1e6)


def test_estimate_cli(capsys):
    from lmforge.cli import main

    assert main(["estimate", "--model", "small", "--batch", "2", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    for word in ("inference", "full", "lora", "qlora", "weights", "kv cache"):
        assert word in out
    assert main(["estimate", "--model", "nope"]) == 2
