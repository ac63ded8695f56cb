"""OS isolation for model-written code: bubblewrap (`bwrap`) namespaces, rlimits and seccomp.

`run_isolated(program, ...)` runs a Python program in a fresh sandbox and returns its exit status,
output and whether it reached the end (a random per-call marker printed after the program ran).

The sandbox, per call:

* namespaces: user, mount, pid, network (no interfaces but a loopback of its own), ipc, uts,
  cgroup; nested user namespaces are disabled, so the program cannot build new ones;
* a read-only root on a tmpfs holding only `/usr` (with the `/bin`, `/lib*` links), the Python
  installation that runs the evaluator, `/etc/ld.so.cache`, a fresh `/dev` and the sandbox's own
  `/proc` (its pid namespace: no other process, hence no `/proc/<ppid>/environ`); the only
  writable places are tmpfs `/box` (cwd, HOME), `/tmp` and `/dev/shm`, each of 4 x `max_file_mb`;
* no inherited environment (`--clearenv` plus a minimal fixed one) and no inherited descriptors
  except stdout/stderr (anonymous files of the evaluator, bounded by the file-size limit);
* a non-root user with no capabilities and `no_new_privs`. As root (CI, containers) bwrap alone
  would map the sandbox user onto host uid 0 (which may write root-owned `/proc/sys` entries),
  so the evaluator prepares the user namespace itself: uid 0 there is host root (only to set up
  the mounts), the program runs as uid 1000 there, which is host `nobody` (65534), via `setpriv`;
* rlimits set before the program runs: address space, CPU seconds, file size, processes (counted
  per user namespace, so one sandbox's fork bomb does not starve another), open files, no cores;
* a seccomp filter (compiled by libseccomp when `libseccomp.so.2` loads; skipped otherwise)
  refusing syscalls an evaluated program never needs: kernel keyrings, bpf, perf, userfaultfd,
  io_uring, ptrace, mount/namespace calls, module/kexec/reboot/swap/clock changes; syscalls of
  another ABI (x32, i386) kill the process;
* `--die-with-parent` and a pid namespace: when the program exits, times out or the evaluator
  dies, every process it started (a `setsid` double fork included) is killed with it.

Where no isolation is possible, `SandboxUnavailable` (an `LmforgeError`) says what is missing;
there is no unsandboxed fallback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.common import LmforgeError

SANDBOX_UID = 1000  # the program's uid inside the sandbox...
NOBODY = 65534  # ...which is this host uid when the evaluator runs as root
TOOL_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"  # where bwrap, unshare, setpriv are found
_RUN = "/run/lmforge"  # read-only: the harness and the program

# Runs inside the sandbox as `python -I harness.py MEM CPU FSIZE NPROC MARKER_FD program.py`. The marker
# (read from an inherited pipe, which is then closed) is printed only after the program returned, so
# exit()/os._exit()/SystemExit inside it cannot pass.
_HARNESS = r"""
import os, resource, sys
def _harness():
    mem, cpu, fsize, nproc = (int(a) for a in sys.argv[1:5])
    for which, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
    marker = os.read(int(sys.argv[5]), 128)
    os.closerange(3, 256)  # the marker pipe and whatever bwrap left open (the user namespace fd)
    path = sys.argv[6]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), os.path.basename(path), "exec")
    sys.argv = [path]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, b"\n" + marker + b"\n")
