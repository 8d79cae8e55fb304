"""Child side of the executor's Linux sandbox: enter namespaces, then run the bootstrap in them.

:mod:`freeformer.evaluation.executor` starts ``python -I sandbox.py WORK PROGRAM HIDE BOOTSTRAP
ARG...`` for each program. ``-I`` ignores ``PYTHONPATH``, so this file is a stand-alone script
(standard library and ``ctypes`` only; no ``os.unshare`` before Python 3.12). No root, no
daemon, no ``bwrap``: unprivileged user namespaces do it all. Four processes, each a fork:

* **outer** (the executor's child, alone in its process group): forks *setup*, then writes
  setup's uid/gid maps from outside the new user namespace. As an ordinary user it maps
  namespace root to itself; as real root it maps namespace root to ``nobody`` (65534), so a
  program started by root cannot read root-only files (``/etc/shadow``) or own any host file.
* **setup**: ``unshare(USER | NS | NET | PID | IPC)``; becomes namespace root; makes every
  mount read-only (``mount_setattr(AT_RECURSIVE)``, Linux >= 5.12), hides ``/root``, ``/home``,
  ``/tmp``, ``/var/tmp``, ``/run``, ``/dev/shm``, ``/mnt``, ``/media`` and the paths in HIDE
  (the caller's ``$HOME`` and working directory) behind empty read-only tmpfs, re-exposes the
  Python installation read-only when it lives under one of them, mounts a fresh tmpfs at WORK
  (the only writable place), brings up loopback (the only interface of the new network
  namespace), then forks *init*.
* **init** (PID 1 of the new PID namespace): mounts that namespace's ``/proc``, forks the
  program, waits for it and exits with its status (signal ``s`` as ``128 + s``). When init
  exits the kernel kills everything left in the namespace, even processes that left the
  process group.
* **program** (PID 2): drops every capability (bounding set, ``SECBIT_NOROOT`` locked,
  ``no_new_privs``), so it can neither undo a mount nor regain privileges by ``exec``; then
  runs BOOTSTRAP (the executor's limits and ``exec`` of the program) as ``__main__``.

Any refused step exits with :data:`SETUP_FAILED` and a last stderr line
``freeformer-sandbox: <step>: <reason>``; the executor then falls back (see its docstring).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import sys

SETUP_FAILED = 75
SETUP_PREFIX = "freeformer-sandbox:"
# Always hidden (if they exist): homes, other users' temporary files and sockets, removable media.
HIDDEN = ("/root", "/home", "/tmp", "/var/tmp", "/run", "/dev/shm", "/mnt", "/media")
# Never hidden when they are the caller's working directory: kernel and system file systems.
_SYSTEM = ("/proc", "/sys", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc",
           "/boot", "/var/lib")  # fmt: skip
WORK_TMPFS_MB = 64  # size of the writable tmpfs; RLIMIT_FSIZE still caps each file

_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
NAMESPACES = _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
# 442 on x86, ARM, RISC-V, PowerPC, s390; MIPS numbers differ (the call fails: fallback).
_SYS_MOUNT_SETATTR = 442
_AT_RECURSIVE, _MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x8000, 0x1, 0x2
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS = 24, 28, 38
# SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP (both locked), SECBIT_KEEP_CAPS_LOCKED
_SECURE_BITS = 0x1 | 0x2 | 0x4 | 0x8 | 0x20
_NOBODY = 65534

_libc = None  # the C library, loaded by main(): importing this module works on any system


def _load_libc() -> None:
    global _libc
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    _libc.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A step the kernel refused; the message names the step."""


