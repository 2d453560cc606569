"""Mininet node shells with deadlines: a dead or stuck shell is an error naming the node, never a hang.

Mininet talks to each node through an interactive ``bash`` behind a pty (``mnexec ... bash -is
mininet:<name>``): ``cmd`` writes a line and reads until the prompt sentinel (chr 127) comes back. Its
reads have no timeout and its parent keeps the pty's slave end open, so when the shell dies the master
never reports end of file and ``cmd`` (and the prompt wait in ``startShell``) blocks forever. That is
how ``mecsplit bench links`` hung on a fresh machine: ``mnexec -a PID`` chdirs into the caller's working
directory inside the container's mount namespace, which the container lacks when the command is run
from outside the bind-mounted checkout; mnexec exits ("chdir: No such file or directory") and stays a
zombie nobody reaps.

:class:`DeadlineShell` is mixed into the testbed's Mininet node classes (``testbed.net``) so that every
command Mininet or the testbed sends into a node's shell (interface setup, addresses, routes, teardown)
goes through :func:`run_in_shell`: it polls with a deadline, checks that the shell process is alive, and
raises :class:`MininetShellError` with the node, the command and what the shell last printed.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import time
from typing import Any

from testbed.errors import TestbedError

# Mininet's prompt, set through PS1: the end of a command's output.
SENTINEL = chr(127)
# How often a waiting command re-checks its shell and its deadline.
POLL_S = 0.1
# After a deadline passes: how long Ctrl-C gets to bring the prompt back before the shell is killed.
INTERRUPT_GRACE_S = 1.0
# How long a shell gets to exit after SIGHUP before SIGKILL (Mininet waits forever).
TERMINATE_GRACE_S = 5.0
# What an error quotes of the shell's output.
ERROR_OUTPUT_CHARS = 400


class MininetShellError(TestbedError):
    """A Mininet node's shell died, or a command in it ran past its deadline."""


def _argv_text(args: tuple[Any, ...]) -> str:
    """Mininet's ``cmd`` takes a string, a list, or several words: one command line (as ``sendCmd``)."""
    if len(args) == 1 and isinstance(args[0], list):
        args = tuple(args[0])
    return " ".join(str(a) for a in args)


def _exit_status(node: Any) -> int | None:
    """The shell's exit status (reaping a zombie), or None while it runs."""
    shell: subprocess.Popen[bytes] | None = node.shell
    return -1 if shell is None else shell.poll()


def _read_available(node: Any, timeout_s: float) -> str:
    """What the shell printed within ``timeout_s`` ("" if nothing). The pty is non-blocking (see
    ``DeadlineShell.startShell``): once the shell is gone, poll reports a hang-up on which a blocking read
    would wait forever, which is how Mininet's own ``monitor`` hangs."""
    if node.readbuf:
        data, node.readbuf = node.readbuf, ""
        return str(data)
    events = _poller(node).poll(max(0, int(timeout_s * 1000)))
    if not any(mask & select.POLLIN for _, mask in events):
        if events:
            time.sleep(min(timeout_s, POLL_S))  # a bare hang-up: do not spin; the caller checks the shell
        return ""
    try:
        return str(node.decoder.decode(os.read(node.stdout.fileno(), 1024)))
    except (BlockingIOError, InterruptedError):
        return ""
    except OSError:
        return ""  # EIO: the pty's other side is gone; the caller finds the shell dead


def _poller(node: Any) -> select.poll:
    """A poll on the shell's pty for input only: Mininet's ``pollOut`` also asks for POLLOUT, which a
    pty almost always is, so it never waits (Mininet then blocks in ``read`` instead)."""
    poller = node.__dict__.get("_input_poll")
    if poller is None:
        poller = select.poll()
        poller.register(node.stdout.fileno(), select.POLLIN | select.POLLPRI)
        node._input_poll = poller
    return poller


def _pending_output(node: Any) -> str:
    """Whatever the shell printed and nobody read yet, without blocking (for error messages)."""
    chunks = []
    with contextlib.suppress(ValueError):
        while chunk := _read_available(node, 0.0):
            chunks.append(chunk)
    return "".join(chunks).replace(SENTINEL, "").strip()[-ERROR_OUTPUT_CHARS:]


def _dead_error(node: Any, command: str, status: int | None, output: str) -> MininetShellError:
    said = f"; it printed: {output!r}" if output else ""
    return MininetShellError(
        f"the Mininet shell of node {node.name} (pid {node.pid}) is dead (exit status {status}) while "
        f"running {command!r}{said}. Run `mecsplit testbed down --force` to clean up; a shell that dies "
        "at start usually means its container is gone or mnexec could not enter it"
    )


def _read_until_prompt(node: Any, command: str, deadline: float) -> str | None:
    """Output up to the prompt, or None when the deadline passes first; raises if the shell dies."""
    chunks: list[str] = []
    while node.waiting:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            return None
        data = _read_available(node, min(remaining_s, POLL_S))
        if SENTINEL in data:
            node.waiting = False
            data = data.replace(SENTINEL, "")
        chunks.append(data)
        if node.waiting and (status := _exit_status(node)) is not None:
            output = ("".join(chunks) + _pending_output(node))[-ERROR_OUTPUT_CHARS:]
            raise _dead_error(node, command, status, output)
    return "".join(chunks)


