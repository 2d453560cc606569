"""Fixtures of the flow tests: an isolated mecsplit home with the tiny model, a Prefect test server."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
TINY_SCENARIO = DATA / "tiny.yaml"


@pytest.fixture(scope="session")
def flows_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """MECSPLIT_HOME in a temporary folder (state, logs, store) with llama-tiny prepared."""
    from mecsplit.settings import get_settings
    from segments import store

    home = tmp_path_factory.mktemp("mecsplit-home")
    saved = os.environ.get("MECSPLIT_HOME")
    os.environ["MECSPLIT_HOME"] = str(home)
    os.environ["MECSPLIT_SEGMENTS__GATEWAY_PORT"] = "0"
    get_settings.cache_clear()
    store.prepare("llama-tiny", get_settings().store_dir, progress=False)
    yield home
    from flows.runtime import stop_local_processes

    stop_local_processes(get_settings())  # whatever a failed test left running, by recorded PID
    if saved is None:
        os.environ.pop("MECSPLIT_HOME", None)
    else:
        os.environ["MECSPLIT_HOME"] = saved
    os.environ.pop("MECSPLIT_SEGMENTS__GATEWAY_PORT", None)
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[str]:
    """Prefect's test harness (a temporary API server on SQLite, no UI) for one test module."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield _exported(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def prefect_ui_server(flows_home: Path) -> Iterator[str]:
    """The real local server mecsplit starts for users (with the UI), on a free port, for one module."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_server import ensure_server, stop_server
    from mecsplit.settings import get_settings

    os.environ["MECSPLIT_FLOWS__PREFECT_PORT"] = str(_free_port())
    get_settings.cache_clear()
    server = ensure_server(get_settings(), timeout_s=120)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield _exported(server.api_url)
    finally:
        stop_server(get_settings())
        os.environ.pop("MECSPLIT_FLOWS__PREFECT_PORT", None)
        get_settings.cache_clear()


def _exported(url: str) -> str:
    # Subprocesses (mecsplit serve, flow runs) read the API address from the environment.
    os.environ["PREFECT_API_URL"] = url
    return url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True, scope="module")
def _forget_api_url() -> Iterator[None]:
    yield
    os.environ.pop("PREFECT_API_URL", None)
