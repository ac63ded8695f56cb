"""Running model-written code (HumanEval style) without letting it hang, harm the evaluator or game the score.

Each candidate program (prompt + completion + the task's tests + `check(entry_point)`) runs in a fresh
OS sandbox (`lmforge.eval.sandbox`: bubblewrap namespaces, a read-only root, no network, no inherited
environment, rlimits, seccomp; everything it starts dies with it). It passes only when the program
ran to its end and exited 0: a random per-call marker is printed after the checks, so `exit()`,
`sys.exit(0)` or `os._exit(0)` before or inside them scores as failed. Without bubblewrap (or where the
kernel refuses namespaces) evaluation stops with a clear error; it never runs code unsandboxed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmforge.eval import metrics as M
from lmforge.eval.sandbox import run_isolated

HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert"]


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""  # why it failed: the last line of stderr, a signal or an early exit

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16) -> ExecResult:
    """Run `program` in the sandbox; passed when it ran to its end and exited 0 within `timeout` seconds.

    Raises `lmforge.eval.sandbox.SandboxUnavailable` (an LmforgeError) where no sandbox can be built."""
    res = run_isolated(program, timeout, memory_mb, max_file_mb)
    if res is None:
        return ExecResult("timeout", f"no result after {timeout:g} s")
    if res.finished:
        return ExecResult("passed")
    if res.returncode == 0:  # exit(0) before the marker: the checks did not all run
        return ExecResult("failed", "exited with status 0 before the checks finished")
    tail = res.stderr[-2000:].decode("utf-8", "replace").strip().splitlines()
    if tail:
        return ExecResult("failed", tail[-1])
    if res.returncode > 128:  # bwrap reports a child killed by signal N as 128 + N
        try:
            name = signal.Signals(res.returncode - 128).name
        except ValueError:
            name = "?"
        return ExecResult("failed", f"killed by signal {res.returncode - 128} ({name})")
    return ExecResult("failed", f"exit status {res.returncode}")


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_programs(
    programs: Sequence[str],
    timeout: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    max_file_mb: int = 16,
) -> list[ExecResult]:
    """Candidates run in parallel (each is its own sandbox, so threads just wait on them)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb, max_file_mb), programs))


def run_code(lm, cfg) -> object:
    """The code task: `num_samples` completions per problem, each executed against its tests; pass@k."""
    from lmforge.eval.task_data import TaskResult, load_examples

    def normalize(row: dict, where: str) -> dict:
        from lmforge.eval.task_data import _field

        return {
            "id": str(row.get("task_id", row.get("id", where))),
            "prompt": _field(row, ("prompt",), where),
            "test": _field(row, ("test", "tests"), where),
            "entry_point": _field(row, ("entry_point",), where),
        }

    problems = load_examples(cfg, normalize)
    stop = HUMANEVAL_STOP if cfg.stop is None else cfg.stop
    prompts = [p["prompt"] for p in problems for _ in range(cfg.num_samples)]
    completions = lm.generate(
        prompts, max_new_tokens=cfg.max_new_tokens, stop=stop, temperature=cfg.temperature, seed=cfg.seed
    )
    programs = [
        humaneval_program(p["prompt"], c, p["test"], p["entry_point"])
        for p, c in zip([p for p in problems for _ in range(cfg.num_samples)], completions)
    ]
    results = run_programs(programs, cfg.timeout, cfg.memory_mb)
    records = []
    for i, p in enumerate(problems):
        mine = slice(i * cfg.num_samples, (i + 1) * cfg.num_samples)
        res = results[mine]
        records.append(
            {
                "id": p["id"],
                "prompt": p["prompt"],
                "completions": completions[mine],
                "results": [r.status for r in res],
                "details": [r.detail for r in res],
                "n": len(res),
                "c": sum(r.passed for r in res),
            }
        )
    return TaskResult(cfg.name, cfg.type, aggregate(records, cfg.k), records)


def aggregate(records: Sequence[dict], ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {"examples": len(records)}
    for k in ks:
        if records and all(r["n"] >= k for r in records):
            out[f"pass@{k}"] = M.mean([M.pass_at_k(r["n"], r["c"], k) for r in records])
    return out
