"""The unprivileged container user reads a bind-mounted file it owns, and only that (Docker).

Secrets will reach segment containers as read-only bind-mounted files: the host must give them to
``SEGMENT_UID`` (mode 0400), since a hardened container has no capability to bypass file permissions.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from testbed import errors
from testbed.node import (
    SEGMENT_GID,
    SEGMENT_UID,
    _hardening_args,
    check_readable_by_containers,
    docker,
    ensure_base_image,
)

PREFIX = "mecsplith"


def test_a_store_the_containers_user_cannot_read_is_refused_before_anything_starts(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "m" / "layers").mkdir(parents=True)
    weights = store / "m" / "layers" / "000.safetensors"
    weights.write_bytes(b"w")
    weights.chmod(0o644)
    check_readable_by_containers(store)
    weights.chmod(0o600)  # what safetensors writes
    with pytest.raises(errors.TestbedError, match=r"1 paths .*000.safetensors.*chmod -R a\+rX"):
        check_readable_by_containers(store)


@pytest.mark.root
@pytest.mark.docker
def test_a_hardened_container_reads_a_file_owned_by_its_uid_and_not_roots(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    os.chown(secrets_dir, SEGMENT_UID, SEGMENT_GID)
    mine, roots = secrets_dir / "mine", secrets_dir / "roots"
    mine.write_text("s3cret")
    roots.write_text("not yours")
    mine.chmod(0o400)
    roots.chmod(0o600)
    os.chown(mine, SEGMENT_UID, SEGMENT_GID)
    image = ensure_base_image(PREFIX)
    name = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
    try:
        out = subprocess.run(
            ["docker", "run", "--rm", "--name", name, "--network", "none", *_hardening_args(8),
             "-v", "/usr:/usr:ro", "-v", f"{secrets_dir}:/run/secrets:ro", image, "/bin/sh", "-c",
             "cat /run/secrets/mine; echo; cat /run/secrets/roots || echo denied"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        docker("rm", "-f", name, check=False)
        subprocess.run(["docker", "rmi", image], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["s3cret", "denied"], (out.stdout, out.stderr)
