"""The gateway as a long-lived process over an existing chain (what deployments start on the source node).

``python -m segments.gatewayd --store DIR --model M --chain-json '{"model":..., "hops": [...]}' --host H
--port P`` (credentials from ``--tls-dir DIR``, or a secret from ``--secret-file`` or ``MECSPLIT_SECRET``)
serves the OpenAI-compatible API of
:mod:`segments.gateway` and prints one JSON line ``{"ready": true, "port": P, "pid": ...}`` once it accepts
connections (port 0 binds a free port and names it there). Later chains arrive by ``POST /admin/chain``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from segments.auth import Credentials
from segments.client import Chain


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m segments.gatewayd", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, required=True, help="segment store (for the tokenizer)")
    p.add_argument("--model", required=True)
    p.add_argument("--chain-json", required=True, help="the initial chain, as Chain.to_dict() JSON")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--tls-dir", type=Path, default=None, help="the gateway's TLS credentials folder (segments.pki)"
    )
    p.add_argument("--secret-file", type=Path, default=None)
    p.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help="the /admin routes want 'Authorization: Bearer <the file's token>' (without it: open)",
    )
    p.add_argument(
        "--admin-host",
        default=None,
        help="the /admin routes answer only connections that arrive at this local address (the "
        "management network's); elsewhere they do not exist (404). Without it: every address",
    )
    return p.parse_args(argv)


def add_health_route(app: Any, gateway: Any, timeout_s: float = 5.0) -> None:
    """``GET /admin/health``: 200 with every hop's stats, or 503 naming what is unreachable (a dead
    segment leaves the chain unusable; the reconfigure flow then rebuilds it by replay)."""
    from fastapi.responses import JSONResponse

    @app.get("/admin/health")
    async def health() -> Any:
        try:
            hops = await asyncio.wait_for(gateway.client.stats(), timeout_s)
        except Exception as exc:  # any failure means: this chain cannot serve
            return JSONResponse({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, status_code=503)
        return {"ok": True, "hops": hops}


# How long an idle client connection stays open: longer than the idle expiry of common HTTP clients'
# pools (httpx 5 s, aiohttp 15 s). At uvicorn's 5 s, equal to httpx's, a client can reuse a pooled
# connection just as the gateway closes it, and the request fails with a read error before the gateway
# sees it: the likely cause of the 2 read errors in one 10-minute soak (one a well-behaved request).
KEEP_ALIVE_S = 30


async def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mecsplit.settings import get_settings
    from segments.gateway import Gateway, create_app

    chain = Chain.from_dict(json.loads(args.chain_json))
    seg = get_settings().segments
    gateway = Gateway.from_store(
        chain,
        Credentials.load(args.tls_dir, args.secret_file),
        args.store,
        args.model,
        recover_timeout_s=seg.recover_timeout_s,
        abandon_after_s=seg.abandon_after_s,
        prefill_chunk_tokens=seg.prefill_chunk_tokens,
    )
    admin_token = args.admin_token_file.read_text().strip() if args.admin_token_file else None
    app = create_app(gateway, api_key=seg.api_key, admin_token=admin_token, admin_host=args.admin_host)
    add_health_route(app, gateway)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            return task.result() or 1
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": True, "port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await task
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        return asyncio.run(_serve(args))
    except Exception as exc:
        print(json.dumps({"ready": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
