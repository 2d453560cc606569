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


def _exit_on_signal(signum: int, _frame: object) -> None:
    # A second signal must not cut short the cleanup the first one started (a supervisor often sends
    # SIGTERM twice; Ctrl-C gets pressed twice): ignore both from now on; SIGKILL still ends us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def exit_cleanly_on_signals() -> None:
    """SIGTERM and SIGINT become SystemExit, so that ``finally`` blocks and ``with`` exits run and remove
    what a command started (containers, namespaces, processes); by default SIGTERM ends Python at once."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
