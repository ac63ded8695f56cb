"""Built-in verifiable agent tasks and their evaluation (`lmforge agent eval`).

Four kinds, each generated from a seed and checked by a program, never by a judge:

- `arithmetic`: multiplications and mixed expressions of 3-4 digit numbers (too long to do in one's
  head; the calculator gets them exactly). Passed when the answer's last number is the value.
- `file`: a question whose answer (a random code) sits in one of several generated files; the
  files tool reads them. Passed when the answer contains the code.
- `rag`: the same questions over an lmforge rag index of those files (BM25), the rag tool.
- `code`: a small function to write; the answer's code runs against hidden tests in the eval
  sandbox (the python tool lets the model try it first). Passed when every test passes.

Reported per kind and overall: success rate, and mean steps and tokens per successful task.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError

from .loop import AgentConfig, AgentResult, Trace, run_agent
from .models import ChatModel
from .tools import builtin_tools

KINDS = ("arithmetic", "file", "rag", "code")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class AgentTask:
    id: str
    kind: str
    prompt: str
    tools: list[str]
    check: Callable[[str], bool]


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _number_check(value: int | float) -> Callable[[str], bool]:
    return lambda answer: (n := last_number(answer)) is not None and abs(n - value) < 1e-6 * max(1, abs(value))


def arithmetic_tasks(n: int, seed: int) -> list[AgentTask]:
    rng, out = random.Random(seed), []
    for i in range(n):
        a, b, c = rng.randint(100, 999), rng.randint(100, 999), rng.randint(1000, 9999)
        expr, value = [(f"{a} * {b}", a * b), (f"({a} + {c}) * {b}", (a + c) * b), (f"{c} * {b} - {a}", c * b - a)][
            i % 3
        ]
        out.append(AgentTask(f"arithmetic-{i}", "arithmetic", f"What is {expr}?", ["calculator"], _number_check(value)))
    return out


_ITEMS = ["anvil", "barrel", "candle", "drum", "easel", "flask", "gasket", "hinge", "ingot", "jigsaw", "kettle"]


def write_file_corpus(folder: Path, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (item, code) facts spread over a few files in `folder`, with distractor lines."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    facts = []
    for i in range(n):
        item = f"{rng.choice(_ITEMS)}-{i:03d}"
        code = "".join(rng.choices(string.ascii_uppercase + string.digits, k=6))
        facts.append((item, code))
    files: dict[str, list[str]] = {}
    for item, code in facts:
        name = f"shelf_{rng.randint(1, max(1, n // 3))}.txt"
        files.setdefault(name, []).append(f"The storage code of item {item} is {code}.")
        files[name].append(f"Item {item} was last counted on day {rng.randint(1, 365)}.")
    for name, lines in files.items():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return facts


def file_tasks(folder: Path, n: int, seed: int, kind: str = "file") -> list[AgentTask]:
    tools = ["files"] if kind == "file" else ["rag"]
    where = "in the files of the working folder" if kind == "file" else "in the document index"
    return [
        AgentTask(
            f"{kind}-{i}",
            kind,
            f"What is the storage code of item {item}? It is written {where}. Reply with the code.",
            tools,
            lambda answer, code=code: code in (answer or ""),
        )
        for i, (item, code) in enumerate(write_file_corpus(folder, n, seed))
    ]


# name, description, hidden tests (assert lines)
_CODE = [
    ("add_digits", "add_digits(n: int) -> int returning the sum of the decimal digits of n >= 0", ["add_digits(0) == 0", "add_digits(9045) == 18"]),
    ("is_palindrome", "is_palindrome(s: str) -> bool, True when s reads the same backwards ignoring case", ["is_palindrome('Abba')", "not is_palindrome('abc')"]),
    ("fizz", "fizz(n: int) -> str: 'Fizz' if n % 3 == 0, 'Buzz' if n % 5 == 0, 'FizzBuzz' if both, else str(n)", ["fizz(15) == 'FizzBuzz'", "fizz(9) == 'Fizz'", "fizz(10) == 'Buzz'", "fizz(7) == '7'"]),
    ("second_largest", "second_largest(xs: list[int]) -> int, the second largest distinct value", ["second_largest([3, 1, 3, 2]) == 2", "second_largest([5, 9]) == 5"]),
    ("count_vowels", "count_vowels(s: str) -> int counting a, e, i, o, u in either case", ["count_vowels('Agent') == 2", "count_vowels('xyz') == 0"]),
    ("run_length", "run_length(s: str) -> list[tuple[str, int]] of (character, run length)", ["run_length('aab') == [('a', 2), ('b', 1)]", "run_length('') == []"]),
]  # fmt: skip


def extract_code(answer: str) -> str:
    """The last fenced code block of an answer, or the answer itself."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", answer or "", re.DOTALL)
    return blocks[-1] if blocks else (answer or "")


