"""What the users of a scenario ask, and when: the requests an experiment's clients send (pure).

A scenario's ``workload`` describes its users (docs/experiments.md, "Workloads"):
- ``arrivals: closed`` (the default): ``sessions`` users, each sending a request when its previous one
  ended, after a think time drawn from an exponential distribution of mean ``think_time_s`` (0: back
  to back). The offered load follows the service: a slow plan is asked less.
- ``arrivals: poisson``: requests arrive at ``request_rate_per_s`` on average, independently of how fast
  they are served (open loop), at most ``sessions`` of them in flight from the client's side; an arrival
  that finds that many in flight is counted as ``not_sent`` (the client is the bottleneck then, not the
  system: raise ``sessions``). Open loop is how a cell full of users behaves: they do not wait for one
  another, so an overloaded system sees its queue grow, and admission control is what keeps the
  admitted sessions within the SLO.

Lengths (``lengths``): ``prompts`` (the default, every experiment so far) sends the short chat prompts
of ``PROMPTS`` in turn and asks ``max_new_tokens``; ``lognormal`` draws each request's prompt and answer
lengths from log-normal distributions with medians ``prompt_tokens`` and ``max_new_tokens`` and spread
``LENGTH_SIGMA``. In public chat traces (ShareGPT, LMSYS-Chat-1M, Azure's LLM inference traces) both
lengths are heavy-tailed, most requests short and a few many times the median, and a log-normal is the
usual model of that. The spread is assumed, not fitted to one trace; the scenario's medians set the
scale, which for the small models served at the edge here is far below those traces'.

A prompt of ``n`` tokens is ``n`` words of plain English cut from ``CORPUS`` (about 1.2-1.4 tokens a
word for SmolLM2's tokenizer, plus the chat template's few): the clients do not load the tokenizer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from testbed.scenario import Workload

# Log-normal spread of prompt and output lengths (sigma of log length): at 1.0 the 90th percentile is
# 3.6x the median and the 10th 0.28x.
LENGTH_SIGMA = 1.0
# Requests no longer than this many times the scenario's median: a draw far in the tail would hold one
# session for minutes of a two-minute window.
LENGTH_CAP = 8.0

PROMPTS = (
    "Explain in two sentences why edge computing lowers latency.",
    "Write a short haiku about a city at night.",
    "List three uses of a bandwidth trace.",
)
_TEXT = (
    "Edge computing moves work closer to the people who need it, so that a request does not have to "
    "cross a continent before it is answered. A cell tower, a factory server or a roadside unit can run "
    "part of a model while the rest runs in a distant data centre, and the network between them decides "
    "how fast each answer arrives. When a link slows down, the split can move; when a server is busy, "
    "another can take its layers. Write a short story about a delivery robot that learns the streets of "
    "an old town, the bakery that opens at five, the bridge that floods in spring and the children who "
    "wave at it every afternoon. Then list three ways a city could measure how well its wireless network "
    "serves the people who walk, drive and work in it, and explain which of them you would trust most."
)
CORPUS = tuple(_TEXT.split())


@dataclass(frozen=True)
class Request:
    """One request: when it is sent (seconds from the start), its prompt's words and its token budget."""

    at_s: float
    prompt_words: int
    max_tokens: int


def lengths(workload: Workload, rng: random.Random) -> tuple[int, int]:
    """A request's prompt words (0: one of ``PROMPTS``) and token budget under ``workload.lengths``."""
    if workload.lengths == "prompts":
        return 0, workload.max_new_tokens
    return _draw(workload.prompt_tokens, rng), _draw(workload.max_new_tokens, rng)


def _draw(median: int, rng: random.Random) -> int:
    value = median * math.exp(rng.gauss(0.0, LENGTH_SIGMA))
    return max(1, min(round(value), round(median * LENGTH_CAP)))


def poisson_arrivals(workload: Workload, seed: int) -> Iterator[Request]:
    """The open-loop requests, without end: exponential gaps of mean ``1 / request_rate_per_s``, each
    with its lengths; the same seed gives the same requests (the policies compared in an experiment meet
    the same arrivals)."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(workload.request_rate_per_s)
        words, tokens = lengths(workload, rng)
        yield Request(at_s=t, prompt_words=words, max_tokens=tokens)


def think_s(workload: Workload, rng: random.Random) -> float:
    """A closed-loop user's pause before its next request."""
    return rng.expovariate(1.0 / workload.think_time_s) if workload.think_time_s > 0 else 0.0


def prompt_text(words: int, offset: int = 0) -> str:
    """``words`` words of ``CORPUS`` from ``offset`` on, wrapping around (different offsets give
    different prompts of one length); 0 words: ``PROMPTS[offset]`` (in turn)."""
    if words <= 0:
        return PROMPTS[offset % len(PROMPTS)]
    n = len(CORPUS)
    return " ".join(CORPUS[(offset + i) % n] for i in range(words))
