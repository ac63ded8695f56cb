"""Speed under contention: training, batch-1 decoding and serving, alone and beside one competing
CPU-bound process (`python -c "while True: pass"`), with OpenMP's old default settings and with
lmforge's threads policy (lmforge.common.apply_threads_policy, on by default).

Each variant runs in a worker process of its own, started with its environment (OpenMP reads its
settings once, when torch loads): `old` has LMFORGE_THREADS_POLICY=off and no OpenMP wait settings,
`new` is what lmforge does by default. The workers take turns, measurement by measurement, and the
quiet and loaded phases alternate between repeats, so the noise of a shared machine hits every
cell alike; the table shows medians. The parent also reports how much CPU other processes on the
machine used while it measured (their load moves every figure).

    python bench/contention.py                       # ~3 minutes on 2 cores
    python bench/contention.py --json contention.json --repeats 5
    python bench/contention.py --variant passive=OMP_WAIT_POLICY=PASSIVE --variant one=OMP_NUM_THREADS=1

A `--variant NAME=VAR=VALUE[,VAR=VALUE...]` runs with exactly those settings (the policy off).
OMP_NUM_THREADS, MKL_NUM_THREADS and the OpenMP wait variables of the calling shell are not passed
on: every variant starts from the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("train", "decode", "serve")
STRIPPED = (
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "LMFORGE_THREADS_POLICY",
)
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


# ---------------------------------------------------------------------------- the worker (one per variant)


class Worker:
    """Models and a server built once; each task call measures tokens/s for at least `seconds`."""

    def __init__(self, args, env_before_policy: dict):
        import torch

        from lmforge.model import build_model

        torch.manual_seed(0)
        self.args = args
        self.train_model = build_model(args.train_preset).train()
        self.opt = torch.optim.AdamW(self.train_model.parameters(), lr=1e-3, weight_decay=0.1)
        vocab = self.train_model.config.vocab_size
        self.batch = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1))
        from lmforge.infer.prepare import prepare_for_inference

        # as `lmforge generate` runs it: prepared (the one-call C decode step where the model fits it)
        self.decode_model = prepare_for_inference(build_model(args.decode_preset))
        self.prompt = torch.randint(0, self.decode_model.config.vocab_size, (16,)).tolist()
        self.server, self.url, self.server_log = None, None, None
        if "serve" in args.tasks:  # `lmforge serve` applies the policy itself: it gets the environment as it was
            self.server, self.url, self.server_log = start_server(args.serve_model, env_before_policy)

    def train(self, seconds: float) -> tuple[int, float]:
        import torch
        import torch.nn.functional as F

        x, y = self.batch[:, :-1], self.batch[:, 1:]
        tokens, start = 0, time.perf_counter()
        while tokens == 0 or time.perf_counter() - start < seconds:
            logits = self.train_model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            tokens += x.numel()
        return tokens, time.perf_counter() - start

    def decode(self, seconds: float) -> tuple[int, float]:
        from lmforge.infer.generate import generate

        tokens, start = 0, time.perf_counter()
        while tokens == 0 or time.perf_counter() - start < seconds:
            tokens += generate(self.decode_model, self.prompt, max_new_tokens=self.args.new_tokens).shape[1]
        return tokens, time.perf_counter() - start

    def serve(self, seconds: float) -> tuple[int, float]:
        n = self.args.clients
        prompts = [[5 + (7 * i + j) % 200 for j in range(16)] for i in range(n)]
        tokens, start = 0, time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            while tokens == 0 or time.perf_counter() - start < seconds:
                tokens += sum(pool.map(lambda p: complete(self.url, p, self.args.new_tokens), prompts))
        return tokens, time.perf_counter() - start

    def close(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()


def start_server(model: str, env: dict) -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkstemp(prefix="contention-serve-", suffix=".log")[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--served-model-name",
            "bench",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url, log
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")


def complete(url: str, prompt: list[int], new: int) -> int:
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["usage"]["completion_tokens"]


def worker_main(args) -> None:
    env_before = dict(os.environ)
    from lmforge.common import apply_threads_policy

    apply_threads_policy()  # what every lmforge entry point does, before torch loads
    import torch

    w = Worker(args, env_before)
    info = {k: os.environ.get(k) for k in STRIPPED}
    info["torch_threads"] = torch.get_num_threads()
    print(json.dumps(info), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            tokens, elapsed = getattr(w, cmd["task"])(cmd["seconds"])
            print(json.dumps({"tokens": tokens, "seconds": elapsed, "cpu": time.process_time()}), flush=True)
    finally:
        w.close()


# ---------------------------------------------------------------------------- the parent


def build_serve_model(preset: str, folder: Path) -> None:
    """A random `preset` model with a BPE tokenizer; special tokens' embeddings are zero, so greedy
    decoding never picks them and every request runs to max_tokens."""
    import sysconfig

    import torch

    from lmforge.checkpoint import save_model
    from lmforge.model import build_model
    from lmforge.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = train_tokenizer([f.read_text(errors="replace") for f in sorted(stdlib.glob("*.py"))[:30]], vocab_size=1024)
    torch.manual_seed(0)
    model = build_model(preset, vocab_size=tok.vocab_size).eval()
    specials = [t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special]
    with torch.no_grad():
        for s in specials:
            model.model.embed_tokens.weight[tok.token_to_id(s)] = 0
    save_model(model, folder, tokenizer=tok)


class CpuMeter:
    """CPU used by processes other than this benchmark's (machine busy time minus this process tree),
    in cores, over each measured window; None without psutil."""

    def __init__(self):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil = psutil

    def sample(self) -> tuple[float, float, float] | None:
        if self.psutil is None:
            return None
        p = self.psutil
        t = p.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        ours = 0.0
        me = p.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                c = proc.cpu_times()
                ours += c.user + c.system
            except p.Error:
                pass
        return time.perf_counter(), busy, ours

    @staticmethod
    def others(a, b) -> float | None:
        if a is None or b is None:
            return None
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]))


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    env = {"LMFORGE_THREADS_POLICY": "off"}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected NAME=VAR=VALUE[,VAR=VALUE...]")
        env[key] = value
    if not name or len(env) == 1:
        raise SystemExit(f"--variant {text!r}: expected NAME=VAR=VALUE[,VAR=VALUE...]")
    return name, env


def start_worker(args, extra_env: dict, serve_model: Path) -> tuple[subprocess.Popen, dict]:
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra_env)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--serve-model",
        str(serve_model),
        "--tasks",
        *args.tasks,
        "--train-preset",
        args.train_preset,
        "--decode-preset",
        args.decode_preset,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--new-tokens",
        str(args.new_tokens),
        "--clients",
        str(args.clients),
    ]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"worker {cmd} failed (exit code {proc.wait()})")
    return proc, json.loads(line)


def ask(proc: subprocess.Popen, task: str, seconds: float) -> float:
    proc.stdin.write(json.dumps({"task": task, "seconds": seconds}) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"a worker died during {task} (exit code {proc.wait()})")
    r = json.loads(line)
    return r["tokens"] / r["seconds"]


def start_busy_loop() -> subprocess.Popen:
    # A session of its own, like a program started from another terminal: where the kernel groups
    # CPU time by session (autogroup), it competes with the benchmark as a whole, not thread by thread.
    proc = subprocess.Popen(BUSY_LOOP, start_new_session=True)
    time.sleep(0.3)  # let the scheduler see it as a steady CPU hog before measuring
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def run(args) -> dict:
    variants = {"old": {"LMFORGE_THREADS_POLICY": "off"}, "new": {}}
    variants.update(parse_variant(v) for v in args.variant)
    names = list(variants)
    results = {t: {v: {"quiet": [], "loaded": []} for v in names} for t in args.tasks}
    others = {"quiet": [], "loaded": []}
    meter, workers, busy = CpuMeter(), {}, None
    with tempfile.TemporaryDirectory() as tmp:
        serve_model = Path(tmp) / "serve-model"
        if "serve" in args.tasks:
            build_serve_model(args.serve_preset, serve_model)
        try:
            settings = {}
            for name in names:
                workers[name], settings[name] = start_worker(args, variants[name], serve_model)
                for task in args.tasks:  # warm-up: allocations, first-call paths
                    ask(workers[name], task, 0.5)
            for r in range(args.repeats):
                for load in args.loads if r % 2 == 0 else args.loads[::-1]:
                    busy = start_busy_loop() if load == "loaded" else None
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        for task in args.tasks:
                            a = meter.sample()
                            results[task][name][load].append(ask(workers[name], task, args.seconds))
                            o = CpuMeter.others(a, meter.sample())
                            if o is not None:  # the busy loop is ours: `others` is the machine's own noise
                                others[load].append(o)
                    stop(busy)
                    busy = None
                print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        finally:
            stop(busy)
            for proc in workers.values():
                if proc.poll() is None:
                    proc.stdin.close()
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return summarise(args, variants, settings, results, others)


def summarise(args, variants, settings, results, others) -> dict:
    table = {}
    for task, per_variant in results.items():
        table[task] = {}
        for name, runs in per_variant.items():
            q, lo = (statistics.median(runs[load]) if runs[load] else None for load in ("quiet", "loaded"))
            table[task][name] = dict(
                runs,
                quiet_median=q,
                loaded_median=lo,
                slowdown=q / lo if q and lo else None,
                quiet_vs_old=statistics.median(a / b for a, b in zip(runs["quiet"], per_variant["old"]["quiet"]))
                if q
                else None,
            )
    noise = {load: dict(median=statistics.median(v), max=max(v)) if v else None for load, v in others.items()}
    return dict(
        config={k: v for k, v in vars(args).items() if k not in ("worker", "json", "serve_model")},
        cpu_count=os.cpu_count(),
        variants={n: dict(env=variants[n], ran_with=settings[n]) for n in variants},
        results=table,
        other_processes_cores=noise,
    )


def print_table(report: dict) -> None:
    print(f"{'task':<8}{'variant':<10}{'quiet tok/s':>13}{'loaded tok/s':>14}{'slowdown':>10}{'quiet vs old':>14}")
    for task, per_variant in report["results"].items():
        for name, r in per_variant.items():
            cells = [
                f"{r['quiet_median']:,.0f}" if r["quiet_median"] else "-",
                f"{r['loaded_median']:,.0f}" if r["loaded_median"] else "-",
                f"{r['slowdown']:.2f}x" if r["slowdown"] else "-",
                f"{r['quiet_vs_old']:.2f}x" if r["quiet_vs_old"] else "-",
            ]
            print(f"{task:<8}{name:<10}{cells[0]:>13}{cells[1]:>14}{cells[2]:>10}{cells[3]:>14}")
    for name, v in report["variants"].items():
        ran = {k: v for k, v in v["ran_with"].items() if v is not None}
        print(f"{name}: {', '.join(f'{k}={x}' for k, x in ran.items())}")
    for load, n in report["other_processes_cores"].items():
        if n:
            print(
                f"other processes used {n['median']:.2f} cores (median; max {n['max']:.2f}) while measuring "
                f"{load} (of {report['cpu_count']})"
            )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="each measurement runs at least this long")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument(
        "--loads",
        nargs="+",
        choices=("quiet", "loaded"),
        default=["quiet", "loaded"],
        help="measure alone (quiet), beside one busy loop (loaded), or both",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VAR=VALUE[,VAR=VALUE]",
        help="another variant to measure, with exactly these settings (repeatable)",
    )
    p.add_argument("--train-preset", default="small", help="`lmforge pretrain --model small`'s model")
    p.add_argument("--batch-size", type=int, default=16, help="training batch (pretrain's default: 16 x 128)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--decode-preset", default="small")
    p.add_argument("--serve-preset", default="tiny")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per decode call and per server request")
    p.add_argument("--clients", type=int, default=4, help="concurrent requests to the server")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    if args.repeats < 1 or args.seconds <= 0:
        raise SystemExit("--repeats must be >= 1 and --seconds > 0")
    report = run(args)
    print_table(report)
    if args.json:
        sys.path.insert(0, str(ROOT))
        from lmforge.common import atomic_write_json

        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
