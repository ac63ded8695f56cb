"""Running model-written code (HumanEval style) without letting it hang or harm the evaluator.

Each candidate program (prompt + completion + the task's tests + `check(entry_point)`) runs in a
fresh `python -I` process, in its own session (so a timeout kills everything it started), with a
fresh temporary directory as cwd, HOME and TMPDIR. Before the candidate runs, a guard prelude
inside that process:

* sets rlimits: address space (`memory_mb`), CPU seconds, file size, no core dumps;
* leaves the network: a new network namespace when the kernel allows it (root or user
  namespaces), and in any case `socket` refuses to create sockets;
* blocks writes outside the temp dir (`open`, `io.FileIO`, `os.open` and the os/shutil functions
  that create, remove or rename paths check the resolved path), process creation (`subprocess`,
  `os.system`, `fork`, `exec*`), signals to other processes and `ctypes`; the C modules behind
  them (`_io`, `posix`, `_socket`, `_posixsubprocess`) are patched the same way.

This is best effort, as in HumanEval's `reliability_guard`: Python-level guards stop mistakes and
casual damage, not a determined attacker; run untrusted models in a container as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lmforge.eval import metrics as M

HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert"]

_GUARD = r'''
import _io, _posixsubprocess, _socket, builtins, io, os, posix, resource, shutil, socket, subprocess, sys
MEM, CPU, FSIZE = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (MEM, MEM))
resource.setrlimit(resource.RLIMIT_CPU, (CPU, CPU))
resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE, FSIZE))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:  # a network namespace with no interfaces (works as root or with user namespaces)
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.unshare(0x40000000) != 0:
        _libc.unshare(0x10000000 | 0x40000000)
except Exception:
    pass
ROOT = os.path.realpath(os.getcwd())
def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    p = os.path.realpath(os.fsdecode(path))
    return p == ROOT or p.startswith(ROOT + os.sep)
def _deny(what):
    raise PermissionError(f"sandbox: {what} is not allowed")
_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        _deny(f"writing {file!r}")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _io.open = _guarded_open
class _GuardedFileIO(io.FileIO):
    def __init__(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not _inside(file):
            _deny(f"writing {file!r}")
        super().__init__(file, mode, *args, **kwargs)
io.FileIO = _io.FileIO = _GuardedFileIO
_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE and not _inside(path):
        _deny(f"writing {path!r}")
    return _os_open(path, flags, *args, **kwargs)
os.open = posix.open = _guarded_os_open
def _paths_inside(name, n):
    real = getattr(os, name)
    def wrapper(*args, **kwargs):
        for p in args[:n]:
            if not _inside(p):
                _deny(f"os.{name}({p!r})")
        return real(*args, **kwargs)
    return wrapper
for _name, _n in [("remove", 1), ("unlink", 1), ("rmdir", 1), ("removedirs", 1), ("mkdir", 1), ("makedirs", 1),
                  ("rename", 2), ("renames", 2), ("replace", 2), ("link", 2), ("symlink", 2), ("chmod", 1),
                  ("chown", 1), ("truncate", 1), ("utime", 1), ("mkfifo", 1)]:
    if hasattr(os, _name):
        setattr(os, _name, _paths_inside(_name, _n))
        if hasattr(posix, _name):
            setattr(posix, _name, getattr(os, _name))
_rmtree = shutil.rmtree
def _guarded_rmtree(path, *args, **kwargs):
    if not _inside(path):
        _deny(f"shutil.rmtree({path!r})")
    return _rmtree(path, *args, **kwargs)
shutil.rmtree = _guarded_rmtree
def _blocked(what):
    def f(*args, **kwargs):
        _deny(what)
    return f
for _name in ["system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execlpe",
              "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp",
              "kill", "killpg", "chdir", "chroot", "setuid", "putenv"]:
    for _mod in (os, posix):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked(f"os.{_name}"))
subprocess.Popen = _posixsubprocess.fork_exec = _blocked("subprocess")
class _NoSocket(_socket.socket):  # a class, so modules that subclass socket.socket still import
    def __init__(self, *args, **kwargs):
        _deny("network access")
socket.socket = _socket.socket = _NoSocket
socket.create_connection = _blocked("network access")
for _m in ("ctypes", "_ctypes"):
    sys.modules[_m] = None
del _name, _n, _m, _mod
_path = sys.argv[1]
with _open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
sys.argv = [_path]
exec(_code, {"__name__": "__main__", "__builtins__": builtins})
'''


@dataclass
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""  # last line of stderr on failure

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16) -> ExecResult:
    """Run `program` in the sandbox; passed when it exits with status 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="lmforge-exec-") as tmp:
        box = Path(tmp) / "box"  # the candidate's world; the guard and the outputs live one level up
        box.mkdir()
        (box / "candidate.py").write_text(program, encoding="utf-8")
        guard = Path(tmp) / "guard.py"
        guard.write_text(_GUARD, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(box), "TMPDIR": str(box), "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        cmd = [sys.executable, "-I", str(guard), "candidate.py", str(memory_mb * 2**20),
               str(int(timeout) + 1), str(max_file_mb * 2**20)]
        with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=box, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult("timeout", f"no result after {timeout:g} s")
            finally:
                _kill_group(proc)  # anything it left running in its session
        if code == 0:
            return ExecResult("passed")
        tail = (Path(tmp) / "stderr").read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        reason = tail[-1] if tail else (f"killed by signal {-code}" if code < 0 else f"exit status {code}")
        return ExecResult("failed", reason)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_programs(programs: Sequence[str], timeout: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None) -> list[ExecResult]:
    """Candidates run in parallel (each is its own process, so threads just wait on them)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))


def run_code(lm, cfg) -> "object":
    """The code task: `num_samples` completions per problem, each executed against its tests; pass@k."""
    from lmforge.eval.tasks import TaskResult, load_examples

    def normalize(row: dict, where: str) -> dict:
        from lmforge.eval.tasks import _field

        return {"id": str(row.get("task_id", row.get("id", where))), "prompt": _field(row, ("prompt",), where),
                "test": _field(row, ("test", "tests"), where), "entry_point": _field(row, ("entry_point",), where)}

    problems = load_examples(cfg, normalize)
    stop = HUMANEVAL_STOP if cfg.stop is None else cfg.stop
    prompts = [p["prompt"] for p in problems for _ in range(cfg.num_samples)]
    completions = lm.generate(prompts, max_new_tokens=cfg.max_new_tokens, stop=stop, temperature=cfg.temperature,
                              seed=cfg.seed)
    programs = [humaneval_program(p["prompt"], c, p["test"], p["entry_point"])
                for p, c in zip([p for p in problems for _ in range(cfg.num_samples)], completions)]
    results = run_programs(programs, cfg.timeout, cfg.memory_mb)
    records = []
    for i, p in enumerate(problems):
        mine = slice(i * cfg.num_samples, (i + 1) * cfg.num_samples)
        res = results[mine]
        records.append({"id": p["id"], "prompt": p["prompt"], "completions": completions[mine],
                        "results": [r.status for r in res], "details": [r.detail for r in res],
                        "n": len(res), "c": sum(r.passed for r in res)})
    return TaskResult(cfg.name, cfg.type, aggregate(records, cfg.k), records)


def aggregate(records: Sequence[dict], ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {"examples": len(records)}
    for k in ks:
        if records and all(r["n"] >= k for r in records):
            out[f"pass@{k}"] = M.mean([M.pass_at_k(r["n"], r["c"], k) for r in records])
    return out
