"""Multi-process test launches that cannot outlive the test: torchrun and its workers run in a
process group of their own under a small guard process, which kills the whole group when the test
process that started it is gone (pytest killed, a CI job cancelled), and the test kills the group
on a timeout or a failure. (Killing torchrun alone leaves its workers running: they were seen
alive an hour after their parent had gone.)

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


def start_guarded(cmd: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """Popen of the guard running `cmd`; the guard leads a new session, so its group is cmd's too."""
    guard = [sys.executable, os.path.abspath(__file__), str(os.getpid()), *cmd]
    return subprocess.Popen(guard, env=env, start_new_session=True, **popen)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # the group is empty: everything already exited
        pass


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
    child = subprocess.Popen(cmd)  # in the guard's process group
    forward = lambda sig, frame: child.send_signal(sig)  # noqa: E731  (a test stopping the server)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while child.poll() is None:
        if os.getppid() != parent:  # the test process died: take the group with us
            os.killpg(0, signal.SIGKILL)
        time.sleep(0.5)
    return child.returncode


if __name__ == "__main__":
    sys.exit(_guard(int(sys.argv[1]), sys.argv[2:]))
