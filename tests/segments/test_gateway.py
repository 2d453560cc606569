"""The OpenAI-compatible gateway over a real chain, driven by the ``openai`` Python client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from wire_helpers import children_alive, num_layers

from segments.gateway import Gateway, create_app
from segments.launch import LocalChain
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


@pytest.fixture(scope="module")
def base_url(wire_store: Path, chains: tuple[LocalChain, LocalChain]) -> Iterator[str]:
    import uvicorn

    a, _ = chains
    gateway = Gateway(a.chain, a.secret(), load_tokenizer(wire_store, MODEL), MODEL)
    server = uvicorn.Server(
        uvicorn.Config(create_app(gateway), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "gateway did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
    assert not thread.is_alive()


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


def test_switch_chain_mid_stream_keeps_the_tokens(
    base_url: str, chains: tuple[LocalChain, LocalChain]
) -> None:
    a, b = chains
    body = {"model": MODEL, "prompt": "Split inference", "max_tokens": 12, "temperature": 0, "stream": True}
    undisturbed = httpx.post(f"{base_url}/v1/completions", json={**body, "stream": False}, timeout=120)
    want = undisturbed.json()["choices"][0]["text"]
    got = ""
    switched = None
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            got += json.loads(line[6:])["choices"][0]["text"]
            if switched is None and got:
                target = (
                    b.chain
                    if httpx.get(f"{base_url}/admin/chain").json()["chain"] == a.chain.to_dict()
                    else a.chain
                )
                switched = httpx.post(
                    f"{base_url}/admin/chain", json={"chain": target.to_dict(), "mode": "kv"}, timeout=120
                ).json()
    assert switched is not None and switched["sessions"] == 1, switched
    assert got == want
