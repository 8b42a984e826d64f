"""Child process groups. Every process reap starts (vLLM, block-parallel workers) runs in its own session and
is registered here while it runs, so that the stage that started it can stop its whole group when the stage
ends on an error, Ctrl-C or SIGTERM. A process is identified by its pid *and* its start time and command
line: a pid file naming a process that ended, whose pid the system gave to another, is never signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any

import psutil

_STARTED: dict[int, subprocess.Popen] = {}


def start_group(argv: list[str], **popen: Any) -> subprocess.Popen:
    """Popen `argv` in a new session (its own process group), registered until `release` or `stop`."""
    proc = subprocess.Popen(argv, start_new_session=True, **popen)
    _STARTED[proc.pid] = proc
    return proc


def release(proc: subprocess.Popen) -> None:
    """`proc` is no longer this process's to stop (it ended, or it is a detached server that outlives us)."""
    _STARTED.pop(proc.pid, None)


def started() -> set[int]:
    return set(_STARTED)


def stop_started(keep: set[int]) -> None:
    """Stop every registered group but those in `keep` (the ones started before the stage)."""
    stop_all([_STARTED[pid] for pid in sorted(set(_STARTED) - keep)], grace=10)


def stop_all(children: list[subprocess.Popen], grace: float = 30.0) -> None:
    """`stop` several of our children: every group signalled first, then each waited for, so that an interrupt
    while one is waited for leaves none of them unsignalled."""
    for p in children:
        terminate(p)
    for p in children:
        stop(p, grace)


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM our child's whole group without waiting (`stop` waits); nothing once it is stopped and ended."""
    if proc.pid in _STARTED or proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop our child's whole group (SIGTERM, SIGKILL after `grace` s), also what is left of it after the
    leader itself ended, and reap the leader. Once stopped (released) and ended, it is left alone: its pid
    may belong to another process by then."""
    if proc.pid not in _STARTED and proc.poll() is not None:
        return
    stop_group(proc.pid, grace, proc)
    proc.wait()
    release(proc)


def stop_group(pid: int, grace: float = 30.0, child: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group of `pid`, then SIGKILL what is left after `grace` seconds. When `pid` is our
    own `child` (started by `start_group`, so the leader of its group), it is reaped while waiting: an
    unreaped (zombie) leader keeps its group alive."""
    try:
        pgid = pid if child is not None else os.getpgid(pid)
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if child is not None:
            child.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def identity(pid: int) -> dict[str, Any]:
    """What tells this process from a later one with the same pid: its start time and command line."""
    p = psutil.Process(pid)
    return {"pid": pid, "create_time": p.create_time(), "cmdline": p.cmdline()}


def is_alive(ident: dict[str, Any]) -> bool:
    """Whether the process `identity` described is still running (not merely its pid reused)."""
    try:
        p = psutil.Process(int(ident["pid"]))
        return (
            p.status() != psutil.STATUS_ZOMBIE
            and p.create_time() == ident["create_time"]
            and p.cmdline() == ident["cmdline"]
        )
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
