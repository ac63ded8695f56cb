"""CPU decode and prefill, side by side in one run: llama.cpp (through its ctypes API) vs lmforge, same
weights, batch 1, for F32, Q8_0 and Q4_0 at 1 and 2 threads.

    bash scripts/build_llamacpp.sh          # llama.cpp as shared libraries, cached (once, minutes)
    python bench/llamacpp.py                # the Llama-110M shape of issue 22, tg128 after a 32-token prompt
    python bench/llamacpp.py --threads 1 --types q4_0 --repeats 5 --pp 32 512

The model is a random-weight Llama (12 x 768, GQA 12/4, FFN 2048, vocab 32000, untied head); each
GGUF is written by lmforge's own exporter (`lmforge.gguf_io.save_gguf`: F32, and Q8_0/Q4_0 blocks
byte-identical to llama.cpp's quantizer), and lmforge runs the same precision as:

    f32   prepared float weights (`prepare_for_inference`), the C F32 gemv at batch 1
    q8_0  `quant.swap(model, "q8_0", skip=("embed",))`: every matrix incl. the head, llama.cpp's Q8_0
    q4_0  `quant.swap(model, "q4_0", skip=("embed",))`: the same with Q4_0

llama.cpp: `llama_decode` of the prompt (pp) then one token at a time (tg), n_threads = n_threads_batch
= the thread count, default context settings (F16 KV cache, as llama-bench). lmforge: `stream_generate`
(the `generate` path): pp is the time to the first token, tg the rate of the following ones. Each
repeat runs every engine once, interleaved, so machine noise hits all of them; medians are printed
with `uptime`'s load average beside them. "per CPU-s" divides the decoded tokens by the process's CPU
time instead of the wall clock: on a shared machine it is the steadier figure at 1 thread (at 2 it
also counts the time threads spin waiting for each other).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmforge.gguf_io import save_gguf  # noqa: E402
from lmforge.infer.generate import stream_generate  # noqa: E402
from lmforge.infer.prepare import prepare_for_inference  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.model.config import PRESETS  # noqa: E402
from lmforge.quant import swap  # noqa: E402

BUILD = Path(os.environ.get("LMFORGE_LLAMACPP_DIR", Path.home() / ".cache" / "lmforge" / "llamacpp"))
TYPES = ("f32", "q8_0", "q4_0")


def load_llama_cpp():
    if not (BUILD / "lib" / "libllama.so").is_file():
        sys.exit(f"llama.cpp is not built in {BUILD}: run bash scripts/build_llamacpp.sh first")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(BUILD / "lib")
    sys.path.insert(0, str(BUILD / "python"))
    import llama_cpp

    llama_cpp.llama_backend_init()
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, None)
    llama_cpp._lmforge_quiet = quiet  # keep the callback alive
    return llama_cpp


class LlamaCpp:
    """One loaded GGUF; `run` decodes a prompt then `new` tokens one at a time (greedy-free: the next
    token is fixed, llama-bench's way, so sampling costs nothing on either side)."""

    def __init__(self, lib, path: Path, n_ctx: int):
        self.lib = lib
        mp = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_ctx = n_ctx
        self.ctx = None

    def _context(self, threads: int):
        lib = self.lib
        if self.ctx is not None:
            lib.llama_free(self.ctx)
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")

    def _decode(self, ids: list[int]) -> None:
        arr = (self.lib.llama_token * len(ids))(*ids)
        if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        self.lib.llama_synchronize(self.ctx)

    def run(self, prompt: list[int], new: int, threads: int) -> tuple[float, float, float]:
        """(prefill tok/s, decode tok/s, decode tokens per CPU-second) on a fresh context."""
        self._context(threads)
        t = time.perf_counter()
        self._decode(prompt)
        pp = len(prompt) / (time.perf_counter() - t)
        t, cpu = time.perf_counter(), time.process_time()
        for i in range(new):
            self._decode([(prompt[-1] + 7 * i) % 32000])
        return pp, new / (time.perf_counter() - t), new / (time.process_time() - cpu)

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def run_lmforge(model, prompt: list[int], new: int) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, decode tokens per CPU-second) through `stream_generate`: time to
    the first token, then the rest."""
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    t0 = time.perf_counter()
    stamps = []
    for _ in stream_generate(model, [prompt], params):
        stamps.append((time.perf_counter(), time.process_time()))
    (wall0, cpu0), (wall1, cpu1) = stamps[0], stamps[-1]
    return len(prompt) / (wall0 - t0), (len(stamps) - 1) / (wall1 - wall0), (len(stamps) - 1) / (cpu1 - cpu0)


def make_model(tied: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**PRESETS["llama-100m"], "tie_word_embeddings": tied})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # random weights at a realistic scale (the init's 0.02 std makes all logits ~0)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model


def lmforge_model(base: Transformer, gguf_type: str) -> torch.nn.Module:
    model = Transformer(base.config)
    model.load_state_dict(base.state_dict())
    if gguf_type != "f32":
        swap(model, gguf_type, skip=("embed",))
    return prepare_for_inference(model)


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--pp", nargs="+", type=int, default=[32], help="prompt lengths; the first is the tg prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lib = load_llama_cpp()
    base = make_model()
    g = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(0, base.config.vocab_size, (n,), generator=g).tolist() for n in args.pp}
    n_ctx = max(args.pp) + args.new_tokens + 8
    print(f"torch {torch.__version__}; load average before: {load_avg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in args.types:
            path = save_gguf(base, Path(tmp) / f"{gguf_type}.gguf", None, gguf_type)
            theirs = LlamaCpp(lib, path, n_ctx)
            ours = lmforge_model(base, gguf_type)
            for threads in args.threads:
                torch.set_num_threads(threads)
                res: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
                for n in args.pp:  # warm-up: first calls build kernels / caches on both sides
                    theirs.run(prompts[n], 4, threads), run_lmforge(ours, prompts[n], 4)
                for _ in range(args.repeats):
                    for n in args.pp:
                        new = args.new_tokens if n == args.pp[0] else 2
                        res.setdefault(("llama.cpp", n), []).append(theirs.run(prompts[n], new, threads))
                        res.setdefault(("lmforge", n), []).append(run_lmforge(ours, prompts[n], new))
                med = {k: tuple(statistics.median(col) for col in zip(*v)) for k, v in res.items()}
                rows.append((gguf_type, threads, med, load_avg()))
                (_, tg_l, cpu_l), (_, tg_o, cpu_o) = med[("llama.cpp", args.pp[0])], med[("lmforge", args.pp[0])]
                print(
                    f"{gguf_type} {threads}t: tg{args.new_tokens} llama.cpp {tg_l:.1f} lmforge {tg_o:.1f} "
                    f"({tg_o / tg_l:.2f}x; per CPU-second {cpu_l:.1f} vs {cpu_o:.1f}, {cpu_o / cpu_l:.2f}x); "
                    + "; ".join(
                        f"pp{n} {med[('llama.cpp', n)][0]:.0f} vs {med[('lmforge', n)][0]:.0f}" for n in args.pp
                    )
                    + f"  [load {load_avg()}]",
                    flush=True,
                )
            theirs.close()
            del ours
    print_table(rows, args)


def print_table(rows, args) -> None:
    tg = f"tg{args.new_tokens}"
    head = f"| type | threads | {tg} llama.cpp | {tg} lmforge | ratio | per CPU-s llama.cpp | lmforge | ratio |"
    head += "".join(f" pp{n} llama.cpp | pp{n} lmforge | ratio |" for n in args.pp) + " load avg |"
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for gguf_type, threads, med, load in rows:
        (_, l_, cl), (_, o, co) = med[("llama.cpp", args.pp[0])], med[("lmforge", args.pp[0])]
        line = f"| {gguf_type.upper()} | {threads} | {l_:.1f} | {o:.1f} | {o / l_:.2f}x | {cl:.1f} | {co:.1f} | {co / cl:.2f}x |"
        for n in args.pp:
            a, b = med[("llama.cpp", n)][0], med[("lmforge", n)][0]
            line += f" {a:.0f} | {b:.0f} | {b / a:.2f}x |"
        print(line + f" {load} |")


if __name__ == "__main__":
    main()
