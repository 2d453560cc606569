"""The OpenAI-compatible gateway over a real chain, driven by the ``openai`` Python client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from wire_helpers import children_alive, num_layers

from segments.client import RECOVERIES_KEPT, AsyncChainClient, Chain, ChainClient, Hop, Recovery
from segments.gateway import ADMIT_GRACE_S, Gateway, create_app
from segments.launch import LocalChain
from segments.sampling import SamplingParams
from segments.spec import split_evenly
from segments.store import load_tokenizer

MODEL = "llama-tiny"


@pytest.fixture(scope="module")
def chains(wire_store: Path) -> Iterator[tuple[LocalChain, LocalChain]]:
    n = num_layers(wire_store, MODEL)
    with (
        LocalChain(wire_store, split_evenly(MODEL, n, 2)) as a,
        LocalChain(wire_store, split_evenly(MODEL, n, 1), secret_file=a.secret_file) as b,
    ):
        pids = a.pids + b.pids
        yield a, b
    assert children_alive(pids) == []


@contextlib.contextmanager
def _serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "gateway did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def base_url(wire_store: Path, chains: tuple[LocalChain, LocalChain]) -> Iterator[str]:
    a, _ = chains
    with _serving(create_app(Gateway.from_store(a.chain, a.secret(), wire_store, MODEL))) as url:
        yield url


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_models(base_url: str) -> None:
    assert [m.id for m in _client(base_url).models.list()] == [MODEL]


def test_openai_client_streams_a_chat_completion(base_url: str) -> None:
    client = _client(base_url)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 5
    assert finish in ("length", "stop")


def test_completions_with_seeded_sampling_repeat(base_url: str) -> None:
    client = _client(base_url)
    runs = [
        client.completions.create(model=MODEL, prompt="Edge nodes", max_tokens=6, temperature=0.9, seed=7)
        for _ in range(2)
    ]
    assert runs[0].choices[0].text == runs[1].choices[0].text
    assert runs[0].usage.completion_tokens == 6


def test_errors_have_openai_shape(base_url: str) -> None:
    client = _client(base_url)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "not served" in info.value.message
    response = httpx.post(f"{base_url}/v1/completions", json={"prompt": "x", "max_tokens": -1}, timeout=30)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_switch_between_tokens_keeps_the_tokens(
    wire_store: Path, chains: tuple[LocalChain, LocalChain]
) -> None:
    """Gateway.switch while a stream is paused between two tokens, for each move mode and both directions."""
    a, b = chains
    tokenizer = load_tokenizer(wire_store, MODEL)
    ids = tokenizer.encode("Split inference on edge nodes")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)

    async def scenario() -> list[tuple[str, str, int]]:
        gateway = Gateway(a.chain, a.secret(), tokenizer, MODEL)
        await gateway.start()
        try:
            want = "".join([d async for d, _ in gateway.stream(ids, 12, params, [], {})])
            outcomes = []
            for mode, target in (("kv", b), ("push", a), ("replay", b), ("kv", a)):
                got, moved = "", None
                async for delta, _ in gateway.stream(ids, 12, params, [], {}):
                    got += delta
                    if moved is None and got:
                        moved = await gateway.switch(target.chain, mode)  # type: ignore[arg-type]
                assert moved is not None and moved["sessions"] == 1
                outcomes.append((mode, got, len(want)))
                assert got == want, mode
            return outcomes
        finally:
            await gateway.close()

    assert len(asyncio.run(scenario())) == 4


def test_a_prepared_switch_only_tops_the_history_up(
    wire_store: Path, chains: tuple[LocalChain, LocalChain]
) -> None:
    """The controller prepares the chain it decided on; the switch that comes then recomputes only what
    the session added since, before the gate closes (nothing in the stall). A preparation for a chain
    the switch does not go to is discarded; one onto hops the old chain uses is refused."""
    a, b = chains
    tokenizer = load_tokenizer(wire_store, MODEL)
    ids = tokenizer.encode("Split inference on edge nodes")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3)

    async def scenario() -> None:
        gateway = Gateway(a.chain, a.secret(), tokenizer, MODEL)
        await gateway.start()
        try:
            want = "".join([d async for d, _ in gateway.stream(ids, 12, params, [], {})])
            assert (await gateway.prepare(a.chain, "replay"))["preparing"] is False  # the serving chain
            got, n, report = "", 0, {}
            async for delta, _ in gateway.stream(ids, 12, params, [], {}):
                got, n = got + delta, n + 1
                if n == 3:
                    assert (await gateway.prepare(b.chain, "replay"))["preparing"] is True
                if n == 6:
                    report = await gateway.switch(b.chain, "replay")
            assert got == want
            assert (report["tokens_prefilled"], report["tokens_recomputed"]) == (len(ids) + 5, 0)
            got, n = "", 0
            async for delta, _ in gateway.stream(ids, 12, params, [], {}):
                got, n = got + delta, n + 1
                if n == 2:
                    await gateway.prepare(a.chain, "push", 1)  # not the switch that comes
                if n == 4:
                    report = await gateway.switch(a.chain, "replay")
            assert got == want
            assert (report["tokens_prefilled"], report["tokens_recomputed"]) == (len(ids) + 3, 0)
        finally:
            await gateway.close()

    asyncio.run(scenario())


def test_admin_endpoint_switches_the_chain(base_url: str, chains: tuple[LocalChain, LocalChain]) -> None:
    a, b = chains
    body = {"model": MODEL, "prompt": "Split inference", "max_tokens": 8, "temperature": 0}
    before = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).json()
    moved = httpx.post(
        f"{base_url}/admin/chain", json={"chain": b.chain.to_dict(), "mode": "replay"}, timeout=120
    )
    assert moved.status_code == 200, moved.text
    assert httpx.get(f"{base_url}/admin/chain").json()["chain"] == b.chain.to_dict()
    after = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).json()
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    bad = httpx.post(f"{base_url}/admin/chain", json={"chain": {"model": MODEL, "hops": []}}, timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()
    bad = httpx.post(f"{base_url}/admin/prepare", json={"chain": {"model": MODEL, "hops": []}}, timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()
    ready = httpx.post(f"{base_url}/admin/prepare", json={"chain": a.chain.to_dict()}, timeout=30)
    assert ready.json() == {"preparing": True, "live_sessions": 0}
    httpx.post(f"{base_url}/admin/chain", json={"chain": a.chain.to_dict()}, timeout=120).raise_for_status()


def test_a_stream_survives_a_dead_segment_server(wire_store: Path) -> None:
    """A segment server dies (SIGKILL) mid-stream; the stream is held until a new chain arrives (replay)
    and then goes on with exactly the text of an undisturbed run; the gateway records the recovery."""
    import os
    import signal

    n = num_layers(wire_store, MODEL)
    tokenizer = load_tokenizer(wire_store, MODEL)
    ids = tokenizer.encode("Edge nodes come and go")
    params = SamplingParams(temperature=0.0)
    with (
        LocalChain(wire_store, split_evenly(MODEL, n, 2)) as doomed,
        LocalChain(wire_store, split_evenly(MODEL, n, 2), secret_file=doomed.secret_file) as spare,
    ):

        async def scenario() -> tuple[str, str, list[dict[str, object]]]:
            gateway = Gateway(spare.chain, spare.secret(), tokenizer, MODEL, recover_timeout_s=60.0)
            await gateway.start()
            try:
                want = "".join([d async for d, _ in gateway.stream(ids, 16, params, [], {})])
                await gateway.switch(doomed.chain, "push")
                got, replaced = "", None
                async for delta, _ in gateway.stream(ids, 16, params, [], {}):
                    got += delta
                    if replaced is None and got:
                        os.kill(doomed.pids[1], signal.SIGKILL)  # our own server, by PID
                        replaced = asyncio.create_task(gateway.switch(spare.chain, "replay"))
                assert replaced is not None
                await replaced
                client = gateway.client
                assert (client.recovered_steps, client.recovery_max_s) == (1, client.recoveries[0].recovery_s)
                return want, got, [r.to_dict() for r in client.recoveries]
            finally:
                await gateway.close()

        want, got, recoveries = asyncio.run(scenario())
    assert got == want
    assert len(recoveries) == 1 and recoveries[0]["recovery_s"] > 0  # the step after the kill, retried


def test_a_long_lived_client_keeps_the_latest_recoveries_and_counts_all() -> None:
    """A gateway that runs for days recovers steps without end: it keeps the latest RECOVERIES_KEPT for
    its admin view, and the count and the longest over all of them."""
    client = AsyncChainClient(Chain(MODEL, (Hop("127.0.0.1", 9, 0, 4),)), b"k" * 32)
    total = RECOVERIES_KEPT + 5
    for i in range(total):
        client.record_recovery(Recovery(f"s{i}", i, "hop died", recovery_s=5.0 if i == 2 else 0.1))
    assert len(client.recoveries) == RECOVERIES_KEPT
    assert client.recoveries[0].session == "s5" and client.recoveries[-1].session == f"s{total - 1}"
    assert (client.recovered_steps, client.recovery_max_s) == (total, 5.0)  # the longest was dropped


def _hop_sessions(base_url: str, secret: bytes) -> list[list[str]]:
    """The sessions each hop of the gateway's current chain holds."""
    chain = Chain.from_dict(httpx.get(f"{base_url}/admin/chain", timeout=30).json()["chain"])
    with ChainClient(chain, secret) as client:
        return [client.control(i, "sessions")[0]["sessions"] for i in range(len(chain.hops))]


