"""Mininet shells never hang: a dead shell or a stuck command is an error naming the node (root, Mininet).

The hosts here are plain Mininet hosts in namespaces of their own (``mnexec -n``) with the testbed's
``DeadlineShell``; the container case (a shell that must join a Docker container from a working directory
the container lacks) runs with Docker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.shell import DeadlineShell, MininetShellError

pytestmark = [pytest.mark.root, pytest.mark.mininet]

TIMEOUT_S = 3.0


def _host(name: str, **params: Any) -> Any:
    from mininet.node import Host

    class DeadlineHost(DeadlineShell, Host):
        pass

    return DeadlineHost(name, cmd_timeout_s=TIMEOUT_S, **params)


@pytest.fixture
def host() -> Iterator[Any]:
    node = _host("mecsplitsh-h1")
    try:
        yield node
    finally:
        node.terminate()
    assert node.shell is None


def test_a_command_returns_its_output(host: Any) -> None:
    assert host.cmd("echo", "hello").strip() == "hello"
    assert host.cmd(["ip", "-o", "link", "show", "lo"]).startswith("1: lo")


def test_a_dead_shell_is_an_error_naming_the_node_not_a_hang(host: Any) -> None:
    os.kill(host.pid, signal.SIGKILL)  # what a crashed mnexec/bash looks like: nobody reaped it
    time.sleep(0.1)
    t0 = time.monotonic()
    with pytest.raises(MininetShellError, match=r"node mecsplitsh-h1 .* is dead .*'ip link show'"):
        host.cmd("ip link show")
    assert time.monotonic() - t0 < TIMEOUT_S


def test_a_shell_that_dies_mid_command_is_noticed_within_the_poll(host: Any) -> None:
    t0 = time.monotonic()
    with pytest.raises(MininetShellError, match=r"mecsplitsh-h1.*is dead"):
        host.cmd("kill -9 $$")  # the shell kills itself while we wait for its prompt
    assert time.monotonic() - t0 < TIMEOUT_S


def test_a_command_past_its_deadline_is_interrupted_and_the_shell_stays_usable(host: Any) -> None:
    t0 = time.monotonic()
    with pytest.raises(MininetShellError, match=r"'sleep 30' in the Mininet shell of node mecsplitsh-h1"):
        host.cmd("sleep 30")
    assert TIMEOUT_S <= time.monotonic() - t0 < TIMEOUT_S + 2.0
    assert host.cmd("echo back").strip() == "back"  # Ctrl-C brought the prompt back


@pytest.mark.docker
def test_a_container_shell_starts_from_a_directory_the_container_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fresh-machine hang: ``mnexec -a`` chdirs to the caller's directory inside the container and
    died there; the shell now starts in ``/``."""
    from testbed.net import _mininet_classes
    from testbed.node import docker, ensure_base_image

    name = "mecsplitsh-c1"
    image = ensure_base_image("mecsplitsh")
    docker("run", "-d", "--name", name, "--network", "none", "-v", "/usr:/usr:ro", image, "/usr/bin/sleep",
           "infinity")  # fmt: skip
    try:
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", name).strip())
        monkeypatch.chdir(tmp_path)  # not mounted in the container
        container_host, _ = _mininet_classes()
        node = container_host(name, container_pid=pid, cmd_timeout_s=TIMEOUT_S)
        try:
            assert node.cmd("ip -o link show lo").startswith("1: lo")
            assert node.cmd("pwd").strip() == "/"
        finally:
            node.terminate()
    finally:
        docker("rm", "-f", name, check=False)
        subprocess.run(["docker", "rmi", image], capture_output=True, timeout=60)
