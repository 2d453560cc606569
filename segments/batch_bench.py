"""``mecsplit bench batching``: many sessions on one chain, with and without continuous batching.

Two chains of the same K segment processes on loopback, one whose servers run each step alone
(``--max-batch 1``) and one that batches decode steps (``--max-batch M``). For each concurrency C, C
sessions generate at once through one client (as a gateway's sessions do), on each chain in turn, R
times interleaved so that load from elsewhere on the machine hits both alike. Reported per C and chain:
aggregate tokens/s over the run's wall time, each session's time to first token and mean gap between
its tokens (TPOT), p50 and p95 over sessions, medians over runs; and batched over unbatched tokens/s.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segments.client import AsyncChainClient, Session
from segments.launch import LocalChain
from segments.spec import SegmentSpec


@dataclass(frozen=True)
class BatchingBenchConfig:
    model: str
    specs: tuple[SegmentSpec, ...]
    sessions: tuple[int, ...]
    tokens: int
    runs: int
    prompt_tokens: int
    max_batch: int
    threads: int


@dataclass(frozen=True)
class _Run:
    wall_s: float
    ttft_s: tuple[float, ...]
    tpot_s: tuple[float, ...]
    tokens: int


def run_batching_bench(
    store_dir: Path, config: BatchingBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """The bench (see the module docstring); returns the JSON-ready result."""
    most = max(config.sessions)
    chains = {"unbatched": 1, "batched": config.max_batch}
    results: dict[str, dict[int, list[_Run]]] = {name: {c: [] for c in config.sessions} for name in chains}

    def chain(max_batch: int) -> LocalChain:
        return LocalChain(
            store_dir, config.specs, threads=config.threads, max_sessions=2 * most, max_batch=max_batch
        )

    with chain(1) as one, chain(config.max_batch) as many:
        launched = {"unbatched": one, "batched": many}
        for name, lc in launched.items():  # connections, allocator, caches
            asyncio.run(_generate(lc, 2, 4, config.prompt_tokens, f"warm-{name}"))
        for run in range(config.runs):
            for c in config.sessions:
                for name, lc in launched.items():
                    timed = asyncio.run(_generate(lc, c, config.tokens, config.prompt_tokens, f"{run}"))
                    results[name][c].append(timed)
                progress(f"run {run + 1}/{config.runs}, {c} sessions: "
                         f"{_tokens_per_s(results['unbatched'][c][-1]):.1f} vs "
                         f"{_tokens_per_s(results['batched'][c][-1]):.1f} tokens/s")  # fmt: skip
    by_sessions = {}
    for c in config.sessions:
        row = {name: _summary(results[name][c]) for name in chains}
        row["batched_over_unbatched_tokens_per_s"] = round(
            row["batched"]["tokens_per_s"] / row["unbatched"]["tokens_per_s"], 3
        )
        by_sessions[str(c)] = row
    return {
        "model": config.model,
        "segments": [[s.first, s.end] for s in config.specs],
        "threads": config.threads,
        "max_batch": config.max_batch,
        "tokens_per_session": config.tokens,
        "prompt_tokens": config.prompt_tokens,
        "runs": config.runs,
        "by_sessions": by_sessions,
    }


async def _generate(lc: LocalChain, count: int, tokens: int, prompt_tokens: int, tag: str) -> _Run:
    client = await AsyncChainClient(lc.chain, lc.secret(), timeout_s=300).connect()
    sessions = [Session(id=f"{tag}-{i}", tokens=_prompt(i, prompt_tokens)) for i in range(count)]
    try:
        started = time.perf_counter()
        timed = await asyncio.gather(*(_one(client, s, tokens) for s in sessions))
        wall = time.perf_counter() - started
        for session in sessions:
            await client.drop(session)
    finally:
        await client.close()
    return _Run(
        wall_s=wall,
        ttft_s=tuple(t[0] - started for t in timed),
        tpot_s=tuple((t[-1] - t[0]) / (len(t) - 1) for t in timed if len(t) > 1),
        tokens=sum(len(t) for t in timed),
    )


async def _one(client: AsyncChainClient, session: Session, tokens: int) -> list[float]:
    stamps = []
    async for _ in client.generate(session, tokens):
        stamps.append(time.perf_counter())
    return stamps


def _prompt(seed: int, length: int) -> list[int]:
    """A prompt of ``length`` ids in the smallest vocabulary of the presets, different per session."""
    return [(7 * i + 13 * seed + 11) % 1000 + 1 for i in range(length)]


def _tokens_per_s(run: _Run) -> float:
    return run.tokens / run.wall_s


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(runs: list[_Run]) -> dict[str, Any]:
    def ms(values: Sequence[float]) -> float:
        return round(statistics.median(values) * 1000, 2)

    return {
        "tokens_per_s": round(statistics.median(_tokens_per_s(r) for r in runs), 2),
        "tokens_per_s_by_run": [round(_tokens_per_s(r), 2) for r in runs],
        "ttft_p50_ms": ms([_percentile(r.ttft_s, 0.5) for r in runs]),
        "ttft_p95_ms": ms([_percentile(r.ttft_s, 0.95) for r in runs]),
        "tpot_p50_ms": ms([_percentile(r.tpot_s, 0.5) for r in runs]),
        "tpot_p95_ms": ms([_percentile(r.tpot_s, 0.95) for r in runs]),
    }
