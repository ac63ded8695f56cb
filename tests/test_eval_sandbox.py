"""Adversarial suite for the code-execution sandbox (issue 17): escapes, secrets, survivors, network,
resources, early exit. Each attack first strips Python-level guards (re-importing `posix`/`ctypes`
after popping them from sys.modules), so only OS isolation can stop it, and each is judged on the
host side (a file written, a mode changed, a process alive, a connection accepted), not on the
program's own word. Without `bwrap` the suite fails (CI installs bubblewrap); it skips only where
bwrap is there and the kernel refuses namespaces.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.common import LmforgeError
from lmforge.eval.codeexec import humaneval_program, run_program

CODEEXEC = "lmforge.eval.codeexec"  # the module under test (the evaluator subprocess imports it too)

# Strips the guards a Python-level sandbox could install: fresh `posix` and `ctypes` modules.
UNGUARD = """import sys
for _m in ("posix", "ctypes", "_ctypes", "_socket", "_posixsubprocess"):
    sys.modules.pop(_m, None)
import posix, ctypes, _socket
libc = ctypes.CDLL(None, use_errno=True)
"""


@pytest.fixture(scope="module", autouse=True)
def sandbox_available():
    try:
        run_program("pass\n", timeout=10)
    except LmforgeError as e:
        if shutil.which("bwrap") is None or "kernel refuses" not in str(e):
            raise  # CI installs bubblewrap: a missing or broken sandbox is a failure, not a skip
        pytest.skip(f"bwrap is installed but the kernel refuses its namespaces: {e}")


def run(program: str, **kw):
    kw.setdefault("timeout", 5.0)
    kw.setdefault("memory_mb", 512)
    return run_program(UNGUARD + program, **kw)


def processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# ---- escapes: nothing outside the box may be written, changed or signalled -------------------------


def test_escape_ctypes_reimport_runs_a_shell(tmp_path):
    out = tmp_path / "out"
    run(f"assert libc.system(b'touch {out}') == 0\n")
    assert not out.exists()


def test_escape_posix_reimport_system_and_open(tmp_path):
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    run(
        f"posix.system('touch {out1}')\nfd = posix.open({str(out2)!r}, posix.O_WRONLY | posix.O_CREAT)\n"
        "posix.write(fd, b'escaped')\n"
    )
    assert not out1.exists() and not out2.exists()


def test_escape_subprocess_shell(tmp_path):
    out = tmp_path / "out"
    run(f"import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch {out}'], check=True)\n")
    assert not out.exists()


def test_escape_open_with_dir_fd(tmp_path):
    run(
        f"d = posix.open({str(tmp_path)!r}, posix.O_RDONLY)\n"
        "fd = posix.open('out', posix.O_WRONLY | posix.O_CREAT, 0o644, dir_fd=d)\nposix.write(fd, b'escaped')\n"
    )
    assert not (tmp_path / "out").exists()


def test_escape_sqlite_writes_from_c(tmp_path):
    out = tmp_path / "out.db"
    run(f"import sqlite3\ndb = sqlite3.connect({str(out)!r})\ndb.execute('create table t(x)')\ndb.commit()\n")
    assert not out.exists()


def test_escape_chmod_through_an_fd(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    victim.chmod(0o600)
    run(f"fd = posix.open({str(victim)!r}, posix.O_RDONLY)\nposix.fchmod(fd, 0o777)\n")
    assert victim.stat().st_mode & 0o777 == 0o600


def test_escape_symlink_and_proc_root(tmp_path):
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    run(
        f"try:\n    posix.symlink({str(tmp_path)!r}, 'link')\n    open('link/out1', 'w').write('x')\n"
        f"finally:\n    open('/proc/1/root' + {str(out2)!r}, 'w').write('x')\n"
    )
    assert not out1.exists() and not out2.exists()


def test_escape_the_visible_root_is_read_only():
    # the interpreter's own folders and /usr are visible inside: none may be written to
    token = secrets.token_hex(8)
    targets = [
        f"{d}/lmforge-escape-{token}"
        for d in (os.path.dirname(os.path.realpath(sys.executable)), sys.prefix, "/usr/lib", "/etc", "/")
    ]
    try:
        res = run(
            f"errors = []\nfor t in {targets!r}:\n    try:\n        posix.close(posix.open(t, posix.O_WRONLY | posix.O_CREAT))\n"
            "    except OSError as e:\n        errors.append(e.errno)\nassert len(errors) == len(%r), errors\n"
            % targets
        )
        assert res.passed, res  # every attempt refused (EROFS/EACCES), inside
        assert not any(os.path.exists(t) for t in targets)
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)


def test_escape_kill_a_host_process():
    decoy = subprocess.Popen(["sleep", "30"])
    try:
        run(f"posix.kill({decoy.pid}, 9)\n")
        time.sleep(0.1)
        assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait()


def test_escape_kernel_knobs_are_not_writable():
    res = run(
        "import errno\nfor p in ('/proc/sysrq-trigger', '/proc/sys/kernel/core_pattern', '/proc/sys/vm/drop_caches'):\n"
        "    try:\n        posix.close(posix.open(p, posix.O_WRONLY))\n    except OSError:\n        continue\n"
        "    raise SystemExit('writable: ' + p)\n"
        "assert posix.getuid() != 0 and posix.geteuid() != 0\n"
        "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm'))]\n"
        "assert set(caps) == {'0000000000000000'}, caps\n"
    )
    assert res.passed, res


def test_escape_nested_user_namespace():
    # root in a new user namespace could mount over the read-only root: refused by seccomp and by
    # user.max_user_namespaces = 0 in the sandbox's namespace (each alone is enough)
    res = run("r = libc.unshare(0x10000000)  # CLONE_NEWUSER\nassert r == -1, 'nested user namespace created'\n")
    assert res.passed, res


# ---- secrets: the evaluator's environment and files stay out of reach ---------------------------------


def test_secret_env_var_is_not_inherited(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("LMFORGE_TEST_SECRET", secret)
    res = run(
        f"import os\nassert {secret!r} not in repr(dict(os.environ)), 'LEAK'\n"
        f"assert {secret.encode()!r} not in open('/proc/self/environ', 'rb').read(), 'LEAK'\n"
    )
    assert res.passed, res


def test_secret_proc_environ_of_the_evaluator(tmp_path):
    # the secret must be in the evaluator's initial environment (what /proc/<pid>/environ shows),
    # so the evaluator is a subprocess started with it
    secret = secrets.token_hex(16)
    program = UNGUARD + (
        "import glob, os\nhits, pid = [], os.getppid()\npaths = glob.glob('/proc/*/environ') + ['/proc/EVAL/environ']\n"
        "while pid > 0:\n    paths.append(f'/proc/{pid}/environ')\n    try:\n"
        "        pid = int([l for l in open(f'/proc/{pid}/status') if l.startswith('PPid')][0].split()[1])\n"
        "    except OSError:\n        break\n"
        "for p in paths:\n    try:\n        if SECRET.encode() in open(p, 'rb').read():\n            hits.append(p)\n"
        "    except OSError:\n        pass\nassert not hits, 'LEAK ' + repr(hits)\n"
    ).replace("SECRET", repr(secret))
    (tmp_path / "program.py").write_text(program)
    script = (
        f"import os, sys\nfrom {CODEEXEC} import run_program\n"
        "prog = open(sys.argv[1]).read().replace('EVAL', str(os.getpid()))\nprint(run_program(prog, timeout=10))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "program.py")],
        capture_output=True,
        text=True,
        env={**os.environ, "LMFORGE_TEST_SECRET": secret},
        timeout=60,
    )
    assert "status='passed'" in out.stdout, (out.stdout, out.stderr[-2000:])


def test_secret_host_files_are_not_readable(tmp_path):
    secret = secrets.token_hex(16)
    (tmp_path / "token").write_text(secret)
    (tmp_path / "token").chmod(0o644)
    res = run(
        f"try:\n    data = open({str(tmp_path / 'token')!r}).read()\nexcept OSError:\n    data = ''\n"
        f"assert {secret!r} not in data, 'LEAK'\n"
    )
    assert res.passed, res


# ---- survivors: nothing the program started outlives the call --------------------------------------------


@pytest.mark.parametrize("detach", ["setsid_double_fork", "plain_fork"])
def test_survivors_die_with_the_call(tmp_path, detach):
    token, marker = secrets.token_hex(8), tmp_path / "marker"
    child = f"import time; time.sleep(1.0); open({str(marker)!r}, 'w').write('survived')"
    setsid = "posix.setsid()\n    if posix.fork() == 0:\n        " if detach == "setsid_double_fork" else ""
    run(
        f"if posix.fork() == 0:\n    {setsid}posix.execv(sys.executable, [sys.executable, '-c', {child!r}, {token!r}])\n"
        "    posix._exit(0)\n",
        timeout=5,
    )
    assert processes_with(token) == []
    time.sleep(1.5)
    assert not marker.exists() and processes_with(token) == []


# ---- network: no connection reaches the host ---------------------------------------------------------------


def test_network_tcp_to_a_host_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        res = run(f"s = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {server.getsockname()[1]}))\n")
        with pytest.raises(BlockingIOError):
            server.accept()
    assert res.status == "failed", res


def test_network_abstract_and_file_unix_sockets(tmp_path):
    name, path = f"\0lmforge-test-{secrets.token_hex(8)}", str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as abstract, socket.socket(socket.AF_UNIX) as filed:
        abstract.bind(name)
        filed.bind(path)
        for s in (abstract, filed):
            s.listen()
            s.setblocking(False)
        res = run(
            f"ok = 0\nfor a in ({name!r}, {path!r}):\n    s = _socket.socket(_socket.AF_UNIX)\n    try:\n"
            "        s.connect(a)\n        ok += 1\n    except OSError:\n        pass\nassert ok == 0, ok\n"
        )
        for s in (abstract, filed):
            with pytest.raises(BlockingIOError):
                s.accept()
    assert res.passed, res


# ---- resources: bounded, with a clear status ----------------------------------------------------------------


def test_resources_memory_bomb():
    big = run("x = bytearray(8 * 2**30)\n", memory_mb=256)
    grow = run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 2**20))\n", memory_mb=256)
    assert big.status == grow.status == "failed" and "MemoryError" in big.detail and "MemoryError" in grow.detail


def test_resources_fork_bomb_is_capped():
    t0 = time.perf_counter()
    res = run(
        "import time\nn = 0\ntry:\n    while n < 300:\n        if posix.fork() == 0:\n            time.sleep(30)\n"
        "            posix._exit(0)\n        n += 1\nexcept OSError as e:\n    raise SystemExit(f'forks stopped at {n}: {e}')\n"
    )
    assert res.status == "failed" and "forks stopped at" in res.detail, res
    assert int(res.detail.split("at ")[1].split(":")[0]) < 100 and time.perf_counter() - t0 < 10


def test_resources_infinite_loop_times_out():
    t0 = time.perf_counter()
    res = run("while True:\n    pass\n", timeout=1.0)
    assert res.status == "timeout" and time.perf_counter() - t0 < 4


def test_resources_huge_file_and_full_box():
    big = run("open('big', 'wb').write(b'x' * 2**26)\n", max_file_mb=8)
    assert big.status == "failed" and "File too large" in big.detail, big
    many = run("for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * 2**22)\n", max_file_mb=8)
    assert many.status == "failed" and "No space left" in many.detail, many  # the box holds 4 x max_file_mb


def test_resources_output_flood_is_cut():
    t0 = time.perf_counter()
    res = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", max_file_mb=4, timeout=20)
    assert res.status == "failed" and time.perf_counter() - t0 < 10, res


# ---- early exit: only a program that ran its checks to the end passes ----------------------------------------

PROMPT, TEST = "def add(a, b):\n", "def check(f):\n    assert f(1, 2) == 3\n    assert f(2, 2) == 4\n"
WRONG = "    return a - b\n"
EARLY_EXITS = {
    "exit": WRONG + "exit()\n",
    "quit": WRONG + "quit()\n",
    "sys_exit_0": WRONG + "import sys; sys.exit(0)\n",
    "os_exit_0": WRONG + "import os; os._exit(0)\n",
    "exit_inside_check": "    import os; os._exit(0)\n",
    "system_exit_inside_check": "    raise SystemExit(0)\n",
    "correct_then_exit_before_checks": "    return a + b\nexit(0)\n",
    "fake_marker": WRONG + "import os; print('0' * 32); os._exit(0)\n",
    "atexit_rescue": WRONG + "import atexit, os; atexit.register(os._exit, 0)\n",
}


@pytest.mark.parametrize("name", sorted(EARLY_EXITS))
def test_early_exit_scores_failed(name):
    res = run_program(humaneval_program(PROMPT, EARLY_EXITS[name], TEST, "add"), timeout=5)
    assert res.status == "failed", res


def test_correct_answer_passes_and_wrong_fails():
    assert run_program(humaneval_program(PROMPT, "    return a + b\n", TEST, "add"), timeout=5).passed
    res = run_program(humaneval_program(PROMPT, WRONG, TEST, "add"), timeout=5)
    assert res.status == "failed" and "AssertionError" in res.detail


# ---- refusals: no sandbox, no run ---------------------------------------------------------------------------


def test_refuses_without_bwrap(monkeypatch, tmp_path):
    from lmforge.eval import sandbox

    monkeypatch.setattr(sandbox, "TOOL_PATH", str(tmp_path))
    with pytest.raises(sandbox.SandboxUnavailable, match="bwrap not found: install bubblewrap"):
        run_program("open('/tmp/x', 'w')\n")


def test_refuses_when_the_kernel_refuses_namespaces(monkeypatch, tmp_path):
    from lmforge.eval import sandbox

    for tool in ("unshare", "setpriv"):
        os.symlink(shutil.which(tool), tmp_path / tool)
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel "
        "does not allow non-privileged user namespaces.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "TOOL_PATH", str(tmp_path))
    with pytest.raises(sandbox.SandboxUnavailable, match="kernel refuses"):
        run_program("pass\n")


def test_seccomp_refuses_kernel_surface():
    from lmforge.eval import sandbox

    if sandbox._seccomp_filter() is None:
        pytest.skip("libseccomp.so.2 is not installed: the sandbox runs without its seccomp filter")
    res = run(
        "import errno\nlibc.syscall.restype = ctypes.c_long\n"
        "for nr in (101, 250, 321):  # x86-64 ptrace, keyctl, bpf\n"
        "    assert libc.syscall(nr, 0, 0, 0) == -1 and ctypes.get_errno() == errno.EPERM, nr\n"
    )
    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers above are x86-64's")
    assert res.passed, res
