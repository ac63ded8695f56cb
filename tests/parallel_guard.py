"""Multi-process test launches that cannot outlive the test: torchrun and its workers run under a
small guard process, which kills all of them when the test process that started it is gone (pytest
killed, a CI job cancelled), and the test kills them on a timeout or a failure. (Killing torchrun
alone leaves its workers running: they were seen alive an hour after their parent had gone.)

Every process of a launch carries a tag in its environment (LMFORGE_TEST_GUARD), which is how they
are found: torchrun starts each worker in a session of its own, so a process group does not hold
them, and a worker whose torchrun died is no longer anyone's descendant.

    run_guarded(cmd, env, timeout)      # -> CompletedProcess; AssertionError on timeout
    proc = start_guarded(cmd, env)      # a server: Popen of the guard ...
    stop_guarded(proc)                  # ... and its whole group, gone

The guard is this file run as a script: `python parallel_guard.py PARENT_PID CMD...`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TAG = "LMFORGE_TEST_GUARD"


def start_guarded(cmd: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """Popen of the guard running `cmd`, every process it starts tagged `proc.tag`."""
    tag = uuid.uuid4().hex
    guard = [sys.executable, os.path.abspath(__file__), str(os.getpid()), *cmd]
    proc = subprocess.Popen(guard, env={**(env or os.environ), TAG: tag}, start_new_session=True, **popen)
    proc.tag = tag
    return proc


def tagged(tag: str) -> list[int]:
    """The pids of the live processes whose environment carries `tag`."""
    entry, pids = f"{TAG}={tag}".encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(int(pid))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def kill_tagged(tag: str) -> None:
    for pid in tagged(tag):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_group(proc: subprocess.Popen) -> None:
    kill_tagged(proc.tag)


def stop_guarded(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """Kill everything the guard started (whatever state it is in); its exit status if it had one."""
    rc = proc.poll()
    kill_group(proc)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    return rc


def run_guarded(cmd: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """subprocess.run for a command that starts processes of its own: on a timeout every one of
    them is killed and the test fails with the output so far."""
    proc = start_guarded(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:6])} ... ran past {timeout} s; killed:\n{err[-4000:]}") from None
    finally:
        kill_group(proc)  # stray workers left in the group
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _guard(parent: int, cmd: list[str]) -> int:
    child = subprocess.Popen(cmd)
    forward = lambda sig, frame: child.send_signal(sig)  # noqa: E731  (a test stopping the server)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while child.poll() is None:
        if os.getppid() != parent:  # the test process died: take every process of the launch with us
            kill_tagged(os.environ[TAG])
            return 1
        time.sleep(0.5)
    return child.returncode


if __name__ == "__main__":
    sys.exit(_guard(int(sys.argv[1]), sys.argv[2:]))