def _give_up(node: Any, command: str, timeout_s: float) -> MininetShellError:
    """A command ran past its deadline: interrupt it, and kill the shell if the prompt does not return,
    so that the node's next command fails at once instead of waiting behind this one."""
    try:
        node.sendInt()
        back = _read_until_prompt(node, command, time.monotonic() + INTERRUPT_GRACE_S) is not None
    except (OSError, MininetShellError):
        back = False  # the shell died meanwhile: the next command says so
    if not back:
        kill_shell(node)
    return MininetShellError(
        f"command {command!r} in the Mininet shell of node {node.name} (pid {node.pid}) did not finish "
        f"within {timeout_s:g} s"
    )


def run_in_shell(node: Any, command: str, timeout_s: float) -> str:
    """Run one command line in a Mininet node's shell and return its output (like ``node.cmd``), or
    raise :class:`MininetShellError` naming the node when its shell is dead or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    status = _exit_status(node)
    if status is not None:
        raise _dead_error(node, command, status, "" if node.shell is None else _pending_output(node))
    # A command interrupted earlier (a signal while we waited) leaves its prompt still to come.
    if node.waiting and _read_until_prompt(node, "(the previous command)", deadline) is None:
        raise _give_up(node, command, timeout_s)
    try:
        node.sendCmd(command)
    except OSError as exc:  # a full pty (non-blocking): the shell stopped reading its input
        raise _dead_error(node, command, _exit_status(node), f"writing the command failed: {exc}") from None
    output = _read_until_prompt(node, command, deadline)
    if output is None:
        raise _give_up(node, command, timeout_s)
    return output


def kill_shell(node: Any, grace_s: float = 0.0) -> None:
    """End a node's shell and what it runs (its own session, ``mnexec -d``): SIGHUP, then SIGKILL."""
    shell: subprocess.Popen[bytes] | None = node.shell
    if shell is None or shell.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGHUP, grace_s), (signal.SIGKILL, TERMINATE_GRACE_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            shell.wait(timeout=wait_s)
            return


class DeadlineShell:
    """Mixin for Mininet ``Node`` subclasses: shells that start, run commands and stop with deadlines.

    ``cmd_timeout_s`` (constructor parameter) bounds each command and the shell's start.
    """

    cmd_timeout_s: float = 30.0

    def __init__(self, name: str, cmd_timeout_s: float | None = None, **params: Any) -> None:
        if cmd_timeout_s is not None:
            self.cmd_timeout_s = cmd_timeout_s
        super().__init__(name, **params)  # type: ignore[call-arg]  # Mininet's Node starts the shell here

    def startShell(self, mnopts: str | None = None) -> None:
        """Mininet's ``startShell`` with two changes: the shell starts in ``/`` (mnexec -a chdirs to the
        caller's directory inside the target's mount namespace and dies where that does not exist), and
        the wait for the first prompt has a deadline and notices a dead shell."""
        node: Any = self
        if node.shell:
            raise MininetShellError(f"node {node.name}: shell is already running")
        opts = ("-cd" if mnopts is None else mnopts) + ("n" if node.inNamespace else "")
        argv = ["mnexec", opts, "env", f"PS1={SENTINEL}", "bash", "--norc", "--noediting"]
        argv += ["-is", f"mininet:{node.name}"]
        node.master, node.slave = pty.openpty()
        node.shell = node._popen(
            argv, stdin=node.slave, stdout=node.slave, stderr=node.slave, close_fds=False, cwd="/"
        )
        os.set_blocking(node.master, False)  # reads never wait on a dead shell (_read_available)
        node.stdin = os.fdopen(node.master, "r")
        node.stdout = node.stdin
        node.pid = node.shell.pid
        node.pollOut = select.poll()
        node.pollOut.register(node.stdout)
        node.outToNode[node.stdout.fileno()] = node
        node.inToNode[node.stdin.fileno()] = node
        node.execed, node.lastCmd, node.lastPid, node.readbuf = False, None, None, ""
        node._input_poll = None  # a new pty: _poller registers it
        node.waiting = True  # until the first prompt
        try:
            if _read_until_prompt(node, "(shell start)", time.monotonic() + self.cmd_timeout_s) is None:
                raise _give_up(node, "(shell start)", self.cmd_timeout_s)
        except MininetShellError:
            # Mininet's constructor fails with us: nobody else will end the shell or close the pty.
            kill_shell(node)
            node.outToNode.pop(node.master, None)
            node.inToNode.pop(node.master, None)
            node.stdin.close()
            os.close(node.slave)
            node.shell = None
            raise
        # Mininet's own start-up line: no history file, no echo, no job-control notices.
        self.cmd("unset HISTFILE; stty -echo; set +m")

    def cmd(self, *args: Any, **_kwargs: Any) -> str:
        """Every command into this node (the testbed's and Mininet's own) runs with the deadline."""
        return run_in_shell(self, _argv_text(args), self.cmd_timeout_s)

    def terminate(self) -> None:
        """Mininet's ``terminate`` waits for the shell without a limit: stop it with one first."""
        kill_shell(self, grace_s=TERMINATE_GRACE_S)
        super().terminate()  # type: ignore[misc]  # closes the pty; the shell is reaped already