def code_tasks(n: int, seed: int, timeout: float = 10.0) -> list[AgentTask]:
    from lmforge.eval.codeexec import run_program

    def check(answer: str, tests: list[str]) -> bool:
        program = extract_code(answer) + "\n\n" + "\n".join(f"assert {t}" for t in tests) + "\n"
        return run_program(program, timeout=timeout).passed

    order = random.Random(seed).sample(range(len(_CODE)), len(_CODE))
    out = []
    for i in range(n):
        name, desc, tests = _CODE[order[i % len(_CODE)]]
        prompt = f"Write a Python function {desc}. Test it with the python tool, then reply with the code in a ```python block."
        out.append(AgentTask(f"code-{i}", "code", prompt, ["python"], lambda a, t=tests: check(a, t)))
    return out


def builtin_tasks(kinds: list[str], n: int, seed: int, workdir: Path) -> list[AgentTask]:
    tasks: list[AgentTask] = []
    for kind in kinds:
        if kind == "arithmetic":
            tasks += arithmetic_tasks(n, seed)
        elif kind in ("file", "rag"):
            tasks += file_tasks(workdir / "files", n, seed, kind)
        elif kind == "code":
            tasks += code_tasks(n, seed)
        else:
            raise LmforgeError(f"unknown agent task kind {kind!r} (choose from {', '.join(KINDS)})")
    return tasks


def evaluate(
    model: ChatModel,
    tasks: list[AgentTask],
    workdir: Path,
    config: AgentConfig | None = None,
    trace: str | Path | None = None,
    with_tools: bool = True,
) -> dict:
    """Success rate per kind and overall, with steps and tokens per success. `with_tools` False runs
    the same tasks with no tools at all (the baseline a tool must beat)."""
    files, index = workdir / "files", None
    if with_tools and any(t.kind == "rag" for t in tasks):
        from lmforge.rag import IndexSettings, build_index

        index = workdir / "index"
        build_index([str(files)], index, IndexSettings())
    shared = Trace(trace)
    records = []
    for task in tasks:
        tools = builtin_tools(task.tools, files=files, index=index) if with_tools else []
        res: AgentResult = run_agent(model, task.prompt, tools, config, shared, task.id)
        ok = res.answer is not None and bool(task.check(res.answer))
        records.append({"id": task.id, "kind": task.kind, "passed": ok, **res.summary()})
    report = {"with_tools": with_tools, "tasks": len(records), "kinds": {}}
    for kind in [k for k in KINDS if any(r["kind"] == k for r in records)] + ["all"]:
        rows = [r for r in records if kind == "all" or r["kind"] == kind]
        wins = [r for r in rows if r["passed"]]
        report["kinds"][kind] = {
            "n": len(rows),
            "success_rate": len(wins) / len(rows) if rows else 0.0,
            "steps_per_success": sum(r["steps"] for r in wins) / len(wins) if wins else None,
            "tokens_per_success": sum(r["tokens"] for r in wins) / len(wins) if wins else None,
        }
    report["records"] = records
    return report