def _completion(base_url: str, body: dict[str, object] | str) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(f"{base_url}/v1/completions", content=body, timeout=120,
                          headers={"content-type": "application/json"})  # fmt: skip
    return httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [5, 50_000], "max_tokens": 2}, "prompt"),  # beyond the vocabulary: broke hop 0's link
        ({"prompt": [5, 10**30], "max_tokens": 2}, "prompt"),
        ({"prompt": [5, True], "max_tokens": 2}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # was silently 16
        ('{"prompt": "x", "max_tokens": 2, "seed": 1e400}', "seed"),  # was a 500
        ({"prompt": "x", "max_tokens": 2, "seed": 2.5}, "seed"),
        ({"prompt": "x", "max_tokens": 2, "logprobs": 3}, "logprobs"),  # were silently ignored
        ({"prompt": "x", "max_tokens": 2, "echo": True}, "echo"),
        ({"prompt": "x", "max_tokens": 2, "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "max_tokens": 2, "n": 2}, "n"),
        ({"prompt": [5] * 2000, "max_tokens": 100}, "max_tokens"),  # past the context of 2048
    ],
)
def test_a_bad_request_gets_a_400_and_the_gateway_serves_on(
    base_url: str, chains: tuple[LocalChain, LocalChain], body: dict[str, object] | str, param: str
) -> None:
    response = _completion(base_url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    good = _completion(base_url, {"prompt": [5, 6], "max_tokens": 3, "temperature": 0})
    assert good.status_code == 200, good.text
    assert good.json()["usage"]["completion_tokens"] == 3
    assert _hop_sessions(base_url, chains[0].secret()) == [[], []]


def test_accepted_defaults_of_unsupported_parameters_pass(base_url: str) -> None:
    body = {"prompt": "x", "max_tokens": 2, "logprobs": None, "echo": False, "presence_penalty": 0, "n": 1}
    assert _completion(base_url, body).status_code == 200


def test_admin_and_unknown_routes_answer_in_openai_shape(base_url: str) -> None:
    for response, status in (
        (httpx.post(f"{base_url}/admin/chain", content=b"not json", timeout=30), 400),
        (httpx.post(f"{base_url}/admin/prepare", content=b"[1, 2]", timeout=30), 400),
        (httpx.get(f"{base_url}/v1/nothing-here", timeout=30), 404),
        (httpx.get(f"{base_url}/v1/completions", timeout=30), 405),
    ):
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_leaves_frees_its_session_on_every_hop(
    base_url: str, chains: tuple[LocalChain, LocalChain]
) -> None:
    """A stream read for a few tokens and closed, and a plain request whose client gave up: the gateway
    stops generating and every hop drops the session (before, the last hop kept each streamed one, and
    256 of them filled max_sessions)."""
    secret = chains[0].secret()
    body = {"prompt": "Edge nodes", "max_tokens": 1500, "temperature": 0}
    started = time.monotonic()
    whole = _completion(base_url, body).json()
    whole_s = time.monotonic() - started
    assert whole["usage"]["completion_tokens"] > 200, "the model stopped early; the test needs a long answer"
    for _ in range(3):
        with httpx.stream(
            "POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
    tokens_before = httpx.get(f"{base_url}/admin/telemetry", timeout=30).json()["tokens"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=whole_s / 10)
    deadline = time.monotonic() + 60
    while httpx.get(f"{base_url}/admin/chain", timeout=30).json()["live_sessions"]:
        assert time.monotonic() < deadline, "the sessions of clients that left are still generating"
        time.sleep(0.05)
    generated = httpx.get(f"{base_url}/admin/telemetry", timeout=30).json()["tokens"] - tokens_before
    assert generated < whole["usage"]["completion_tokens"] / 2
    deadline = time.monotonic() + 10
    while (held := _hop_sessions(base_url, secret)) != [[], []]:
        assert time.monotonic() < deadline, f"sessions left on the hops: {held}"
        time.sleep(0.05)


def test_an_api_key_guards_the_v1_routes(wire_store: Path, chains: tuple[LocalChain, LocalChain]) -> None:
    """With an API key (``MECSPLIT_SEGMENTS__API_KEY``) every /v1 route wants it as a bearer token and
    answers 401 in OpenAI's shape without it; the admin routes want their own token, which the API key
    does not open (a user of the API may not switch its chain)."""
    from starlette.testclient import TestClient

    a, _ = chains
    gateway = Gateway.from_store(a.chain, a.secret(), wire_store, MODEL)
    app = create_app(gateway, api_key="s3cret", admin_token="adm1n")
    client = TestClient(app)  # no lifespan: these answers need no chain
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        refused = client.get("/v1/models", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    refused = client.post("/v1/completions", json={"prompt": "x"})
    assert refused.status_code == 401
    allowed = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200 and allowed.json()["data"][0]["id"] == MODEL
    for headers in ({}, {"Authorization": "Bearer s3cret"}):
        refused = client.get("/admin/chain", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_admin_token"
    refused = client.post("/admin/chain", json={"chain": a.chain.to_dict()}, headers={})
    assert refused.status_code == 401
    assert client.get("/admin/chain", headers={"Authorization": "Bearer adm1n"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer adm1n"}).status_code == 401


def test_admin_routes_exist_only_on_the_management_address(
    wire_store: Path, chains: tuple[LocalChain, LocalChain]
) -> None:
    """With ``admin_host`` the admin routes answer only connections that arrived at that local address;
    on any other they do not exist (404), while /v1 serves on every address."""
    from starlette.testclient import TestClient

    a, _ = chains
    gateway = Gateway.from_store(a.chain, a.secret(), wire_store, MODEL)
    elsewhere = TestClient(create_app(gateway, admin_host="10.99.0.1"))  # arrives at "testserver"
    hidden = elsewhere.get("/admin/chain")
    assert hidden.status_code == 404 and hidden.json()["error"]["type"] == "not_found_error"
    assert elsewhere.post("/admin/chain", json={}).status_code == 404
    assert elsewhere.get("/v1/models").status_code == 200
    here = TestClient(create_app(gateway, admin_host="testserver"))
    assert here.get("/admin/chain").status_code == 200


def test_behind_an_api_key_a_client_that_leaves_frees_its_session(
    wire_store: Path, chains: tuple[LocalChain, LocalChain]
) -> None:
    """With an API key (the key's middleware in front of every route) a plain request whose client gave
    up must still end: under Starlette's BaseHTTPMiddleware the endpoint never saw the disconnect and
    each such request stayed live, its session held on every hop (found by ``bench soak``)."""
    a, _ = chains
    gateway = Gateway.from_store(a.chain, a.secret(), wire_store, MODEL)
    with _serving(create_app(gateway, api_key="s3cret", admin_token="adm1n")) as url:
        body = {"prompt": "Edge nodes", "max_tokens": 1500, "temperature": 0}
        for _ in range(3):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/v1/completions", json=body, timeout=0.3,
                           headers={"Authorization": "Bearer s3cret"})  # fmt: skip
        deadline = time.monotonic() + 30
        while gateway.live:
            assert time.monotonic() < deadline, f"{len(gateway.live)} requests of clients that left live"
            time.sleep(0.05)


def test_past_its_limit_the_gateway_answers_429_and_the_admitted_session_goes_on(base_url: str) -> None:
    """With one place, a second request while a stream generates gets 429 in OpenAI's shape with a
    Retry-After; the stream loses nothing, and once it ends the next request is served. A bad limit is
    refused and changes nothing."""
    admin = f"{base_url}/admin/limits"
    for bad in ({"max_live_sessions": 0}, {"max_live_sessions": "2"}, {}):
        refused = httpx.post(admin, json=bad, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_live_sessions"
    assert httpx.get(f"{base_url}/admin/chain", timeout=30).json()["max_live_sessions"] is None
    whole = _completion(base_url, {"prompt": "Edge nodes", "max_tokens": 40, "temperature": 0}).json()
    assert httpx.post(admin, json={"max_live_sessions": 1}, timeout=30).json() == {"max_live_sessions": 1}
    try:
        body = {"prompt": "Edge nodes", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            streamed = [next(lines) for _ in range(3)]
            with pytest.raises(openai.RateLimitError) as info:
                _client(base_url).completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert info.value.code == "rate_limit_exceeded" and "retry after" in info.value.message
            assert int(info.value.response.headers["Retry-After"]) >= 1
            streamed += list(lines)
        text = "".join(
            json.loads(x[6:])["choices"][0]["text"] for x in streamed if x[6:] not in ("", "[DONE]")
        )
        assert text == whole["choices"][0]["text"]
        assert _completion(base_url, {"prompt": "x", "max_tokens": 2}).status_code == 200
        assert httpx.get(f"{base_url}/admin/chain", timeout=30).json()["refused"] >= 1
        # What each served request got, for the admission limit's measure; the refused one is not there.
        served = httpx.get(f"{base_url}/admin/telemetry", timeout=30).json()["served"]
        last_two = served[-2:]
        assert [r["live"] for r in last_two] == [1.0, 1.0] and all(r["ttft_s"] > 0 for r in last_two)
        assert last_two[0]["tpot_s"] > 0 and last_two[1]["n"] == last_two[0]["n"] + 1
        since = {"served_since": last_two[0]["n"]}
        later = httpx.get(f"{base_url}/admin/telemetry", params=since, timeout=30).json()["served"]
        assert later == last_two[1:]
    finally:
        httpx.post(admin, json={"max_live_sessions": None}, timeout=30)


def test_a_place_admitted_to_a_request_that_never_ran_is_freed_after_the_grace(
    wire_store: Path, chains: tuple[LocalChain, LocalChain]
) -> None:
    """A client that leaves before its stream's body runs never takes its place: the place is given back
    after ``ADMIT_GRACE_S`` rather than held for good."""
    a, _ = chains
    gateway = Gateway.from_store(a.chain, a.secret(), wire_store, MODEL, max_live_sessions=1)
    ticket = gateway.admit()
    assert ticket is not None and gateway.admit() is None and gateway.refused == 1
    gateway._admitted[ticket] -= ADMIT_GRACE_S + 1
    assert gateway.admit() is not None
