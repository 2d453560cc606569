"""The users a scenario describes: open-loop arrivals, think times and request lengths, sent for real."""

from __future__ import annotations

import itertools
import json
import random
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from flows.arrivals import CORPUS, LENGTH_CAP, lengths, poisson_arrivals, prompt_text
from flows.workload import ChatSession, OpenLoopClients, users
from testbed.scenario import Workload


def test_poisson_arrivals_come_at_the_rate_and_repeat_with_the_seed() -> None:
    w = Workload(arrivals="poisson", request_rate_per_s=4.0, lengths="lognormal", prompt_tokens=64)
    first = list(itertools.islice(poisson_arrivals(w, seed=3), 4000))
    assert first == list(itertools.islice(poisson_arrivals(w, seed=3), 4000))
    assert first != list(itertools.islice(poisson_arrivals(w, seed=4), 4000))
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(first)]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: sd = mean
    words = sorted(r.prompt_words for r in first)
    assert statistics.median(words) == pytest.approx(64, rel=0.1)
    assert max(words) <= 64 * LENGTH_CAP and min(words) >= 1
    assert words[int(0.9 * len(words))] > 2.5 * 64  # heavy-tailed: the 90th percentile is far out


def test_the_bundled_prompts_stay_the_default() -> None:
    w = Workload(max_new_tokens=12)
    assert lengths(w, random.Random(0)) == (0, 12)
    assert prompt_text(0, 1) == "Write a short haiku about a city at night."
    assert len(prompt_text(300, 5).split()) == 300 and prompt_text(3, 0) == " ".join(CORPUS[:3])


def test_a_workload_that_names_no_known_arrivals_is_refused() -> None:
    with pytest.raises(ValueError, match="arrivals"):
        Workload(arrivals="bursty")  # type: ignore[arg-type]


class _Gateway(BaseHTTPRequestHandler):
    """A stand-in gateway on loopback: streams ``max_tokens`` tokens, or refuses with 429 when told to."""

    refuse = False
    delay_s = 0.0
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if type(self).refuse:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(body["max_tokens"]):
            time.sleep(type(self).delay_s)
            finish = "length" if i == body["max_tokens"] - 1 else None
            chunk = {"choices": [{"delta": {"content": "x"}, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[type[_Gateway]]:
    handler = type("Gateway", (_Gateway,), {"seen": [], "refuse": False, "delay_s": 0.0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()
    thread.join()


def test_open_loop_requests_arrive_whatever_the_service_and_refusals_lose_nothing(gateway) -> None:  # type: ignore[no-untyped-def]
    w = Workload(
        arrivals="poisson", request_rate_per_s=40.0, sessions=64, max_new_tokens=3, lengths="lognormal"
    )
    (clients,) = users(gateway.url, w, seed=1)
    assert isinstance(clients, OpenLoopClients)
    clients.start()
    time.sleep(0.5)
    gateway.refuse = True
    time.sleep(0.5)
    clients.stop()
    expected = sum(1 for r in itertools.takewhile(lambda r: r.at_s < 1.0, poisson_arrivals(w, seed=1)))
    assert len(clients.records) >= 0.8 * expected  # every arrival sent, give or take the stop's timing
    served = [r for r in clients.records if not r.refused]
    refused = [r for r in clients.records if r.refused]
    assert served and refused and not clients.errors
    assert all(r.received == r.asked and r.lost == 0 for r in served)
    assert all(r.lost == 0 and r.received == 0 for r in refused)
    asked = sorted(b["max_tokens"] for b in gateway.seen)
    assert len(set(asked)) > 1  # lengths drawn per request


def test_arrivals_beyond_the_clients_cap_are_counted_not_sent(gateway) -> None:  # type: ignore[no-untyped-def]
    gateway.delay_s = 0.2  # each request holds for 0.6 s: one in flight at a time
    w = Workload(arrivals="poisson", request_rate_per_s=20.0, sessions=1, max_new_tokens=3)
    (clients,) = users(gateway.url, w, seed=2)
    clients.start()
    time.sleep(1.0)
    clients.stop()
    assert isinstance(clients, OpenLoopClients)
    assert 1 <= len(clients.records) <= 3 and clients.not_sent >= 10


def test_a_refused_user_comes_back_after_the_gateways_retry_after(gateway) -> None:  # type: ignore[no-untyped-def]
    gateway.refuse = True  # Retry-After: 1
    chat = ChatSession(gateway.url, max_tokens=2)
    chat.start()
    time.sleep(2.5)
    assert chat.stop(timeout_s=5.0)
    assert 2 <= len(chat.records) <= 3  # at 0, 1 and maybe 2 s; without the header's wait, one per 0.5 s
    assert all(r.refused and r.retry_after_s == 1.0 and r.lost == 0 for r in chat.records)
