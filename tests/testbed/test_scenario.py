"""Scenario files: every shipped scenario loads; every broken one is refused naming field and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.scenario import (
    MAX_IFNAME_CHARS,
    CpuLoadEvent,
    IfaceNameError,
    JoinEvent,
    Scenario,
    ScenarioError,
    TraceEvent,
    iface_name,
    load_scenario,
    parse_scenario,
)
from testbed.trace import TraceError, load_trace

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.yaml"))
DEFAULT = (SCENARIOS / "default.yaml").read_text()


def _line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the test scenario")


def _refuse(tmp_path: Path, text: str) -> ScenarioError:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return info.value


def test_ships_the_four_scenarios() -> None:
    assert {p.stem for p in SHIPPED} >= {"default", "smart-city", "v2x", "industrial"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenario_loads_and_fits_this_machine(path: Path) -> None:
    scenario = load_scenario(path)
    assert 3 <= len(scenario.nodes) <= 5
    assert scenario.model == "smollm2-135m"
    assert all(n.cpus <= 1.0 for n in scenario.nodes)
    for node in scenario.nodes:
        for index in range(len(scenario.links)):
            assert len(iface_name(node.name, index)) <= MAX_IFNAME_CHARS
    for event in scenario.events():
        if isinstance(event, TraceEvent):
            assert event.path.is_file() and event.path.is_relative_to(Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_scenario_round_trips_as_json(path: Path) -> None:
    scenario = load_scenario(path)
    again = Scenario.model_validate_json(scenario.model_dump_json())
    assert again == scenario


def test_v2x_has_driving_uplink_trace_and_a_late_rsu() -> None:
    v2x = load_scenario(SCENARIOS / "v2x.yaml")
    uplinks = [e for e in v2x.timeline if isinstance(e, TraceEvent) and e.direction == "a_to_b"]
    assert uplinks and uplinks[0].column == "up_mbit" and uplinks[0].link == ("car", "rsu1")
    assert v2x.late_nodes() == frozenset({"rsu2"})
    assert "rsu2" not in {n.name for n in v2x.initial_nodes()}
    joins = [e for e in v2x.events() if isinstance(e, JoinEvent)]
    assert [(j.node, j.at_s) for j in joins] == [("rsu2", 60.0)]
    times = [e.at_s for e in v2x.events()]
    assert times == sorted(times)


# (what to change in default.yaml, the field the error must name, a text on the line it must name,
#  a word of the message)
BROKEN = [
    ("{a: edge, b: cloud,", "{a: edge, b: clod,", "links[1].b", "b: clod", "unknown node 'clod'"),
    (
        "bw_mbit: 50, delay_ms: 20",
        "bw_mbit: -5, delay_ms: 20",
        "links[1].bw_mbit",
        "bw_mbit: -5",
        "greater than 0",
    ),
    ("trace: lte-driving-1,", "csv: no-such.csv,", "timeline[0].csv", "no-such.csv", "does not exist"),
    ("trace: lte-driving-1,", "trace: no-such,", "timeline[0].trace", "no-such", "no bundled trace"),
    ("scale: 0.5,", "column: up_mbit, scale: 0.5,", "timeline[0].column", "up_mbit", "not in lte-driving-1"),
    ("link: device-edge", "link: device-cloud", "timeline[0].link", "device-cloud", "no link between"),
    ("kind: cpu_load", "kind: cpu_lod", "timeline[1]", "cpu_lod", "does not match"),
    ("node: edge, pct: 70", "node: edgy, pct: 70", "timeline[1].node", "edgy", "unknown node"),
    ("pct: 70", "pct: 170", "timeline[1].pct", "pct: 170", "less than or equal to 100"),
    ("source: device", "source: phone", "source", "source: phone", "unknown node 'phone'"),
    ("sessions: 2", "sesions: 2", "workload.sesions", "sesions", "unknown field"),
    (", mem_mb: 1024", "", "nodes[1].mem_mb", "name: edge, tier", "Field required"),
    ("name: cloud, tier", "name: Cloud9000, tier", "nodes[2].name", "Cloud9000", "should match pattern"),
    ("tier: edge", "tier: fog", "nodes[1].tier", "tier: fog", "'device', 'edge', 'mec' or 'cloud'"),
    (
        "{a: device, b: edge, bw_mbit: 20",
        "{a: device, b: device, bw_mbit: 20",
        "links[0]",
        "b: device,",
        "two different nodes",
    ),
    ("delay_ms: 5}", "delay_ms: 5, loss_pct: 100}", "links[0].loss_pct", "loss_pct: 100", "less than 100"),
]


@pytest.mark.parametrize(("old", "new", "field", "on_line", "message"), BROKEN, ids=[c[2] for c in BROKEN])
def test_broken_scenario_names_field_and_line(
    tmp_path: Path, old: str, new: str, field: str, on_line: str, message: str
) -> None:
    assert old in DEFAULT
    text = DEFAULT.replace(old, new, 1)
    error = _refuse(tmp_path, text)
    matching = [p for p in error.problems if p.field == field]
    assert matching, f"no problem names {field}: {error}"
    assert matching[0].line == _line_of(text, on_line), str(error)
    assert message in matching[0].message
    assert f"line {matching[0].line}" in str(error) and field in str(error)


def test_bad_yaml_syntax_names_the_line(tmp_path: Path) -> None:
    text = DEFAULT.replace("  - {name: edge,", "  - {name: edge,,", 1)
    error = _refuse(tmp_path, text)
    assert error.problems[0].field == "<yaml>"
    assert error.problems[0].line == _line_of(text, "name: edge,,")
    assert "bad YAML syntax" in str(error)


def test_duplicate_node_and_link(tmp_path: Path) -> None:
    text = DEFAULT.replace(
        "  - {a: edge, b: cloud, bw_mbit: 50, delay_ms: 20}",
        "  - {a: edge, b: cloud, bw_mbit: 50, delay_ms: 20}\n  - {a: cloud, b: edge, bw_mbit: 5}",
    )
    error = _refuse(tmp_path, text)
    assert [(p.field, p.line) for p in error.problems] == [("links[2]", _line_of(text, "{a: cloud, b: edge"))]


def test_disconnected_node_is_refused(tmp_path: Path) -> None:
    text = DEFAULT.replace("  - {a: edge, b: cloud, bw_mbit: 50, delay_ms: 20}\n", "")
    error = _refuse(tmp_path, text)
    assert error.problems[0].field == "nodes[2].name"
    assert "no path of links" in error.problems[0].message


def test_relative_csv_is_resolved_against_the_scenario_file(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "mine.csv").write_text("t_s,bw_mbit\n0,5\n1,0\n2,7.5\n")
    text = DEFAULT.replace("trace: lte-driving-1,", "csv: traces/mine.csv,")
    (tmp_path / "s.yaml").write_text(text)
    event = load_scenario(tmp_path / "s.yaml").timeline[0]
    assert isinstance(event, TraceEvent)
    assert event.path == (tmp_path / "traces" / "mine.csv").resolve()


@pytest.mark.parametrize("where", ["absolute", "dotdot", "link"])
def test_a_trace_outside_the_scenarios_folder_is_refused_without_echoing_it(
    tmp_path: Path, where: str
) -> None:
    """A scenario reads traces from its own folder or the bundled ones only, and no error quotes a file's
    contents (before, ``csv: /etc/passwd`` with a missing column printed its first line)."""
    secret = tmp_path / "outside" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text("t_s,hunter2\n0,1\n")
    folder = tmp_path / "scenario"
    folder.mkdir()
    name = {"absolute": str(secret), "dotdot": "../outside/secret.csv", "link": "mine.csv"}[where]
    if where == "link":
        (folder / "mine.csv").symlink_to(secret)
    (folder / "s.yaml").write_text(DEFAULT.replace("trace: lte-driving-1,", f"csv: {name},"))
    with pytest.raises(ScenarioError) as info:
        load_scenario(folder / "s.yaml")
    assert "scenario's folder" in str(info.value) and "hunter2" not in str(info.value)


def test_an_error_in_a_users_trace_names_no_content(tmp_path: Path) -> None:
    (tmp_path / "mine.csv").write_text("t_s,hunter2\n0,x-secret-x\n")
    text = DEFAULT.replace("trace: lte-driving-1,", "csv: mine.csv, column: up,")
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(tmp_path / "s.yaml")
    assert "not in mine.csv" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(TraceError) as bad_row:
        load_trace(tmp_path / "mine.csv", "hunter2")
    assert "not a number" in str(bad_row.value) and "x-secret-x" not in str(bad_row.value)
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00secret")
    with pytest.raises(TraceError, match="not a UTF-8 CSV"):
        load_trace(tmp_path / "binary.csv")


def test_trust_accepts_bool_and_link_refs_both_forms() -> None:
    text = DEFAULT.replace("trust: 3}", "trust: true}").replace("link: device-edge", "link: [edge, device]")
    scenario = parse_scenario(text, SCENARIOS / "default.yaml")
    assert scenario.node("device").trust == 2
    event = scenario.timeline[0]
    assert isinstance(event, TraceEvent) and event.link == ("edge", "device")
    assert scenario.link("edge", "device").bw_mbit == 20
    load = scenario.timeline[1]
    assert isinstance(load, CpuLoadEvent) and load.duration_s == 30


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "absent.yaml")


def test_iface_names_fit_and_never_collide() -> None:
    names = {iface_name(node, i) for node in ("a", "ab", "abcdef", "a1", "a10") for i in range(36)}
    assert len(names) == 5 * 36
    assert max(len(n) for n in names) == MAX_IFNAME_CHARS
    with pytest.raises(IfaceNameError):
        iface_name("abcdefg", 0)
    with pytest.raises(IfaceNameError):
        iface_name("a", 36)
    with pytest.raises(IfaceNameError, match="15"):
        iface_name("abcdef", 0, prefix="mecsplit-x")


def test_cli_validate_and_schema() -> None:
    from mecsplit.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["testbed", "validate", *map(str, SHIPPED)])
    assert ok.exit_code == 0, ok.output
    schema = runner.invoke(app, ["testbed", "schema"])
    assert schema.exit_code == 0
    assert "nodes" in json.loads(schema.output)["properties"]


def test_cli_validate_refuses_broken_file(tmp_path: Path) -> None:
    from mecsplit.cli import app

    path = tmp_path / "bad.yaml"
    path.write_text(DEFAULT.replace("bw_mbit: 50, delay_ms: 20", "bw_mbit: -1, delay_ms: 20"))
    result = CliRunner().invoke(app, ["testbed", "validate", "--json", str(path)])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False
    assert report["problems"][0]["field"] == "links[1].bw_mbit"
    assert report["problems"][0]["line"] == _line_of(path.read_text(), "bw_mbit: -1")
