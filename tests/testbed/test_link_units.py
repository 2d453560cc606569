"""Pure parts of link shaping: namespace wrapping, sizes, iptables rule text, value checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from testbed.link import (
    QUEUE_MIN_PACKETS,
    LinkShape,
    Netns,
    ShapingError,
    _chain_rules,
    chain_name,
    htb_burst_bytes,
    queue_limit_packets,
)


def test_netns_wrap() -> None:
    assert Netns(name="x").wrap(["tc", "qdisc"]) == ["ip", "netns", "exec", "x", "tc", "qdisc"]
    assert Netns(pid=42).wrap(["tc"]) == ["nsenter", "-t", "42", "-n", "tc"]
    assert Netns().wrap(["tc"]) == ["tc"]
    with pytest.raises(ValueError, match="not both"):
        Netns(name="x", pid=1)


def test_burst_and_queue_scale_with_rate() -> None:
    assert htb_burst_bytes(1) == 1514  # floor: one frame (more would be a long overshoot at low rates)
    assert htb_burst_bytes(100) == 25_000  # 2 ms at 100 Mbit/s
    assert queue_limit_packets(1) == QUEUE_MIN_PACKETS
    assert queue_limit_packets(100) == 4129  # 0.5 s at 100 Mbit/s = 6.25 MB in 1514-byte frames
    assert queue_limit_packets(100, delay_ms=500) == 8257  # netem also holds its delay line


def test_chain_rules_are_atomic_and_ordered() -> None:
    text = _chain_rules("mecsplit-eth1", loss_pct=5, queue_num=7)
    lines = text.splitlines()
    assert lines[0] == "*mangle" and lines[1] == ":mecsplit-eth1 - [0:0]" and lines[-1] == "COMMIT"
    # Drop before queueing, so lost packets never wait in the shaper.
    assert "--probability 0.050000 -j DROP" in lines[2]
    assert lines[3] == "-A mecsplit-eth1 -j NFQUEUE --queue-num 7 --queue-bypass"
    assert "NFQUEUE" not in _chain_rules("c", loss_pct=1, queue_num=None)
    assert "DROP" not in _chain_rules("c", loss_pct=0, queue_num=3)


def test_chain_name_limit() -> None:
    assert chain_name("mecsplitcar0") == "mecsplit-mecsplitcar0"
    with pytest.raises(ShapingError, match="28"):
        chain_name("a" * 15, prefix="mecsplit-long-x")


@pytest.mark.parametrize(
    "bad", [{"bw_mbit": 0}, {"bw_mbit": 1, "delay_ms": -1}, {"bw_mbit": 1, "loss_pct": 100}]
)
def test_link_shape_rejects_bad_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        LinkShape(**bad)
