"""Measure what users see: time to first token and per-token latency, streamed through the gateway."""

from __future__ import annotations

import itertools
import json
import secrets
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mecsplit.files import write_atomic
from mecsplit.settings import get_settings


@dataclass(frozen=True)
class StreamSample:
    ttft_s: float
    token_gaps_s: tuple[float, ...]  # gap before each token after the first
    tokens: int
    text: str
    started_at_s: float  # wall clock (time.time) at request start

    @property
    def tpot_s(self) -> float:
        return statistics.median(self.token_gaps_s) if self.token_gaps_s else float("nan")


def sse_chunks(response: httpx.Response, gateway_url: str) -> Iterator[dict[str, Any]]:
    """The JSON chunks of the gateway's server-sent event stream; an error chunk raises."""
    response.raise_for_status()
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:
            raise RuntimeError(f"the gateway at {gateway_url} failed mid-stream: {chunk['error']['message']}")
        yield chunk


def gateway_headers() -> dict[str, str]:
    """What this project's own clients send with a ``/v1`` request: the API key where one is set
    (``MECSPLIT_SEGMENTS__API_KEY``, the same setting the gateway enforces)."""
    key = get_settings().segments.api_key
    return {} if key is None else {"Authorization": f"Bearer {key}"}


ADMIN_TOKEN_FILE = "admin-token"


def admin_token_path() -> Path:
    return get_settings().run_dir / ADMIN_TOKEN_FILE


def admin_token() -> str:
    """The token a gateway's ``/admin`` routes want: one per ``MECSPLIT_HOME`` (mode 0600), made on first
    use. The backends hand it to every gateway they start; this project's own clients send it."""
    path = admin_token_path()
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        write_atomic(path, secrets.token_hex(32) + "\n", mode=0o600)
        return path.read_text().strip()


def admin_headers() -> dict[str, str]:
    """What this project's own clients send with an ``/admin`` request."""
    return {"Authorization": f"Bearer {admin_token()}"}


def stream_completion(
    gateway_url: str, prompt: str, max_tokens: int, *, timeout_s: float = 300.0, seed: int = 0
) -> StreamSample:
    """One greedy streamed chat completion; each SSE chunk is one token's text (held-back bytes excepted).

    The chat endpoint applies the model's chat template: an instruct model asked a bare prompt often ends
    at once, which would measure nothing."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "seed": seed}  # fmt: skip
    started_wall = time.time()
    started = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    url = f"{gateway_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=timeout_s, headers=gateway_headers()) as response:
        for chunk in sse_chunks(response, gateway_url):
            text = chunk["choices"][0]["delta"].get("content", "") if chunk["choices"] else ""
            if text:
                stamps.append(time.perf_counter())
                pieces.append(text)
    if not stamps:
        raise RuntimeError(f"the gateway at {gateway_url} streamed no token")
    gaps = tuple(b - a for a, b in itertools.pairwise(stamps))
    return StreamSample(
        ttft_s=stamps[0] - started, token_gaps_s=gaps, tokens=len(stamps), text="".join(pieces),
        started_at_s=started_wall,
    )  # fmt: skip
