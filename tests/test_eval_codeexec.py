"""Model-written code runs sandboxed: loops time out, crashes and escapes are contained; pass@k.
The adversarial cases (guards stripped, secrets, survivors, resources, early exit) are in test_eval_sandbox.py."""

import json
import time

from test_eval_common import OracleLM

from lmforge.eval.codeexec import humaneval_program, run_code, run_programs
from lmforge.eval.tasks import TaskConfig


def test_bad_candidates_cannot_hang_or_harm(tmp_path):
    outside = tmp_path / "outside.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    programs = {
        "ok": "x = 1\nassert x == 1\n",
        "wrong": "assert 1 == 2, 'wrong answer'\n",
        "loop": "while True:\n    pass\n",
        "sleep": "import time\ntime.sleep(60)\n",
        "segfault": "import faulthandler\nfaulthandler._sigsegv()\n",
        "memory": "x = bytearray(8 * 2**30)\n",
        "write": f"open({str(outside)!r}, 'w').write('escaped')\n",
        "pathlib": f"import pathlib\npathlib.Path({str(outside)!r}).write_text('escaped')\n",
        "os_open": f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)\n",
        "remove": f"import os\nos.remove({str(victim)!r})\n",
        "shell": f"import os\nassert os.system('touch {outside}') == 0\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}], check=True)\n",
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
        "write_inside": "open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'\n",
    }
    t0 = time.perf_counter()
    results = dict(zip(programs, run_programs(list(programs.values()), timeout=2.0, memory_mb=512, workers=8)))
    assert time.perf_counter() - t0 < 20  # two loops in parallel, each killed at 2 s
    assert results["ok"].passed and results["write_inside"].passed
    assert results["loop"].status == results["sleep"].status == "timeout"
    for name in (
        "wrong",
        "segfault",
        "memory",
        "write",
        "pathlib",
        "os_open",
        "remove",
        "shell",
        "subprocess",
        "network",
    ):
        assert results[name].status == "failed", (name, results[name])
    assert "wrong answer" in results["wrong"].detail and "MemoryError" in results["memory"].detail
    assert results["segfault"].detail == "killed by signal 11 (SIGSEGV)"
    assert "No such file or directory" in results["write"].detail  # the host's folders are not in the box
    assert not outside.exists() and victim.read_text() == "keep me"


PROBLEMS = [
    {
        "task_id": "t/0",
        "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
        "test": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "t/1",
        "prompt": "def double(x):\n",
        "test": "def check(f):\n    assert f(4) == 8\n",
        "entry_point": "double",
    },
]


def test_oracle_passes_and_wrong_code_fails(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    gold = {PROBLEMS[0]["prompt"]: "    return a + b\n", PROBLEMS[1]["prompt"]: "    return 2 * x\n"}
    cfg = TaskConfig("code", "code", path=str(path), num_samples=2, k=[1, 2], timeout=5)
    res = run_code(OracleLM(gold, junk="\ndef unrelated():\n    raise SystemExit(1)\n"), cfg)  # junk cut by stop
    assert res.metrics["pass@1"] == 1.0 and res.metrics["pass@2"] == 1.0
    bad = {PROBLEMS[0]["prompt"]: "    return a - b\n", PROBLEMS[1]["prompt"]: "    while True: pass\n"}
    res = run_code(OracleLM(bad, junk=""), TaskConfig("code", "code", path=str(path), timeout=1))
    assert res.metrics["pass@1"] == 0.0
    assert res.examples[1]["results"] == ["timeout"] and res.examples[0]["results"] == ["failed"]


def test_program_layout():
    assert (
        humaneval_program("def f():\n", "    return 1\n", "def check(g):\n    assert g() == 1\n", "f")
        == "def f():\n    return 1\n\n\ndef check(g):\n    assert g() == 1\n\n\ncheck(f)\n"
    )
