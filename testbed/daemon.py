"""The long-lived testbed daemon: owns the emulated network and serves a token-protected API on localhost.

Prefect runs each flow run in a fresh subprocess, so no flow can own a live network; this process does.
``mecsplit testbed up`` starts it detached (``python -m testbed.daemon --scenario F``); it writes
``<run_dir>/daemon.pid`` at once and ``<run_dir>/state.json`` (port, token, scenario) when the network
is up, logs to ``<run_dir>/daemon.log`` (progress lines start with ``progress:``), and tears everything
down on SIGTERM or ``POST /down``. After a SIGKILL, ``mecsplit testbed down --force`` cleans up by prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from testbed.errors import TestbedError, UnknownNodeError

log = logging.getLogger("testbed.daemon")

STATE_FILE = "state.json"
PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


class SetLink(BaseModel):
    a: str
    b: str
    bw_mbit: float | None = Field(default=None, gt=0)
    delay_ms: float | None = Field(default=None, ge=0)
    loss_pct: float | None = Field(default=None, ge=0, lt=100)
    direction: str = Field(default="both", pattern="^(both|a_to_b|b_to_a)$")


class SetLoad(BaseModel):
    node: str
    pct: float = Field(ge=0, le=100)


class NodeRef(BaseModel):
    node: str


class Deploy(BaseModel):
    node: str
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = {}
    port: int | None = None
    mem_bytes: int | None = Field(default=None, gt=0)
    files: dict[str, str] = {}  # name -> text, mounted read-only in the container (credentials)
    cpus: float | None = Field(default=None, ge=0.01, le=64)  # a cap of its own inside the node's quota


class StopSegment(BaseModel):
    node: str
    name: str
    timeout_s: float = 10.0


class SegmentRef(BaseModel):
    node: str
    name: str


class Exec(BaseModel):
    node: str
    command: list[str] = Field(min_length=1)
    timeout_s: float = 60.0


class Measure(BaseModel):
    a: str
    b: str
    seconds: float = Field(default=2.0, gt=0, le=60)
    pings: int = Field(default=10, ge=0, le=1000)
    warmup_s: float = Field(default=0.5, ge=0)
    bin_s: float = Field(default=0.1, gt=0)


def build_app(testbed: Any, token: str, shutdown: threading.Event) -> Any:
    from fastapi import Depends, FastAPI, Header, HTTPException

    def auth(authorization: str = Header(default="")) -> None:
        if not secrets.compare_digest(authorization, f"Bearer {token}"):
            raise HTTPException(status_code=401, detail="bad or missing token (read it from state.json)")

    app = FastAPI(title="mecsplit testbed", dependencies=[Depends(auth)])

    def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnknownNodeError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from None
        except (TestbedError, ValueError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    @app.get("/status")
    def status() -> dict[str, Any]:
        return testbed.status()

    @app.get("/monitor")
    def monitor() -> dict[str, Any]:
        return testbed.monitor()

    @app.post("/link")
    def set_link(req: SetLink) -> dict[str, Any]:
        return call(testbed.set_link, req.a, req.b, req.bw_mbit, req.delay_ms, req.loss_pct, req.direction)

    @app.post("/load")
    def set_load(req: SetLoad) -> dict[str, Any]:
        return call(testbed.set_load, req.node, req.pct)

    @app.post("/fail")
    def fail(req: NodeRef) -> dict[str, Any]:
        return call(testbed.fail, req.node)

    @app.post("/restore")
    def restore(req: NodeRef) -> dict[str, Any]:
        return call(testbed.restore, req.node)

    @app.post("/replay/start")
    def replay_start() -> dict[str, Any]:
        return call(testbed.replay_start)

    @app.post("/replay/stop")
    def replay_stop() -> dict[str, Any]:
        return call(testbed.replay_stop)

    @app.post("/segments")
    def deploy(req: Deploy) -> dict[str, Any]:
        return call(
            testbed.deploy_segment,
            req.node, req.name, req.command, req.env, req.port, req.mem_bytes, req.files, req.cpus,
        )  # fmt: skip

    @app.post("/segments/uncap")
    def uncap(req: SegmentRef) -> dict[str, Any]:
        return call(testbed.uncap_segment, req.node, req.name)

    @app.post("/segments/stop")
    def stop_segment(req: StopSegment) -> dict[str, Any]:
        return call(testbed.stop_segment, req.node, req.name, req.timeout_s)

    @app.get("/segments/{node}/{name}/logs")
    def segment_logs(node: str, name: str) -> dict[str, Any]:
        return {"logs": call(testbed.segment_logs, node, name)}

    @app.post("/exec")
    def exec_in(req: Exec) -> dict[str, Any]:
        return call(testbed.exec_in_node, req.node, req.command, req.timeout_s)

    @app.post("/measure")
    def measure(req: Measure) -> dict[str, Any]:
        return call(testbed.measure_link, req.a, req.b, req.seconds, req.pings, req.warmup_s, req.bin_s)

    @app.post("/down")
    def down() -> dict[str, Any]:
        shutdown.set()
        return {"stopping": True}

    return app


def serve(scenario_path: Path) -> int:
    import uvicorn

    from mecsplit.settings import Settings
    from testbed.runtime import Testbed
    from testbed.scenario import load_scenario

    settings = Settings()
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_private(run_dir / PID_FILE, f"{os.getpid()}\n")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    def progress(msg: str) -> None:
        print(f"progress: {msg}", file=sys.stderr, flush=True)

    scenario = load_scenario(scenario_path)
    testbed = Testbed(scenario, settings, run_dir, progress)
    shutdown = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: shutdown.set())
    signal.signal(signal.SIGINT, lambda *_: shutdown.set())
    try:
        testbed.up()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.testbed.api_host, settings.testbed.api_port))
        sock.listen(64)
        port = sock.getsockname()[1]
        token = secrets.token_urlsafe(24)
        app = build_app(testbed, token, shutdown)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="api", daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.02)
        state = {
            "pid": os.getpid(), "host": settings.testbed.api_host, "port": port, "token": token,
            "scenario": scenario.name, "scenario_path": str(Path(scenario_path).resolve()),
            "prefix": settings.testbed.prefix, "started_at": time.time(), "ready": True,
        }  # fmt: skip
        _write_private(run_dir / STATE_FILE, json.dumps(state, indent=2))
        progress(f"ready: API on {settings.testbed.api_host}:{port}")
        shutdown.wait()
        progress("stopping")
        server.should_exit = True
        thread.join(timeout=10)
        return 0
    except Exception as exc:
        log.exception("testbed failed: %s", exc)
        return 1
    finally:
        try:
            testbed.down()
        finally:
            for name in (STATE_FILE, PID_FILE):
                (run_dir / name).unlink(missing_ok=True)
            progress("down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.daemon")
    parser.add_argument("--scenario", type=Path, required=True)
    args = parser.parse_args(argv)
    return serve(args.scenario)


if __name__ == "__main__":
    sys.exit(main())