_harness()
"""

# Syscalls refused with EPERM (never needed by a program under test; reachable kernel surface).
_DENIED_SYSCALLS = (
    "add_key",
    "keyctl",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    "vhangup",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "lookup_dcookie",
    "fanotify_init",
    "personality",
)


class SandboxUnavailable(LmforgeError):
    """No OS isolation is possible here; the message names what is missing."""


@dataclass
class Isolated:
    returncode: int  # the program's exit status (128 + N: killed by signal N)
    finished: bool  # the marker printed after the program ran was seen
    stdout: bytes
    stderr: bytes


def _tool(name: str, package: str) -> str:
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        raise SandboxUnavailable(f"{name} not found: install {package} (model-written code never runs unsandboxed)")
    return path


@functools.cache
def _seccomp_filter() -> bytes | None:
    """The compiled BPF deny-list, or None where libseccomp is not installed."""
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW; a foreign ABI gets the default bad-arch kill
    if not ctx:
        return None
    try:
        for call in _DENIED_SYSCALLS:
            nr = lib.seccomp_syscall_resolve_name(call.encode())
            if nr >= 0 and lib.seccomp_rule_add(ctx, 0x00050000 | errno.EPERM, nr, 0) != 0:  # SCMP_ACT_ERRNO
                return None
        fd = os.memfd_create("lmforge-seccomp")
        try:
            if lib.seccomp_export_bpf(ctx, fd) != 0:
                return None
            os.lseek(fd, 0, os.SEEK_SET)
            return os.read(fd, 1 << 20)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _data_fd(data: bytes) -> int:
    """A readable descriptor holding `data` (bwrap copies it into the sandbox)."""
    fd = os.memfd_create("lmforge-data")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _root_userns() -> int:
    """A user namespace (as an fd) where uid 0 is host root and uid 1000 is host nobody, with further
    user namespaces disabled. Only root may write such a two-line map; bwrap joins it with --userns."""
    helper = subprocess.Popen(
        [
            _tool("unshare", "util-linux"),
            "--user",
            "--",
            "/bin/sh",
            "-c",
            # re-exec after the map is written so the shell holds its capabilities in the namespace
            'echo ready; read go; exec /bin/sh -c "echo 0 > /proc/sys/user/max_user_namespaces && echo ok && read done"',
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        if helper.stdout.readline() != b"ready\n":
            raise SandboxUnavailable(
                "the kernel refuses user namespaces (unshare --user failed: "
                f"{helper.stderr.read().decode(errors='replace').strip()})"
            )
        mapping = f"0 0 1\n{SANDBOX_UID} {NOBODY} 1\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(mapping)
        helper.stdin.write(b"go\n")
        helper.stdin.flush()
        if helper.stdout.readline() != b"ok\n":
            raise SandboxUnavailable(
                "cannot disable nested user namespaces in the sandbox: "
                f"{helper.stderr.read().decode(errors='replace').strip()}"
            )
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY)
    except OSError as e:
        raise SandboxUnavailable(f"the kernel refuses the sandbox's user namespace: {e}") from e
    finally:
        helper.kill()
        helper.wait()


def _python_dirs() -> list[str]:
    """Folders the interpreter needs (installation, venv), outside /usr, outermost only."""
    dirs = {
        os.path.realpath(p)
        for p in (
            sys.base_prefix,
            sys.prefix,
            sys.base_exec_prefix,
            sys.exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)),
        )
    }
    dirs = {d for d in dirs if d != "/usr" and not d.startswith("/usr/")}
    return sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))


def _mounts(box_bytes: int) -> list[str]:
    args = ["--tmpfs", "/"]  # bwrap's new root; made read-only last
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{top}"
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    args += [
        "--ro-bind",
        "/usr",
        "/usr",
        "--ro-bind-try",
        "/etc/ld.so.cache",
        "/etc/ld.so.cache",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]
    for writable in ("/box", "/tmp", "/dev/shm"):  # before the Python folders: a venv may live under /tmp
        args += ["--perms", "01777", "--size", str(box_bytes), "--tmpfs", writable]
    for d in _python_dirs():
        parents = Path(d).parents
        for parent in reversed([str(p) for p in parents if str(p) != "/"]):
            args += ["--perms", "0755", "--dir", parent]  # not the host's modes (/root is 0700)
        args += ["--ro-bind", d, d]
    return args


def _refusal(stderr: bytes) -> SandboxUnavailable:
    text = stderr.decode("utf-8", "replace").strip()
    if "namespace" in text or "uid map" in text or "Operation not permitted" in text:
        return SandboxUnavailable(f"the kernel refuses the namespaces the sandbox needs: {text}")
    return SandboxUnavailable(f"the sandbox could not start: {text}")


def run_isolated(
    program: str, timeout: float, memory_mb: int, max_file_mb: int, max_procs: int = 64
) -> Isolated | None:
    """Run `program` (Python source) in a fresh sandbox; None when it ran past `timeout` seconds (killed)."""
    bwrap = _tool("bwrap", "bubblewrap (apt-get install bubblewrap)")
    marker = secrets.token_hex(16).encode()
    fds: list[int] = []  # every descriptor opened for this call, closed at the end
    try:
        marker_r, marker_w = os.pipe()
        os.write(marker_w, marker)
        os.close(marker_w)
        info_r, info_w = os.pipe()
        fds += [marker_r, info_r, info_w]
        limits = [memory_mb << 20, int(timeout) + 1, max_file_mb << 20, max_procs]
        passed = [marker_r, info_w]
        try:
            argv = _command(bwrap, program, limits, passed, 4 * max_file_mb << 20)
        finally:
            fds += passed[2:]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env={"PATH": "/usr/bin:/bin"},
                    pass_fds=passed,
                    start_new_session=True,
                )
            finally:
                fds.remove(info_w)
                os.close(info_w)  # now only bwrap holds it: EOF on info_r if bwrap dies early
            init = _sandbox_init(info_r, timeout)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)
                if init is not None:
                    _kill_namespace(init)
            os.set_blocking(marker_r, False)
            try:  # the harness drains the marker pipe first thing: still full means the sandbox never started
                started = not os.read(marker_r, 128)
            except BlockingIOError:
                started = True
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if code is None:
            return None
        if not started:
            raise _refusal(stderr)
        return Isolated(code, code == 0 and marker in stdout.split(b"\n"), stdout, stderr)
    finally:
        for fd in fds:
            os.close(fd)


def _command(bwrap: str, program: str, limits: list[int], passed: list[int], box_bytes: int) -> list[str]:
    """The bwrap command line. `passed` holds the marker and info descriptors; the others bwrap must
    inherit (user namespace, harness, program, seccomp filter) are appended to it."""
    marker_fd, info_fd = passed
    if os.geteuid() == 0:
        passed.append(_root_userns())
        user = ["--userns", str(passed[-1])] + [
            a for c in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP") for a in ("--cap-add", c)
        ]
        drop = [
            _tool("setpriv", "util-linux"),
            f"--reuid={SANDBOX_UID}",
            f"--regid={SANDBOX_UID}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]
    else:
        user, drop = ["--unshare-user", "--disable-userns"], []
    passed += [_data_fd(_HARNESS.encode()), _data_fd(program.encode("utf-8", "surrogatepass"))]
    files = [
        "--perms",
        "0444",
        "--ro-bind-data",
        str(passed[-2]),
        f"{_RUN}/harness.py",
        "--perms",
        "0444",
        "--ro-bind-data",
        str(passed[-1]),
        f"{_RUN}/program.py",
    ]
    bpf = _seccomp_filter()
    if bpf is not None:
        passed.append(_data_fd(bpf))
        files += ["--seccomp", str(passed[-1])]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/box",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    argv = [
        bwrap,
        *user,
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        *_mounts(box_bytes),
        *files,
        "--remount-ro",
        "/",
        "--chdir",
        "/box",
        "--clearenv",
        *[a for k, v in env.items() for a in ("--setenv", k, v)],
        "--info-fd",
        str(info_fd),
        *drop,
        sys.executable,
        "-I",
        f"{_RUN}/harness.py",
        *map(str, limits),
        str(marker_fd),
        f"{_RUN}/program.py",
    ]
    return argv


def _sandbox_init(info_fd: int, timeout: float) -> int | None:
    """A pidfd of the sandbox's pid 1 (bwrap reports its pid on --info-fd right after creating it), or None
    when bwrap failed before that."""
    data = b""
    while b"}" not in data:
        if not select.select([info_fd], [], [], timeout)[0]:
            return None
        chunk = os.read(info_fd, 4096)
        if not chunk:
            return None
        data += chunk
    found = re.search(rb'"child-pid"\s*:\s*(\d+)', data)
    try:
        return os.pidfd_open(int(found.group(1))) if found else None
    except ProcessLookupError:
        return None  # already gone, and with it the whole pid namespace


def _kill_namespace(init: int) -> None:
    """Kill the sandbox's pid 1 and wait until it has exited. bwrap itself may return before that; the
    kernel kills every other process of the namespace (setsid ones included) before pid 1's exit completes,
    so once the pidfd is readable nothing the program started is left."""
    try:
        signal.pidfd_send_signal(init, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        select.select([init], [], [], 30)
    finally:
        os.close(init)


def _kill_group(proc: subprocess.Popen) -> None:
    """bwrap leads its own session; killing it takes the sandbox's pid 1, hence every process in it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
