"""Ending the processes mecsplit started, by the PID it recorded (never by name)."""

from __future__ import annotations

import contextlib
import os
import signal
import time


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs; reaps it first when it is our exited child (a zombie counts as gone)."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished:
            return False
    except ChildProcessError:
        pass  # started by another process (an earlier flow run or command): probe it instead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout_s: float = 15.0, *, group: bool = False) -> bool:
    """SIGTERM ``pid`` (its whole process group with ``group``), SIGKILL what outlives ``timeout_s``.
    Returns whether it was running."""
    kill = os.killpg if group else os.kill
    try:
        kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        kill(pid, signal.SIGKILL)
    return True
