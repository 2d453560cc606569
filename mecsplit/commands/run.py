"""``mecsplit generate | verify | gateway`` and ``mecsplit bench overhead | fuzz``: a model split into K
segment server processes on loopback, driven through the wire protocol."""

from __future__ import annotations

import itertools
import json
import signal
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from segments.launch import LocalChain
    from segments.spec import SegmentSpec

DEFAULT_PROMPT = "What is the capital of France?"


def _store_dir(store: Path | None) -> Path:
    from mecsplit.settings import Settings

    return store if store is not None else Settings().store_dir


def _threads(threads: int | None) -> int:
    from mecsplit.settings import Settings

    return threads if threads is not None else Settings().segments.threads


def _ensure_model(store_dir: Path, model: str) -> int:
    """Prepare the model when it is missing (idempotent) and return its layer count."""
    from segments import store

    if not store.is_prepared(store_dir, model):
        store.prepare(model, store_dir)
    return store.read_manifest(store_dir, model).info.num_layers


def _specs(model: str, num_layers: int, segments: int, boundaries: str | None) -> tuple[SegmentSpec, ...]:
    from segments.launch import boundaries_to_specs
    from segments.spec import split_evenly

    if boundaries:
        cuts = [int(b) for b in boundaries.split(",") if b.strip()]
        return boundaries_to_specs(model, num_layers, cuts)
    return split_evenly(model, num_layers, segments)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _prompt_ids(store_dir: Path, model: str, prompt: str, chat: bool) -> tuple[Any, list[int]]:
    from segments.store import load_tokenizer

    tokenizer = load_tokenizer(store_dir, model)
    if chat and getattr(tokenizer, "chat_template", None):
        from segments.gateway import chat_ids

        ids = chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode(prompt)
    return tokenizer, [int(i) for i in ids]


# ------------------------------------------------------------------------------------------- generate