def _check(ret: int, step: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{step}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def _mount(src, target, fstype, flags, data=None, step="mount"):
    enc = [None if s is None else os.fsencode(s) for s in (src, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"{step} {target}")


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def python_dirs() -> list[str]:
    """Directories the interpreter needs (prefixes, the executable's), symlinks resolved."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(sys.executable)}  # fmt: skip
    out = set()
    for d in dirs:
        if d:
            out.add(os.path.abspath(d))
            out.add(os.path.realpath(d))
    out.add(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted(out)


def plan(extra_hidden: list[str], work: str) -> tuple[list[str], list[str]]:
    """(directories to hide, Python directories to re-expose inside them), outermost first."""
    hide: list[str] = []
    pydirs = python_dirs()
    for p in sorted({*HIDDEN, *extra_hidden}, key=len):
        if not p or not os.path.isabs(p) or os.path.islink(p) or not os.path.isdir(p):
            continue
        p = os.path.realpath(p)
        if p not in HIDDEN and any(_under(p, s) for s in _SYSTEM):
            continue  # a caller's cwd among system files: hiding it could break Python
        if p == "/" or any(_under(p, d) for d in pydirs):
            continue  # the Python installation itself (e.g. cwd in the venv) stays
        if not any(_under(p, h) for h in hide):
            hide.append(p)
    expose = [d for d in pydirs if any(_under(d, h) and d != h for h in hide)]
    expose = [d for d in expose if not any(_under(d, e) and d != e for e in expose)]
    return hide, expose


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _loopback_up() -> None:
    # SIOCGIFFLAGS / SIOCSIFFLAGS on "lo", the new namespace's only interface (it starts down).
    # Through libc: importing socket and fcntl would cost more than the whole set-up.
    fd = _libc.socket(2, 2, 0)  # AF_INET, SOCK_DGRAM
    if fd < 0:
        _check(-1, "socket")
    try:
        req = ctypes.create_string_buffer(b"lo", 40)  # struct ifreq: name[16], flags, padding
        _check(_libc.ioctl(fd, 0x8913, req), "ioctl SIOCGIFFLAGS lo")
        flags = struct.unpack_from("h", req, 16)[0] | 0x1  # IFF_UP
        struct.pack_into("h", req, 16, flags)
        _check(_libc.ioctl(fd, 0x8914, req), "ioctl SIOCSIFFLAGS lo")
    finally:
        os.close(fd)


def _readonly_everything() -> None:
    attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(
        _SYS_MOUNT_SETATTR, -100, b"/", _AT_RECURSIVE, buf, ctypes.c_size_t(len(attr))
    )  # -100: AT_FDCWD
    _check(0 if ret == 0 else -1, "mount_setattr / read-only")


def _setup_mounts(work: str, hide: list[str], expose: list[str], expose_fds: dict) -> None:
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, step="make private")
    _readonly_everything()
    for h in hide:
        _mount("tmpfs", h, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755", step="hide")
    for d in expose:
        os.makedirs(d, exist_ok=True)
        _mount(f"/proc/self/fd/{expose_fds[d]}", d, None, _MS_BIND | _MS_REC, step="expose")
    os.makedirs(work, mode=0o700, exist_ok=True)
    _mount("tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={WORK_TMPFS_MB}m,mode=0700", step="work tmpfs")  # fmt: skip
    for h in hide:
        flags = _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
        _mount(None, h, None, flags, "size=1m,mode=0755", step="read-only")


def _drop_privileges() -> None:
    _check(_libc.prctl(_PR_SET_SECUREBITS, _SECURE_BITS, 0, 0, 0), "securebits")
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL past the last capability this kernel knows
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)  # two empty {effective, permitted, inheritable}
    _check(_libc.capset(ctypes.create_string_buffer(header, 8), data), "capset")
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def _fail(exc: BaseException) -> None:
    sys.stderr.write(f"{SETUP_PREFIX} {exc}\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


def _wait_status(pid: int, program: bool = False) -> int:
    """Wait for ``pid``: its exit code, or ``128 + signal``.

    For the program itself, exit codes >= 128 become 127 so they cannot pass for a signal.
    """
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    code = os.WEXITSTATUS(status)
    return 127 if program and code >= 128 else code


def _init(bootstrap: str, argv: list[str]) -> None:
    """PID 1 of the namespace: own /proc, fork the program, reap, exit with its status."""
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, step="mount")
    except SetupError as exc:
        _fail(exc)
    pid = os.fork()
    if pid == 0:
        try:
            _drop_privileges()
        except SetupError as exc:
            _fail(exc)
        sys.argv = ["-c", *argv]
        exec(compile(bootstrap, "<bootstrap>", "exec"), {"__name__": "__main__"})
        os._exit(0)
    os._exit(_wait_status(pid, program=True))


def _setup(work, hide, expose, ready_w, go_r, bootstrap, argv) -> None:
    try:
        _check(_libc.unshare(NAMESPACES), "unshare")
    except SetupError as exc:
        os.write(ready_w, b"E")
        _fail(exc)
    os.write(ready_w, b"U")
    if os.read(go_r, 1) != b"M":
        _fail(SetupError("uid map: the outer process did not write it"))
    try:
        # Opened in the new mount namespace (a bind needs a mount of it) and before any uid
        # change: real root becomes nobody, who cannot enter /root.
        expose_fds = {d: os.open(d, os.O_PATH | os.O_DIRECTORY) for d in expose}
        if os.getuid() != 0:  # mapped by a real root: become namespace root (= nobody outside)
            _check(_libc.setgroups(0, None), "setgroups")
            _check(_libc.setresgid(0, 0, 0), "setresgid")
            _check(_libc.setresuid(0, 0, 0), "setresuid")
        _setup_mounts(work, hide, expose, expose_fds)
        for fd in expose_fds.values():
            os.close(fd)
        os.chdir(work)
        _loopback_up()
    except SetupError as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - any surprise is a refused setup, never a run
        _fail(SetupError(f"setup: {type(exc).__name__}: {exc}"))
    pid = os.fork()
    if pid == 0:
        _init(bootstrap, argv)
    os._exit(_wait_status(pid))


def main(args: list[str]) -> None:
    work, program, hidden, bootstrap, *argv = args
    _load_libc()
    hide, expose = plan([p for p in hidden.split(os.pathsep) if p], work)
    program_fd = os.open(program, os.O_RDONLY)
    argv = [f"/proc/self/fd/{program_fd}", *argv]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        _setup(work, hide, expose, ready_w, go_r, bootstrap, argv)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) == b"U":
        try:
            uid, gid = os.getuid(), os.getgid()
            outer_uid, outer_gid = (_NOBODY, _NOBODY) if uid == 0 else (uid, gid)
            if uid != 0:
                _write(f"/proc/{pid}/setgroups", "deny")
            _write(f"/proc/{pid}/uid_map", f"0 {outer_uid} 1\n")
            _write(f"/proc/{pid}/gid_map", f"0 {outer_gid} 1\n")
            os.write(go_w, b"M")
        except OSError as exc:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            _fail(SetupError(f"uid map: {exc}"))
    code = _wait_status(pid)
    if 128 < code < 128 + signal.NSIG:
        # Die of the program's signal, so the executor classifies it as it always has.
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            signal.signal(code - 128, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL: cannot be and need not be reset
        os.kill(os.getpid(), code - 128)
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
