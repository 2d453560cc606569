"""What cleanup counts as ours: everything with the prefix (down --force) or one testbed exactly (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbed.cleanup import Scope


def test_broad_scope_takes_every_prefixed_name() -> None:
    broad = Scope("mecsplit")
    assert broad.interface("mecsplitb0p1") and broad.interface("mecsplittb0") and broad.interface("mecsplitx")
    assert broad.cgroup("mecsplitt-n1") and broad.netns("mecsplit-foo")
    assert not broad.interface("eth0") and not broad.interface("docker0") and not broad.container("other-x")
    # down --force with the default prefix also removes the bench's and the tests' containers
    assert broad.container("mecsplitk-src") and broad.container("mecsplit-edge-s1")


def test_exact_scope_spares_other_testbeds_with_a_longer_prefix() -> None:
    exact = Scope("mecsplit", exact=True)
    assert (
        exact.interface("mecsplitb12") and exact.interface("mecsplitb12p0") and exact.interface("mecsplitm3")
    )
    assert not exact.interface("mecsplittb0") and not exact.interface("mecsplitkm")
    assert exact.cgroup("mecsplit-edge") and not exact.cgroup("mecsplitt-edge")
    assert exact.shell("mininet:mecsplit-edge") and exact.shell("mininet:mecsplitb0")
    assert not exact.shell("mininet:mecsplitt-edge") and not exact.shell("mininet:h1")
    assert exact.container("mecsplit-edge") and not exact.container("mecsplitk-src")


def test_iptables_rules_match_by_comment_or_interface() -> None:
    exact = Scope("mecsplitt", exact=True)
    ours = "-A DOCKER-USER -i mecsplittb0 -o mecsplittb0 -m comment --comment mecsplitt -j ACCEPT"
    theirs = "-A DOCKER-USER -i mecsplitb0 -o mecsplitb0 -m comment --comment mecsplit -j ACCEPT"
    assert exact.iptables_line(ours) and not exact.iptables_line(theirs)
    assert Scope("mecsplit").iptables_line(ours) and Scope("mecsplit").iptables_line(theirs)
    assert not Scope("mecsplit").iptables_line("-A FORWARD -i docker0 -j ACCEPT")


def test_a_cgroup_tree_that_vanishes_while_it_is_removed_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``testbed down --force`` crashed when Docker removed a container's cgroup while it walked the node's
    tree. Here a child disappears between being listed and being read (plain folders stand in for the
    cgroup file system, whose folders rmdir removes with their files)."""
    from testbed.node import remove_cgroup_tree

    root = tmp_path / "mecsplitz-edge"
    (root / "gone").mkdir(parents=True)
    (root / "kept" / "inner").mkdir(parents=True)
    listed = Path.iterdir

    def racing(self: Path) -> Any:
        if self == root / "gone":
            self.rmdir()  # listed as a child, removed by Docker before it is walked
        return listed(self)

    monkeypatch.setattr(Path, "iterdir", racing)
    remove_cgroup_tree(root)
    assert not root.exists()
    remove_cgroup_tree(tmp_path / "never-was")