def generate_cmd(
    model: str = typer.Option(None, help="model preset (default: settings.segments.default_model)"),
    segments: int = typer.Option(2, "--segments", "-k", help="number of segment processes"),
    boundaries: str | None = typer.Option(None, help="inner cut points instead of an even split, e.g. 10,20"),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="the prompt"),
    max_new_tokens: int = typer.Option(32, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
    seed: int = typer.Option(0, help="sampling seed (same seed, same tokens, on any chain)"),
    chat: bool = typer.Option(True, help="wrap the prompt in the tokenizer's chat template when it has one"),
    wire_dtype: str = typer.Option("f32", help="activation dtype on the wire: f32, f16 or bf16"),
    threads: int | None = typer.Option(None, help="torch threads per segment process"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Generate text with the model split into K segment processes on loopback; prints text and timings."""
    from mecsplit.settings import Settings
    from segments.client import ChainClient, Session
    from segments.errors import SegmentError
    from segments.launch import LocalChain
    from segments.sampling import SamplingParams

    _exit_cleanly_on_sigterm()
    model = model or Settings().segments.default_model
    store_dir = _store_dir(store)
    try:
        n = _ensure_model(store_dir, model)
        specs = _specs(model, n, segments, boundaries)
        tokenizer, ids = _prompt_ids(store_dir, model, prompt, chat)
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    except (SegmentError, ValueError) as exc:
        raise _fail(str(exc)) from None
    t0 = time.perf_counter()
    with LocalChain(store_dir, specs, threads=_threads(threads)) as lc:
        startup_s = time.perf_counter() - t0
        with ChainClient(lc.chain, lc.secret(), wire_dtype=wire_dtype) as client:
            session = Session(tokens=ids)
            eos = tokenizer.eos_token_id
            stamps: list[float] = []
            tokens: list[int] = []
            t_start = time.perf_counter()
            for token in client.generate(session, max_new_tokens, params, () if eos is None else (eos,)):
                stamps.append(time.perf_counter())
                tokens.append(token)
                if not as_json:
                    typer.echo(tokenizer.decode([token], skip_special_tokens=True), nl=False)
            stats = client.stats()
    gaps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    result = {
        "model": model,
        "segments": [[s.first, s.end] for s in specs],
        "prompt_tokens": len(ids),
        "new_tokens": len(tokens),
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "ttft_ms": round((stamps[0] - t_start) * 1000, 2) if stamps else None,
        "per_token_median_ms": round(statistics.median(gaps_ms), 2) if gaps_ms else None,
        "tokens_per_s": round(len(gaps_ms) / sum(gaps_ms) * 1000, 2) if gaps_ms else None,
        "startup_s": round(startup_s, 2),
        "rss_bytes": [s["rss_bytes"] for s in stats],
        "wire_dtype": wire_dtype,
    }
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo("")
        typer.echo(
            f"[{len(specs)} segments {result['segments']}; TTFT {result['ttft_ms']} ms; "
            f"per token {result['per_token_median_ms']} ms (median); startup {result['startup_s']} s]"
        )


# --------------------------------------------------------------------------------------------- verify


def _verify_causal(
    lc: LocalChain, store_dir: Path, model: str, ids: list[int], tokens: int
) -> list[dict[str, Any]]:
    import torch

    from segments.client import ChainClient
    from segments.reference import ReferenceModel

    ref = ReferenceModel(store_dir, model)
    steps: list[dict[str, Any]] = []
    with ChainClient(lc.chain, lc.secret()) as client:
        inputs = torch.tensor([ids])
        position = 0
        for step in range(tokens + 1):
            got = client.step("verify", inputs, position, logits="all").logits
            want = ref.forward("verify", inputs, position)
            assert got is not None
            got_ids, want_ids = got[:, -1].argmax(-1), want[:, -1].argmax(-1)
            steps.append({
                "step": step,
                "tokens": int(inputs.shape[1]),
                "max_abs_diff": float((got - want).abs().max()),
                "tokens_equal": bool(torch.equal(got_ids, want_ids)),
            })  # fmt: skip
            position += int(inputs.shape[1])
            inputs = want_ids.view(1, 1)  # follow the reference, so a divergence cannot hide later steps
    return steps


def _verify_encoder(lc: LocalChain, store_dir: Path, model: str, ids: list[int]) -> list[dict[str, Any]]:
    import torch

    from segments.client import ChainClient
    from segments.reference import ReferenceModel

    ref = ReferenceModel(store_dir, model)
    with ChainClient(lc.chain, lc.secret()) as client:
        got = client.step("verify", torch.tensor([ids]), 0).hidden
    want = ref.forward("verify", torch.tensor([ids]), 0)
    assert got is not None
    return [
        {"step": 0, "tokens": len(ids), "max_abs_diff": float((got - want).abs().max()), "tokens_equal": True}
    ]


def verify_cmd(
    model: str = typer.Option(None, help="model preset (default: settings.segments.default_model)"),
    segments: int = typer.Option(2, "--segments", "-k", help="number of segment processes"),
    boundaries: str | None = typer.Option(None, help="inner cut points instead of an even split, e.g. 10,20"),
    tokens: int = typer.Option(32, help="decode steps after the prompt"),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="the prompt"),
    threads: int | None = typer.Option(None, help="torch threads per segment process"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Compare the K-process chain (fp32 wire) with the whole model in one process, step by step."""
    import torch

    from mecsplit.settings import Settings
    from segments.errors import SegmentError
    from segments.launch import LocalChain
    from segments.store import read_manifest

    _exit_cleanly_on_sigterm()
    model = model or Settings().segments.default_model
    store_dir = _store_dir(store)
    # The reference runs here with the segments' thread count: matmul reductions split over a different
    # number of threads sum in another order, which alone moves logits by ~1e-5.
    n_threads = _threads(threads)
    torch.set_num_threads(n_threads)
    try:
        n = _ensure_model(store_dir, model)
        specs = _specs(model, n, segments, boundaries)
        _, ids = _prompt_ids(store_dir, model, prompt, chat=False)
        kind = read_manifest(store_dir, model).info.kind
    except (SegmentError, ValueError) as exc:
        raise _fail(str(exc)) from None
    with LocalChain(store_dir, specs, threads=n_threads) as lc:
        if kind == "encoder":
            steps = _verify_encoder(lc, store_dir, model, ids)
        else:
            steps = _verify_causal(lc, store_dir, model, ids, tokens)
    result = {
        "model": model,
        "segments": [[s.first, s.end] for s in specs],
        "wire_dtype": "f32",
        "threads": n_threads,
        "max_abs_diff": max(s["max_abs_diff"] for s in steps),
        "tokens_equal": all(s["tokens_equal"] for s in steps),
        "steps": steps,
    }
    exact = result["max_abs_diff"] == 0.0 and result["tokens_equal"]
    if as_json:
        typer.echo(json.dumps(result))
    else:
        for s in steps:
            typer.echo(
                f"step {s['step']:3d}: max |diff| {s['max_abs_diff']:.3g}  tokens equal {s['tokens_equal']}"
            )
        typer.echo(f"{model} {result['segments']}: {'EXACT' if exact else 'NOT EXACT'}")
    if not exact:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- bench


def _decode_latencies_local(runners: list[Any], prompt: list[int], tokens: int, session: str) -> list[float]:
    """Decode through segment runners in this process (one runner: the whole model), no wire."""
    import torch

    def forward(x: torch.Tensor, position: int) -> torch.Tensor:
        for runner in runners:
            x = runner.forward(session, x, position)
        return x

    logits = forward(torch.tensor([prompt]), 0)
    position = len(prompt)
    out: list[float] = []
    for _ in range(tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        logits = forward(nxt, position)
        int(logits[:, -1].argmax())  # the chain's last hop picks the token too
        out.append(time.perf_counter() - t0)
        position += 1
    for runner in runners:
        runner.drop_session(session)
    return out


def _decode_latencies_chain(client: Any, prompt: list[int], tokens: int, session: str) -> list[float]:
    import torch

    from segments.client import Session
    from segments.sampling import SamplingParams

    s = Session(id=session, tokens=list(prompt))
    client.step(s.id, torch.tensor([prompt]), 0)
    s.kv_length = len(prompt)
    out: list[float] = []
    greedy = SamplingParams()
    for _ in range(tokens):
        # The first decode input: any token (the whole-model run feeds its argmax; timing does not care).
        nxt = torch.tensor([[s.tokens[-1]]])
        t0 = time.perf_counter()
        result = client.step(s.id, nxt, s.kv_length, sampling=greedy)
        out.append(time.perf_counter() - t0)
        s.kv_length += 1
        s.tokens.append(result.tokens[0])
    client.drop(s)
    return out


def bench_overhead_cmd(
    model: str = typer.Option("smollm2-135m", help="model preset"),
    segments: int = typer.Option(4, "--segments", "-k", help="number of segment processes"),
    tokens: int = typer.Option(32, help="decode steps timed per run"),
    runs: int = typer.Option(5, help="runs of each (alternating chain and whole model)"),
    prompt_tokens: int = typer.Option(16, help="prompt length before decoding"),
    threads: int | None = typer.Option(None, help="torch threads per computing process"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Per-token decode latency of the K-process chain on loopback vs the whole model in one process, and
    of the same chain over mutual TLS (what deployments run) vs plain TCP: the per-hop cost of TLS."""
    import torch

    from segments.client import ChainClient
    from segments.errors import SegmentError
    from segments.launch import LocalChain
    from segments.pki import GATEWAY
    from segments.runner import SegmentRunner
    from segments.spec import SegmentSpec

    _exit_cleanly_on_sigterm()
    store_dir = _store_dir(store)
    n_threads = _threads(threads)
    torch.set_num_threads(n_threads)
    try:
        n = _ensure_model(store_dir, model)
        specs = _specs(model, n, segments, None)
    except (SegmentError, ValueError) as exc:
        raise _fail(str(exc)) from None
    prompt = [(7 * i + 11) % 1000 + 1 for i in range(prompt_tokens)]
    chain_runs: list[float] = []
    whole_runs: list[float] = []
    # The baseline: the same segment code over the whole range, in this process, no wire. The same K
    # segments in this process, no wire, tell the cost of splitting apart from the cost of the wire.
    limits = {"max_sessions": 4, "max_kv_bytes": 1 << 32}
    whole = [SegmentRunner(store_dir, SegmentSpec(model, 0, n), **limits)]
    split = [SegmentRunner(store_dir, spec, **limits) for spec in specs]
    split_runs: list[float] = []
    tls_runs: list[float] = []
    with (
        LocalChain(store_dir, specs, threads=n_threads) as lc,
        ChainClient(lc.chain, lc.secret()) as client,
        LocalChain(store_dir, specs, threads=n_threads, tls=True) as tls_lc,
        ChainClient(tls_lc.chain, tls_lc.auth(GATEWAY)) as tls_client,
    ):
        _decode_latencies_chain(client, prompt, 4, "warmup")  # connections, allocator, caches
        _decode_latencies_chain(tls_client, prompt, 4, "warmup")
        _decode_latencies_local(whole, prompt, 4, "warmup")
        _decode_latencies_local(split, prompt, 4, "warmup")
        # Interleave so that load from other processes on the machine hits all four alike.
        for run in range(runs):
            chain_runs.append(statistics.median(_decode_latencies_chain(client, prompt, tokens, f"c{run}")))
            tls_runs.append(statistics.median(_decode_latencies_chain(tls_client, prompt, tokens, f"t{run}")))
            whole_runs.append(statistics.median(_decode_latencies_local(whole, prompt, tokens, f"w{run}")))
            split_runs.append(statistics.median(_decode_latencies_local(split, prompt, tokens, f"s{run}")))
        stats = client.stats()
    chain_ms = statistics.median(chain_runs) * 1000
    whole_ms = statistics.median(whole_runs) * 1000
    tls_ms = statistics.median(tls_runs) * 1000
    transfers = segments + 1  # client -> first, K-1 segment -> segment, last -> client
    result = {
        "model": model,
        "segments": [[s.first, s.end] for s in specs],
        "threads": n_threads,
        "tokens": tokens,
        "runs": runs,
        "chain_ms_per_token": round(chain_ms, 3),
        "whole_ms_per_token": round(whole_ms, 3),
        "ratio": round(chain_ms / whole_ms, 4),
        "transfers_per_token": transfers,
        "per_hop_overhead_ms": round((chain_ms - whole_ms) / transfers, 4),
        "split_in_process_ms_per_token": round(statistics.median(split_runs) * 1000, 3),
        "wire_overhead_per_hop_ms": round((chain_ms - statistics.median(split_runs) * 1000) / transfers, 4),
        "tls_chain_ms_per_token": round(tls_ms, 3),
        "tls_per_hop_ms": round((tls_ms - chain_ms) / transfers, 4),
        # Each run's own pairing (the plain and the TLS run next to each other), so drift cancels.
        "tls_per_hop_ms_by_run": [
            round((t - c) * 1000 / transfers, 4) for t, c in zip(tls_runs, chain_runs, strict=True)
        ],
        "chain_run_medians_ms": [round(x * 1000, 3) for x in chain_runs],
        "tls_chain_run_medians_ms": [round(x * 1000, 3) for x in tls_runs],
        "whole_run_medians_ms": [round(x * 1000, 3) for x in whole_runs],
        "segment_busy_s": [round(s["busy_s"], 3) for s in stats],
        "segment_rss_bytes": [s["rss_bytes"] for s in stats],
    }
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


def bench_batching_cmd(
    model: str = typer.Option("smollm2-135m", help="model preset"),
    segments: int = typer.Option(2, "--segments", "-k", help="number of segment processes"),
    sessions: str = typer.Option("1,4,16", help="concurrencies to measure, comma-separated"),
    tokens: int = typer.Option(16, help="tokens each session generates"),
    runs: int = typer.Option(3, help="runs of each concurrency on each chain (interleaved)"),
    prompt_tokens: int = typer.Option(32, help="prompt length of each session"),
    max_batch: int = typer.Option(16, help="--max-batch of the batching chain's servers"),
    threads: int | None = typer.Option(None, help="torch threads per segment process"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """C sessions generating at once on a K-process chain on loopback, its servers batching decode steps
    (--max-batch) against the same chain running each step alone, measured in the same run: aggregate
    tokens/s, TTFT and TPOT p50/p95 per concurrency (segments/batch_bench.py)."""
    from segments.batch_bench import BatchingBenchConfig, run_batching_bench
    from segments.errors import SegmentError

    _exit_cleanly_on_sigterm()
    store_dir = _store_dir(store)
    try:
        counts = tuple(int(x) for x in sessions.split(",") if x.strip())
        if not counts or min(counts) < 1 or tokens < 2 or runs < 1 or prompt_tokens < 1 or max_batch < 2:
            raise ValueError(
                "--sessions takes positive counts, --tokens at least 2, --runs and --prompt-tokens at "
                "least 1, --max-batch at least 2"
            )
        n = _ensure_model(store_dir, model)
        config = BatchingBenchConfig(
            model=model, specs=_specs(model, n, segments, None), sessions=counts, tokens=tokens, runs=runs,
            prompt_tokens=prompt_tokens, max_batch=max_batch, threads=_threads(threads),
        )  # fmt: skip
    except (SegmentError, ValueError) as exc:
        raise _fail(str(exc)) from None
    result = run_batching_bench(store_dir, config, progress=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


# -------------------------------------------------------------------------------------------- gateway


def gateway_cmd(
    model: str = typer.Option(None, help="model preset (default: settings.segments.default_model)"),
    segments: int = typer.Option(2, "--segments", "-k", help="number of segment processes"),
    boundaries: str | None = typer.Option(None, help="inner cut points instead of an even split"),
    host: str = typer.Option("127.0.0.1", help="HTTP bind address"),
    port: int = typer.Option(8000, help="HTTP port"),
    threads: int | None = typer.Option(None, help="torch threads per segment process"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Serve the OpenAI-compatible API over a K-process chain launched on loopback."""
    import uvicorn

    from mecsplit.settings import Settings
    from segments.errors import SegmentError
    from segments.gateway import Gateway, create_app
    from segments.launch import LocalChain
    from segments.store import load_tokenizer

    model = model or Settings().segments.default_model
    store_dir = _store_dir(store)
    try:
        n = _ensure_model(store_dir, model)
        specs = _specs(model, n, segments, boundaries)
    except (SegmentError, ValueError) as exc:
        raise _fail(str(exc)) from None
    with LocalChain(store_dir, specs, threads=_threads(threads)) as lc:
        gateway = Gateway(lc.chain, lc.secret(), load_tokenizer(store_dir, model), model)
        typer.echo(
            json.dumps(
                {
                    "gateway": f"http://{host}:{port}/v1",
                    "model": model,
                    "chain": lc.chain.to_dict(),
                    "pids": lc.pids,
                }
            )
        )
        # uvicorn re-raises SIGTERM after its own shutdown; our handler then turns it into SystemExit.
        _exit_cleanly_on_sigterm()
        uvicorn.run(create_app(gateway), host=host, port=port, log_level="warning")


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM becomes SystemExit, so the LocalChain with-block stops the segment processes and removes
    the chain's temporary secret instead of the process vanishing mid-way."""
    signal.signal(signal.SIGTERM, _exit_on_signal)


def bench_resplit_cmd(
    rates_mbit: str = typer.Option("100,10", "--bw-mbit", help="comma-separated link rates (Mbit/s)"),
    runs: int = typer.Option(3, min=1, help="re-splits per path and rate (the median is reported)"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
) -> None:
    """Stall of a live re-split (5 layers change node, SmolLM2, ~256 tokens of context) for each KV path
    (moved server to server, through the client, recomputed on the first hop, replayed) over a tc-shaped
    link between two network namespaces. Needs root."""
    import os

    from flows.resplit_bench import run_resplit_bench
    from mecsplit.settings import get_settings
    from segments import store

    if os.geteuid() != 0:
        raise _fail("bench resplit needs root (network namespaces and tc); run it with sudo")
    try:
        rates = [float(r) for r in rates_mbit.split(",") if r.strip()]
    except ValueError:
        raise _fail(f"--bw-mbit takes numbers separated by commas, got {rates_mbit!r}") from None
    if not rates or min(rates) <= 0:
        raise _fail("--bw-mbit needs at least one rate > 0")
    settings = get_settings()
    if not store.is_prepared(settings.store_dir, "smollm2-135m"):
        store.prepare("smollm2-135m", settings.store_dir, progress=True)
    result = run_resplit_bench(rates, runs, progress=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


def bench_failover_cmd(
    failures: int = typer.Option(20, min=1, help="segment servers killed, one per session"),
    tokens: int = typer.Option(24, min=6, help="greedy tokens per session"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Kill a segment server (SIGKILL) in the middle of each of N SmolLM2 generations; each session is
    rebuilt by replay on a warm standby and must finish with the tokens of an undisturbed run. Prints
    sessions exact, tokens lost and the recovery time (median, p95, max) with its parts."""
    from segments.failover import MODEL, run_failover_bench

    store_dir = _store_dir(store)
    _ensure_model(store_dir, MODEL)
    result = run_failover_bench(store_dir, failures, tokens, progress=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(result, indent=None if as_json else 2))


def bench_fuzz_cmd(
    frames: int = typer.Option(1_000_000, min=0, help="frames sent over authenticated TLS connections"),
    handshakes: int = typer.Option(100_000, min=0, help="hostile connections to the TLS listener"),
    seed: int = typer.Option(20260101, help="seed of the frame and handshake generators"),
    model: str = typer.Option(
        "gpt2-tiny", help="model preset the server serves (a tiny one: compute is not the point)"
    ),
    check_every: int = typer.Option(10_000, min=1, help="frames between two exact generations"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Fuzz one live segment server over mutual TLS: N hostile frames on authenticated connections, M
    hostile TLS handshakes; 0 crashes, 0 hangs, exact generation throughout, no fd leak (exit 1 otherwise)."""
    from segments.fuzz import run_fuzz_bench

    _exit_cleanly_on_sigterm()
    store_dir = _store_dir(store)
    num_layers = _ensure_model(store_dir, model)
    result = run_fuzz_bench(
        store_dir, model, num_layers, frames, handshakes, seed,
        progress=lambda m: typer.echo(m, err=True), check_every=check_every,
    )  # fmt: skip
    typer.echo(json.dumps(result, indent=None if as_json else 2))
    if not result["ok"]:
        raise typer.Exit(1)


def bench_soak_cmd(
    minutes: float = typer.Option(10.0, min=0.05, help="how long the clients send requests"),
    clients: int = typer.Option(64, min=1, help="concurrent HTTP clients"),
    kills: int = typer.Option(50, min=0, help="segment servers SIGKILLed and replaced, spread over the run"),
    model: str = typer.Option("llama-tiny", help="model preset (a tiny one keeps the soak cheap)"),
    seed: int = typer.Option(0, help="which clients misbehave and what each sends"),
    misbehaving_share: float = typer.Option(0.25, min=0.0, max=1.0, help="share of misbehaving clients"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON (progress goes to stderr)"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Many HTTP clients through the gateway (TLS chain of 3 servers, loopback), some of them hostile, while
    servers are SIGKILLed and replaced: every well-behaved request must end with the whole model's exact
    tokens, hostile ones with a 4xx, sessions at zero and RSS flat at the end. Exit 1 if a goal fails."""
    from segments.soak import SoakConfig, run_soak_bench

    _exit_cleanly_on_sigterm()
    # A shell starts a background job with SIGINT ignored, and Python then keeps it so: a harness that
    # stops the soak with SIGINT must still get the servers and the gateway stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    store_dir = _store_dir(store)
    try:
        _ensure_model(store_dir, model)
        config = SoakConfig(
            model=model, minutes=minutes, clients=clients, kills=kills, seed=seed,
            misbehaving_share=misbehaving_share,
        )  # fmt: skip
    except ValueError as exc:
        raise _fail(str(exc)) from None
    result = run_soak_bench(store_dir, config, progress=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(result, indent=None if as_json else 2))
    if not result["verdict"]["pass"]:
        failed = [goal for goal, ok in result["verdict"].items() if not ok and goal != "pass"]
        typer.echo(f"soak failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
    app.command("verify")(verify_cmd)
    app.command("gateway")(gateway_cmd)
    bench.command("overhead")(bench_overhead_cmd)
    bench.command("batching")(bench_batching_cmd)
    bench.command("resplit")(bench_resplit_cmd)
    bench.command("failover")(bench_failover_cmd)
    bench.command("fuzz")(bench_fuzz_cmd)
    bench.command("soak")(bench_soak_cmd)
