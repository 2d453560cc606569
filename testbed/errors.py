"""Typed errors of the testbed runtime; each message says what to do."""

from __future__ import annotations


class TestbedError(RuntimeError):
    """Base class of the testbed's runtime errors."""


class NotRootError(TestbedError):
    """The emulated testbed needs root (namespaces, tc, iptables, cgroups)."""


class TestbedNotRunningError(TestbedError):
    """No testbed daemon answers for this settings home."""


class TestbedAlreadyRunningError(TestbedError):
    """A testbed daemon is already up for this settings home / prefix."""


class UnknownNodeError(TestbedError):
    """A node or link named in a request is not part of the running scenario."""
