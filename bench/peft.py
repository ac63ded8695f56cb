"""PEFT benchmark: full fine-tuning and every lmforge PEFT method side by side on the Llama ~110M
shape and the built-in SFT task (stdlib signature -> first docstring sentence), plus the same LoRA
step with Hugging Face `peft` on the transformers version of the same weights.

    python bench/peft.py                       # llama-100m, batch 4 x 256, 5 timed steps
    python bench/peft.py --preset tiny --steps 3 --batch 2 --seq 64   # a quick look

Each method runs in a fresh child process so peak memory is its own: CPU reports the peak RSS and
the growth of RSS during training (activations + gradients + optimizer state) on top of the loaded
model; CUDA reports torch.cuda.max_memory_allocated. Step time is the median of the timed steps
(one warm-up step first); the lmforge/peft LoRA ratio is the median over --repeats alternating
runs. The base model is randomly initialised (nothing is downloaded), so validation losses compare
how far each method moves in the same number of steps, not final quality.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# This file is named peft.py: drop its folder from the path so `import peft` finds Hugging Face's.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmforge import peft  # noqa: E402

# method -> (config factory, learning rate). Few-parameter methods take larger steps, as in their papers.
METHODS = {
    "full": (None, 1e-4),
    "lora": (lambda: peft.LoraConfig(r=8, alpha=16, target_modules=["q", "v"]), 1e-3),
    "dora": (lambda: peft.LoraConfig(r=8, alpha=16, target_modules=["q", "v"], use_dora=True), 1e-3),
    "adalora": (lambda: peft.AdaLoraConfig(init_r=12, target_r=8, target_modules=["q", "v"]), 1e-3),
    "qlora": (lambda: peft.LoraConfig(r=8, alpha=16, target_modules=["q", "v"]), 1e-3),
    "ia3": (lambda: peft.IA3Config(), 3e-2),
    "houlsby": (lambda: peft.AdapterConfig(kind="houlsby", bottleneck=64), 1e-3),
    "pfeiffer": (lambda: peft.AdapterConfig(kind="pfeiffer", bottleneck=64), 1e-3),
    "prompt": (lambda: peft.PromptTuningConfig(num_virtual_tokens=20), 3e-2),
    "ptuning": (lambda: peft.PTuningConfig(num_virtual_tokens=20), 1e-2),
    "prefix": (lambda: peft.PrefixConfig(num_virtual_tokens=20), 1e-2),
    "ptuning_v2": (lambda: peft.PrefixConfig(num_virtual_tokens=20, projection=False), 1e-2),
}


# ----------------------------------------------------------------------------- data (parent)


def build_data(out: Path, seq: int, vocab: int) -> None:
    """Tokenise the built-in SFT set, pack examples into rows of seq+1 tokens with labels only on
    responses (-100 elsewhere), and save train/val tensors."""
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.stdlib_data import builtin_sft_examples

    splits = builtin_sft_examples()
    tok = train_tokenizer((e["prompt"] + "\n" + e["response"] for e in splits["train"]), vocab_size=vocab)
    eos = tok.eos_id
    data = {}
    for split, examples in splits.items():
        ids, labels = [], []
        for e in examples:
            p, r = tok.encode(e["prompt"] + "\n"), tok.encode(e["response"]) + [eos]
            ids += p + r
            labels += [-100] * len(p) + r
        n = len(ids) // (seq + 1)
        data[split] = (
            torch.tensor(ids[: n * (seq + 1)]).view(n, seq + 1),
            torch.tensor(labels[: n * (seq + 1)]).view(n, seq + 1),
        )
    torch.save(data, out)


# ----------------------------------------------------------------------------- one run (child)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(method: str, model_dir: str, device: torch.device):
    """(model, forward fn ids -> logits, extra-loss fn, after-step fn, info)."""
    info = {}
    if method == "peft-lora":
        import peft as hf_peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        model = hf_peft.get_peft_model(hf, hf_peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        return model, (lambda ids: model(input_ids=ids).logits), None, None, info
    from lmforge.checkpoint import load_model

    model = load_model(model_dir, device=device)
    info["total"] = sum(p.numel() for p in model.parameters())  # before NF4 turns weights into buffers
    factory, _ = METHODS[method]
    if method == "qlora":
        from lmforge.quant import swap

        bf16 = sum(
            m.weight.numel() * 2
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n
        )
        swap(model, "nf4")
        nf4 = sum(
            b.numel() * b.element_size()
            for n, m in model.named_modules()
            if hasattr(m, "dequantize")
            for b in m.buffers(recurse=False)
            if b is not None
        )
        info["base_linear_bytes"] = {"bf16": bf16, "nf4": nf4}
    extra = after = None
    if factory is None:
        model.requires_grad_(True)
    else:
        config = factory()
        if isinstance(config, peft.AdaLoraConfig):
            config.total_step = ARGS.steps + 1
            config.tinit, config.tfinal = 0, 1
        peft.apply(model, config)
        if isinstance(config, peft.AdaLoraConfig):
            alloc = peft.RankAllocator(model, config)
            extra = lambda m: config.orth_reg_weight * peft.orthogonal_regularization(m)  # noqa: E731
            after = alloc.step
            info["final_ranks"] = alloc
    return model, (lambda ids: model(ids)), extra, after, info


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def run_child(method: str) -> dict:
    torch.manual_seed(0)
    device = torch.device(ARGS.device)
    data = torch.load(ARGS.data)
    model, forward, extra, after, info = build(method, ARGS.model_dir, device)
    lr = METHODS.get(method.removeprefix("peft-"), (None, 1e-3))[1]
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = info.get("total") or sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ids, labels = data["train"]
    B = ARGS.batch
    rss_before = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    times, losses = [], []
    for step in range(ARGS.steps + 1):
        rows = torch.arange(step * B, step * B + B) % ids.shape[0]
        x, y = ids[rows, :-1].to(device), labels[rows, 1:].to(device)
        t0 = time.perf_counter()
        loss = loss_of(forward(x), y)
        if extra is not None:
            loss = loss + extra(model)
        loss.backward()
        opt.step()
        if after is not None:
            after(step)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    model.eval()
    val_ids, val_labels = data["val"]
    with torch.no_grad():
        val = [
            loss_of(forward(val_ids[i : i + B, :-1].to(device)), val_labels[i : i + B, 1:].to(device)).item()
            for i in range(0, min(len(val_ids), ARGS.val_batches * B), B)
        ]
    result = {
        "method": method,
        "trainable": trainable,
        "total": total,
        "step_s": statistics.median(times[1:]),
        "peak_bytes": peak,
        "train_growth_bytes": (peak_rss_bytes() - rss_before) if device.type == "cpu" else None,
        "train_loss": losses,
        "val_loss": statistics.mean(val),
        "tokens_per_step": B * ARGS.seq,
    }
    if "final_ranks" in info:
        result["final_ranks"] = info["final_ranks"].final_ranks()
    if "base_linear_bytes" in info:
        result["base_linear_bytes"] = info["base_linear_bytes"]
        result.update(merge_cost(model, forward, val_ids, val_labels, device))
    return result


def merge_cost(model, forward, val_ids, val_labels, device) -> dict:
    """QLoRA: merge into the dequantized base, re-quantize (NF4 RTN), and report validation loss
    before and after so the cost of merging is visible."""
    from lmforge.quant import swap

    B = ARGS.batch

    def val() -> float:
        with torch.no_grad():
            return statistics.mean(
                loss_of(forward(val_ids[i : i + B, :-1].to(device)), val_labels[i : i + B, 1:].to(device)).item()
                for i in range(0, min(len(val_ids), ARGS.val_batches * B), B)
            )

    before = val()
    peft.merge_and_unload(model)
    merged_float = val()
    swap(model, "nf4")
    return {"val_loss_unmerged": before, "val_loss_merged_float": merged_float, "val_loss_merged_requant": val()}


# ----------------------------------------------------------------------------- parent


def child(method: str, data: Path, model_dir: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--data",
        str(data),
        "--model-dir",
        str(model_dir),
        "--steps",
        str(ARGS.steps),
        "--batch",
        str(ARGS.batch),
        "--seq",
        str(ARGS.seq),
        "--val-batches",
        str(ARGS.val_batches),
        "--device",
        ARGS.device,
        "--threads",
        str(ARGS.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(ARGS.threads)})
    if out.returncode != 0:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-peft-") as tmp:  # the model folder is large: removed after
        run_all(Path(tmp))


def run_all(work: Path) -> None:
    from lmforge.checkpoint import save_hf
    from lmforge.model import build_model

    print(f"building the SFT data and a random {ARGS.preset} model in {work} ...", flush=True)
    torch.manual_seed(0)
    model = build_model(ARGS.preset)
    build_data(work / "data.pt", ARGS.seq, min(ARGS.vocab, model.config.vocab_size))
    save_hf(model, work / "model")
    del model
    methods = list(METHODS) if ARGS.methods == "all" else ARGS.methods.split(",")
    results = {}
    for m in methods:
        print(f"  {m} ...", flush=True)
        results[m] = child(m, work / "data.pt", work / "model")
    pair = {"lora": [results["lora"]] if "lora" in results else [], "peft-lora": []}
    for _ in range(ARGS.repeats):  # alternate so machine noise hits both sides alike
        for m in ("peft-lora", "lora"):
            if len(pair[m]) < ARGS.repeats:
                print(f"  {m} (repeat) ...", flush=True)
                pair[m].append(child(m, work / "data.pt", work / "model"))
    if pair["peft-lora"]:
        results["peft-lora"] = pair["peft-lora"][0]
    report(results, pair)


def report(results: dict, pair: dict) -> None:
    mem = "peak MiB (CUDA)" if ARGS.device.startswith("cuda") else "peak RSS / train growth MiB"
    print(f"\n{ARGS.preset}, batch {ARGS.batch} x {ARGS.seq}, {ARGS.steps} timed steps, threads {ARGS.threads}\n")
    print(f"| method | trainable | % | {mem} | step s | tokens/s | val loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        growth = "" if r["train_growth_bytes"] is None else f" / {mib(r['train_growth_bytes'])}"
        print(
            f"| {m} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f} | {mib(r['peak_bytes'])}{growth} "
            f"| {r['step_s']:.2f} | {r['tokens_per_step'] / r['step_s']:.0f} | {r['val_loss']:.4f} |"
        )
    if "qlora" in results:
        q = results["qlora"]
        b = q["base_linear_bytes"]
        print(
            f"\nQLoRA base linears: NF4 {mib(b['nf4'])} MiB vs bf16 {mib(b['bf16'])} MiB ({b['bf16'] / b['nf4']:.2f}x smaller); "
            f"val loss unmerged {q['val_loss_unmerged']:.4f}, merged (float) {q['val_loss_merged_float']:.4f}, "
            f"merged + re-quantized NF4 {q['val_loss_merged_requant']:.4f}"
        )
    if "adalora" in results:
        ranks = results["adalora"]["final_ranks"]
        print(f"AdaLoRA final ranks (total {sum(ranks.values())}): {sorted(ranks.values())}")
    if pair["lora"] and pair["peft-lora"]:
        ours = statistics.median(r["step_s"] for r in pair["lora"])
        theirs = statistics.median(r["step_s"] for r in pair["peft-lora"])
        mem_ours = statistics.median(r["train_growth_bytes"] or r["peak_bytes"] for r in pair["lora"])
        mem_theirs = statistics.median(r["train_growth_bytes"] or r["peak_bytes"] for r in pair["peft-lora"])
        print(
            f"\nLoRA r=8 q,v step time lmforge/peft = {ours:.2f}s / {theirs:.2f}s = {ours / theirs:.2f}x "
            f"(median of {len(pair['lora'])} runs each; target <= 1.0x); "
            f"training memory lmforge/peft = {mib(mem_ours)} / {mib(mem_theirs)} MiB = {mem_ours / mem_theirs:.2f}x"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-100m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up step)")
    p.add_argument("--val-batches", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the SFT set")
    p.add_argument("--methods", default="all", help=f"comma list of {','.join(METHODS)} or 'all'")
    p.add_argument("--repeats", type=int, default=3, help="alternating lmforge/peft LoRA runs for the ratio")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()
    torch.set_num_threads(ARGS.threads)
    if ARGS.child:
        print(json.dumps(run_child(ARGS.child)))
    else:
        main()
