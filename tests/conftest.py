"""Shared pytest fixtures and marker gating.

Tests marked ``root``, ``docker`` or ``mininet`` run only where the machine offers that capability; CI
installs and starts everything, so there they all run. Set MECSPLIT_REQUIRE_ALL=1 to turn a missing
capability into a failure instead of a skip (CI does).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _have_root() -> bool:
    return os.geteuid() == 0


def _have_docker() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def _have_mininet() -> bool:
    return _have_root() and shutil.which("mnexec") is not None


_CHECKS = {"root": _have_root, "docker": _have_docker, "mininet": _have_mininet}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    require_all = os.environ.get("MECSPLIT_REQUIRE_ALL") == "1"
    results: dict[str, bool] = {}
    for item in items:
        for marker, check in _CHECKS.items():
            if marker not in item.keywords:
                continue
            if marker not in results:
                results[marker] = check()
            if not results[marker]:
                if require_all:
                    raise pytest.UsageError(f"MECSPLIT_REQUIRE_ALL=1 but this machine lacks '{marker}'")
                item.add_marker(pytest.mark.skip(reason=f"needs {marker}"))
