"""The per-layer store: layout, idempotent preparation, checksums, loading only a segment's files, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from store_helpers import BIG, StoreFor
from typer.testing import CliRunner

from segments import models, store
from segments.errors import ChecksumError, ModelNotPreparedError, UnknownModelError
from segments.runner import SegmentRunner
from segments.spec import SegmentSpec
from testbed.node import check_readable_by_containers

MODEL = "llama-tiny"


def _copy_entry(model_store: StoreFor, tmp_path: Path, model: str = MODEL) -> Path:
    target = tmp_path / "store"
    shutil.copytree(store.model_dir(model_store(model), model), target / model)
    return target


def test_layout_and_manifest_checksums(model_store: StoreFor) -> None:
    store_dir = model_store(MODEL)
    manifest = store.read_manifest(store_dir, MODEL)
    entry = store.model_dir(store_dir, MODEL)
    expected = {"manifest.json", "config.json", "embed.safetensors", "head.safetensors", "tokenizer.json"}
    expected |= {f"layers/{i:03d}.safetensors" for i in range(manifest.num_layers)}
    on_disk = {str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file()}
    assert expected <= on_disk
    assert set(manifest.files) == on_disk - {"manifest.json", store.VERIFIED_RECORD}
    for relpath, file_entry in manifest.files.items():
        data = (entry / relpath).read_bytes()
        assert hashlib.sha256(data).hexdigest() == file_entry.sha256
        assert len(data) == file_entry.bytes
    assert manifest.info.num_layers == 4 and manifest.kind == "causal_lm"
    assert all(b > 0 for b in manifest.layer_weight_bytes)
    assert json.loads((entry / "config.json").read_text())["num_hidden_layers"] == 4


def test_prepare_is_idempotent_and_seeded(model_store: StoreFor, tmp_path: Path) -> None:
    first = store.prepare("gpt2-tiny", tmp_path / "a", progress=False)
    again = store.prepare("gpt2-tiny", tmp_path / "a", progress=False)
    assert not first.skipped and again.skipped
    store.prepare("gpt2-tiny", tmp_path / "b", progress=False)
    a = store.read_manifest(tmp_path / "a", "gpt2-tiny").files
    b = store.read_manifest(tmp_path / "b", "gpt2-tiny").files
    # Same seed, same bytes: random presets are reproducible on every machine.
    assert a["layers/002.safetensors"] == b["layers/002.safetensors"]
    assert a["embed.safetensors"] == b["embed.safetensors"]
    # The testbed's containers read the store as an unprivileged user (safetensors itself writes 0600).
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "a").rglob("*.safetensors")}
    assert modes == {0o644}, modes


def test_corruption_is_detected_and_names_the_fix(model_store: StoreFor, tmp_path: Path) -> None:
    store_dir = _copy_entry(model_store, tmp_path)
    path = store.model_dir(store_dir, MODEL) / "layers/002.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"mecsplit models prepare {MODEL}"):
        SegmentRunner(store_dir, SegmentSpec(MODEL, 2, 4), max_sessions=1, max_kv_bytes=BIG)
    assert not store.is_prepared(store_dir, MODEL)
    # A segment that does not own the damaged layer never reads it.
    SegmentRunner(store_dir, SegmentSpec(MODEL, 0, 2), max_sessions=1, max_kv_bytes=BIG)
    # Preparing again repairs the entry.
    assert not store.prepare(MODEL, store_dir, progress=False).skipped
    assert store.is_prepared(store_dir, MODEL)


def test_a_file_is_hashed_again_only_when_it_changed(
    model_store: StoreFor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = _copy_entry(model_store, tmp_path)
    manifest = store.read_manifest(store_dir, MODEL)
    relpath = "layers/002.safetensors"
    path = store.model_dir(store_dir, MODEL) / relpath
    hashed: list[str] = []
    real_sha256 = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: hashed.append(p.name) or real_sha256(p))
    store.verify_file(store_dir, manifest, relpath)
    store.verify_file(store_dir, manifest, relpath)
    # The record is readable like the weights: the testbed mounts the store for an unprivileged user.
    check_readable_by_containers(store_dir)
    # What a warm standby relies on: any range loads after `verify` without reading the store again.
    SegmentRunner(store_dir, SegmentSpec(MODEL, 2, 3), max_sessions=1, max_kv_bytes=BIG)
    assert hashed.count("002.safetensors") == 1
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # damaged in place after it was verified: same size and inode, a later mtime
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the clock may not have ticked
    with pytest.raises(ChecksumError, match="damaged"):
        store.verify_file(store_dir, manifest, relpath)
    assert hashed.count("002.safetensors") == 2


def test_segment_reads_only_its_own_files(model_store: StoreFor, tmp_path: Path) -> None:
    store_dir = _copy_entry(model_store, tmp_path)
    entry = store.model_dir(store_dir, MODEL)
    for name in ("embed.safetensors", "layers/000.safetensors", "layers/003.safetensors", "head.safetensors"):
        (entry / name).unlink()
    runner = SegmentRunner(store_dir, SegmentSpec(MODEL, 1, 3), max_sessions=1, max_kv_bytes=BIG)
    manifest = store.read_manifest(store_dir, MODEL)
    assert runner.weight_bytes == sum(manifest.layer_weight_bytes[1:3])
    out = runner.forward("s", torch.zeros(1, 3, manifest.hidden_size), 0)
    assert out.shape == (1, 3, manifest.hidden_size)
    with pytest.raises(ChecksumError, match="missing"):
        SegmentRunner(store_dir, SegmentSpec(MODEL, 0, 1), max_sessions=1, max_kv_bytes=BIG)


def test_missing_and_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(ModelNotPreparedError, match="mecsplit models prepare gpt2-124m"):
        SegmentRunner(tmp_path, SegmentSpec("gpt2-124m", 0, 1), max_sessions=1, max_kv_bytes=BIG)
    with pytest.raises(UnknownModelError, match="known presets"):
        store.read_manifest(tmp_path, "no-such-model")
    assert set(models.DEFAULT_PREPARE) == {
        "smollm2-135m",
        "minilm-l6",
        "gpt2-tiny",
        "llama-tiny",
        "gpt2-124m",
    }


def test_models_cli_prepare_and_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mecsplit.cli import app

    monkeypatch.setenv("MECSPLIT_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["models", "prepare", "gpt2-tiny"])
    assert result.exit_code == 0, result.output
    assert "gpt2-tiny: prepared" in result.output
    assert "valid, skipped" in runner.invoke(app, ["models", "prepare", "gpt2-tiny"]).output
    listed = runner.invoke(app, ["models", "list", "--json", "--verify"])
    rows = {row["name"]: row for row in map(json.loads, listed.output.splitlines())}
    assert rows["gpt2-tiny"]["prepared"] is True and rows["gpt2-tiny"]["layers"] == 4
    assert rows["smollm2-135m"]["prepared"] is False and rows["smollm2-135m"]["layers"] == 30
    bad = runner.invoke(app, ["models", "prepare", "nope"])
    assert bad.exit_code == 1 and "known presets" in bad.output
