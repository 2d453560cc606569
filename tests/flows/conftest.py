"""Fixtures of the flow tests: an isolated mecsplit home with the tiny model, a Prefect test server."""

from __future__ import annotations

import os
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
    if saved is None:
        os.environ.pop("MECSPLIT_HOME", None)
    else:
        os.environ["MECSPLIT_HOME"] = saved
    os.environ.pop("MECSPLIT_SEGMENTS__GATEWAY_PORT", None)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect server (SQLite) for the whole session; its API URL is exported."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        saved = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        yield url
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
