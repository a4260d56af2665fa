"""Process helpers shared by the CLI and the worker."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: the kernel sends ``sig`` to this process when its parent dies, so no child
    outlives the command that started it. Elsewhere a no-op (leases still stop orphans)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def _pid_namespace() -> str:
    """The PID namespace's inode: two containers may share a host name, never this."""
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return "0"


def local_owner_prefix() -> str:
    """``host:pid-namespace:``, the start of every lease holder on this machine."""
    return f"{socket.gethostname()}:{_pid_namespace()}:"


def process_identity(token: str) -> str:
    """``host:pid-namespace:pid:token``: who holds a lease, precise enough that a worker on the
    same machine can tell the holder is gone."""
    return f"{local_owner_prefix()}{os.getpid()}:{token}"


def holder_is_gone(owner: str | None) -> bool:
    """True only when ``owner`` names a process on this machine (same host and PID namespace)
    that no longer exists. Anything else (another machine, a live or unknown process) waits
    for its lease to run out."""
    if not owner:
        return False
    parts = owner.split(":")
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    host, namespace, pid, _ = parts
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "0":
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False
