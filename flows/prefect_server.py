"""The Prefect API mecsplit talks to.

If ``PREFECT_API_URL`` points at a server (the user's own ``prefect server`` or a PostgreSQL-backed one),
that server is used as it is. Otherwise mecsplit starts Prefect's own local server (SQLite, UI bundled)
in the background, once, with its home under the mecsplit home, and records its PID so that only that
process is ever stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mecsplit.files import write_json
from mecsplit.process import pid_alive, stop_pid
from mecsplit.settings import Settings, get_settings


class PrefectServerError(RuntimeError):
    """The Prefect API could not be reached or started."""


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    pid: int | None  # None when the server is not ours (PREFECT_API_URL given by the user)

    def env(self) -> dict[str, str]:
        """Environment that points Prefect clients (and served flow runs) at this server."""
        return {"PREFECT_API_URL": self.api_url}


def _state_file(settings: Settings) -> Path:
    return settings.run_dir / "prefect-server.json"


def server_env(settings: Settings) -> dict[str, str]:
    """Environment for the embedded server process: its own home, no telemetry (machines are offline)."""
    home = settings.home / "prefect"
    port = settings.flows.prefect_port
    return {
        "PREFECT_HOME": str(home),
        # The UI asks its settings endpoint where the API is; without this it says port 4200 whatever
        # port the server runs on.
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    }


def api_healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def _read_state(settings: Settings) -> PrefectServer | None:
    path = _state_file(settings)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    server = PrefectServer(api_url=data["api_url"], ui_url=data["ui_url"], pid=data["pid"])
    if server.pid is not None and pid_alive(server.pid) and api_healthy(server.api_url):
        return server
    return None


def ensure_server(settings: Settings | None = None, *, timeout_s: float = 60.0) -> PrefectServer:
    """Return a healthy Prefect API, starting the embedded local server if needed."""
    settings = settings or get_settings()
    user_url = os.environ.get("PREFECT_API_URL")
    if user_url:
        if not api_healthy(user_url):
            raise PrefectServerError(
                f"PREFECT_API_URL={user_url} does not answer /health; start that server or unset the "
                "variable to let mecsplit start its own local one"
            )
        return PrefectServer(api_url=user_url, ui_url=user_url.removesuffix("/api"), pid=None)
    running = _read_state(settings)
    if running is not None:
        return running
    return _start(settings, timeout_s=timeout_s)


def _start(settings: Settings, *, timeout_s: float) -> PrefectServer:
    port = settings.flows.prefect_port
    api_url = f"http://127.0.0.1:{port}/api"
    if api_healthy(api_url):
        raise PrefectServerError(
            f"something else already serves a Prefect API on port {port}; set PREFECT_API_URL={api_url} "
            f"to use it, or MECSPLIT_FLOWS__PREFECT_PORT to another port"
        )
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.run_dir / "prefect-server.log"
    env = {**os.environ, **server_env(settings)}
    env.pop("PREFECT_API_URL", None)
    prefect_bin = Path(sys.executable).with_name("prefect")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(prefect_bin), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # outlives the command that started it; stopped by PID
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PrefectServerError(f"prefect server exited with {proc.returncode}; see {log_path}")
        if api_healthy(api_url):
            server = PrefectServer(api_url=api_url, ui_url=f"http://127.0.0.1:{port}", pid=proc.pid)
            write_json(
                _state_file(settings), {"api_url": server.api_url, "ui_url": server.ui_url, "pid": server.pid}
            )
            return server
        time.sleep(0.5)
    proc.terminate()
    raise PrefectServerError(f"prefect server not healthy after {timeout_s:.0f} s; see {log_path}")


def stop_server(settings: Settings | None = None, *, timeout_s: float = 15.0) -> bool:
    """Stop the embedded server mecsplit started (by its recorded PID). Returns whether one was stopped."""
    settings = settings or get_settings()
    path = _state_file(settings)
    if not path.exists():
        return False
    pid = json.loads(path.read_text()).get("pid")
    path.unlink()
    if pid is None or not pid_alive(pid):
        return False
    return stop_pid(pid, timeout_s, group=True)
