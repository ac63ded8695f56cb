"""Multiple-choice scoring through lm-evaluation-harness: the `lmforge` model type (the context
prefilled once into a KV cache shared by the choices) vs lm-eval's own `hf` backend (transformers,
every context + choice scored in full), on the same random GPT-2-shaped weights (saved by
transformers, loaded by lmforge), the same tokenizer and the same local JSONL task. Prints both
accuracies (they should agree) and the time ratio; medians of --repeats runs.

    python bench/eval.py                     # about a minute on 2 idle CPU cores
    python bench/eval.py --context 400 --questions 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def make_task(folder: Path, questions: int, context_words: int) -> Path:
    words = open(os.__file__, encoding="utf-8").read().split()
    rows = []
    for q in range(questions):
        start = (q * 997) % (len(words) - context_words)
        ctx = " ".join(words[start : start + context_words])
        choices = [" ".join(words[(start + 7 * c + 11) % len(words) :][:6]) for c in range(4)]
        rows.append({"context": ctx, "choices": choices, "gold": q % 4})
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "mc.yaml").write_text(TASK.format(path=data))
    return folder / "tasks"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--context", type=int, default=200, help="words of context per question")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import lm_eval
    import transformers as tf
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import lmforge.eval.harness as harness
    from lmforge.checkpoint import load_model
    from lmforge.eval.lm import LocalLM
    from lmforge.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-cache")
    tok = train_tokenizer([open(os.__file__, encoding="utf-8").read()], vocab_size=1024)
    tok.save(tmp / "model")
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
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    hf = tf.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp / "model")
    hf_tok = tf.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp / "model" / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    ours = LocalLM(load_model(tmp / "model"), tok, batch_size=args.batch_size)
    manager = TaskManager(include_path=str(make_task(tmp, args.questions, args.context)), include_defaults=False)
    backends = {
        "lmforge": harness.LmforgeHarnessLM(lm=ours),
        "hf": HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=args.batch_size, device="cpu"),
    }
    times: dict[str, list[float]] = {k: [] for k in backends}
    acc = {}
    for model in backends.values():  # warm-up: builds the dataset cache, first-call allocations
        lm_eval.simple_evaluate(
            model=model, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0, verbosity="ERROR", limit=2
        )
    for _ in range(args.repeats):
        for name, model in backends.items():
            t0 = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=model, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0, verbosity="ERROR"
            )
            times[name].append(time.perf_counter() - t0)
            acc[name] = out["results"]["bench_mc"]["acc,none"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.questions} questions x 4 choices, ~{args.context}-word contexts, GPT-2 shape "
        f"{args.layers}x{args.hidden}, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    for name in backends:
        print(f"  {name:8s} {med[name]:7.2f} s  acc {acc[name]:.4f}")
    print(f"ratio hf / lmforge = {med['hf'] / med['lmforge']:.2f}x (median of {args.repeats})")


if __name__ == "__main__":
    main()
