"""The per-layer model store: each model pre-cut into one safetensors file per layer.

Layout of ``<store_dir>/<model>/``::

    manifest.json          name, arch, kind, hf config, shapes, per-file sha256 + bytes, per-layer bytes
    config.json            the Hugging Face config
    tokenizer files        whatever ``save_pretrained`` of the tokenizer writes (tokenizer.json, ...)
    embed.safetensors      token (and position) embeddings: what the first segment needs
    layers/<i:03d>.safetensors   one transformer block each
    head.safetensors       final norm + LM head (empty for an encoder): what the last segment needs

Tensors keep the Hugging Face state-dict names of the whole model, so the reference (whole) model loads the
union of the files as-is, and a segment strips the prefixes of its own layers. The manifest is written last
and the folder is built under a temporary name and renamed, so a manifest means a complete entry. Loading
a part checks that file's sha256 first: a damaged store fails loudly instead of computing garbage. A process
hashes a file once and re-hashes it only when its size, mtime or inode changed (see ``verify_file``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from segments import models
from segments.errors import ChecksumError, ModelNotPreparedError, StoreError
from segments.spec import ModelInfo

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBED_FILE = "embed.safetensors"
HEAD_FILE = "head.safetensors"
_HASH_CHUNK_BYTES = 4 * 1024 * 1024

Part = str | int  # "embed", "head" or a layer index


def layer_file(layer: int) -> str:
    return f"layers/{layer:03d}.safetensors"


def part_file(part: Part) -> str:
    if part == "embed":
        return EMBED_FILE
    if part == "head":
        return HEAD_FILE
    if isinstance(part, int):
        return layer_file(part)
    raise StoreError(f"unknown store part {part!r}")


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha256: str = Field(min_length=64, max_length=64)
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: int
    name: str
    arch: str
    kind: str
    source: str
    dtype: str
    hf_config: dict[str, Any]
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    files: dict[str, FileEntry]
    layer_weight_bytes: list[int]
    embed_weight_bytes: int
    head_weight_bytes: int
    prepare_s: float

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            kind=self.kind,  # type: ignore[arg-type]
            arch=self.arch,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
        )

    @property
    def store_bytes(self) -> int:
        return sum(entry.bytes for entry in self.files.values())


def model_dir(store_dir: Path, name: str) -> Path:
    return Path(store_dir) / name


def _not_prepared(name: str, why: str) -> ModelNotPreparedError:
    return ModelNotPreparedError(
        f"model {name!r} is not prepared ({why}); run `mecsplit models prepare {name}`"
    )


def read_manifest(store_dir: Path, name: str) -> Manifest:
    """The manifest of ``name``; ``ModelNotPreparedError`` if the entry is missing or from another format."""
    models.get_preset(name)
    path = model_dir(store_dir, name) / MANIFEST
    if not path.is_file():
        raise _not_prepared(name, f"no {path}")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise _not_prepared(name, f"unreadable manifest {path}: {exc.error_count()} errors") from None
    if manifest.format_version != FORMAT_VERSION or manifest.name != name:
        raise _not_prepared(
            name, f"manifest {path} is of format {manifest.format_version}, not {FORMAT_VERSION}"
        )
    return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# Files this process has hashed, with the stat they had and the sha256 they matched. Hashing is most of
# a load (SmolLM2's 30 layers: 0.66 of 0.70 s on a whole core), so a warm standby that verified the
# store when it started loads any range in tens of milliseconds; a file rewritten since (new mtime,
# size or inode: in place or renamed over) is hashed again.
_verified: dict[Path, tuple[int, int, int, str]] = {}
_verified_lock = threading.Lock()


def _stat_key(path: Path, sha256: str) -> tuple[int, int, int, str]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino, sha256)


def verify_file(store_dir: Path, manifest: Manifest, relpath: str) -> Path:
    """Check one file against its manifest entry; return its path. Unchanged since this process last
    verified it against the same sha256, it is not read again."""
    entry = manifest.files.get(relpath)
    if entry is None:
        raise _not_prepared(manifest.name, f"manifest lists no {relpath}")
    path = model_dir(store_dir, manifest.name) / relpath
    redo = f"re-run `mecsplit models prepare {manifest.name} --force`"
    if not path.is_file():
        raise ChecksumError(f"store file {path} is missing; {redo}")
    size = path.stat().st_size
    if size != entry.bytes:
        raise ChecksumError(f"store file {path} has {size} bytes, manifest says {entry.bytes}; {redo}")
    key = _stat_key(path, entry.sha256)
    with _verified_lock:
        if _verified.get(path) == key:
            return path
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ChecksumError(
            f"store file {path} is damaged (sha256 {actual[:12]}… != {entry.sha256[:12]}…); {redo}"
        )
    with _verified_lock:
        _verified[path] = key
    return path


# Hashes that stand across processes: after a full verify, each file's stat and sha256 are recorded
# beside the manifest, and a later process (a standby starting on every deploy) trusts a file whose size,
# mtime and inode still match instead of hashing 540 MB again on a node's small CPU share. A file
# rewritten in place or replaced changes its mtime or inode and is hashed again.
VERIFIED_RECORD = ".verified.json"


def _read_record(directory: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads((directory / VERIFIED_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(directory: Path, record: dict[str, list[Any]]) -> None:
    """Best effort: a store mounted read-only (a node's container) keeps hashing in each process. The
    record is world-readable like the weights: the testbed refuses a store its containers' user cannot
    read every file of, and ``mkstemp`` makes files 0600."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".verified-", suffix=".json")
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, sort_keys=True)
        os.replace(tmp, directory / VERIFIED_RECORD)
    except OSError:
        pass


def verify(store_dir: Path, name: str) -> Manifest:
    """Check every file of the entry; raise ``ChecksumError``/``ModelNotPreparedError`` on the first fault."""
    manifest = read_manifest(store_dir, name)
    directory = model_dir(store_dir, name)
    record = _read_record(directory)
    changed = False
    for relpath in sorted(manifest.files):
        path = directory / relpath
        entry = manifest.files[relpath]
        with contextlib.suppress(OSError):
            key = list(_stat_key(path, entry.sha256))
            if record.get(relpath) == key:
                with _verified_lock:
                    _verified[path] = tuple(key)  # type: ignore[assignment]
                continue
        verify_file(store_dir, manifest, relpath)
        record[relpath] = list(_stat_key(path, entry.sha256))
        changed = True
    # A record written 0600 (before it was made world-readable) is written again.
    if changed or not _world_readable(directory / VERIFIED_RECORD):
        _write_record(directory, {k: v for k, v in record.items() if k in manifest.files})
    return manifest


def _world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def is_prepared(store_dir: Path, name: str) -> bool:
    try:
        verify(store_dir, name)
    except StoreError:
        return False
    return True


def load_part(store_dir: Path, manifest: Manifest, part: Part) -> dict[str, torch.Tensor]:
    """The tensors of one part, after checking the file's sha256."""
    from safetensors.torch import load_file

    path = verify_file(store_dir, manifest, part_file(part))
    return load_file(str(path))


def load_config(store_dir: Path, manifest: Manifest) -> PretrainedConfig:
    from transformers import AutoConfig

    verify_file(store_dir, manifest, "config.json")
    config = AutoConfig.from_pretrained(str(model_dir(store_dir, manifest.name)))
    # One attention implementation for segments and reference alike: equal kernels, equal bits.
    config._attn_implementation = "sdpa"
    return config


def load_tokenizer(store_dir: Path, name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    read_manifest(store_dir, name)
    return AutoTokenizer.from_pretrained(str(model_dir(store_dir, name)))


def build_hf_model(config: PretrainedConfig, kind: str) -> PreTrainedModel:
    """The whole Hugging Face model for ``config`` (weights uninitialised when built under meta)."""
    import torch
    from transformers import AutoModelForCausalLM, BertModel

    if kind == "encoder":
        # The runtime returns the final hidden states; the pooler is not part of the layer chain.
        return BertModel(config, add_pooling_layer=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def expected_tensors(config: PretrainedConfig, kind: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every persistent tensor of the whole model: name -> (shape, is_norm_weight)."""
    import torch

    with torch.device("meta"):
        model = build_hf_model(config, kind)
    modules = dict(model.named_modules())
    expected: dict[str, tuple[tuple[int, ...], bool]] = {}
    for key, tensor in model.state_dict().items():
        owner = modules.get(key.rsplit(".", 1)[0])
        is_norm = key.endswith(".weight") and owner is not None and "Norm" in type(owner).__name__
        expected[key] = (tuple(tensor.shape), is_norm)
    return expected


# ---------------------------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class PrepareResult:
    name: str
    skipped: bool
    elapsed_s: float
    store_bytes: int


TensorParts = Iterator[tuple[Part, dict[str, "torch.Tensor"]]]


def _group_by_part(
    arch: str, state: dict[str, torch.Tensor], expected: dict[str, Any], name: str
) -> TensorParts:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise StoreError(f"weights of {name!r} lack {len(missing)} tensors (first: {missing[:3]})")
    parts: dict[Part, dict[str, torch.Tensor]] = {}
    for key in expected:
        part = models.part_of(arch, key)
        if part is not None:
            parts.setdefault(part, {})[key] = state[key].detach().to("cpu").float().contiguous()
    yield "embed", parts.pop("embed")
    for layer in sorted(k for k in parts if isinstance(k, int)):
        yield layer, parts.pop(layer)
    yield "head", parts.pop("head", {})


def _gguf_source(preset: models.Preset) -> tuple[PretrainedConfig, Callable[[], TensorParts]]:
    from transformers import AutoConfig

    gguf = models.smollm2_gguf_path()
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    def parts() -> TensorParts:
        import torch
        from transformers import AutoModelForCausalLM

        # Dequantises Q4_1 to fp32 (~20 s). save_pretrained fails on a GGUF-loaded model, so the state dict
        # is taken as is and written per layer.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        state = model.state_dict()
        if "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        yield from _group_by_part(preset.arch, state, expected_tensors(config, preset.kind), preset.name)

    return config, parts


def _safetensors_source(preset: models.Preset) -> tuple[PretrainedConfig, Callable[[], TensorParts]]:
    from transformers import AutoConfig

    src = models.minilm_dir()
    config = AutoConfig.from_pretrained(str(src))

    def parts() -> TensorParts:
        from safetensors.torch import load_file

        state = load_file(str(src / "model.safetensors"))
        yield from _group_by_part(preset.arch, state, expected_tensors(config, preset.kind), preset.name)

    return config, parts


def _random_part(
    preset: models.Preset, expected: dict[str, tuple[tuple[int, ...], bool]], part: Part, std: float
) -> dict[str, torch.Tensor]:
    import torch

    # One generator per part, seeded from (preset seed, part): any part can be regenerated alone, so the
    # preparation streams layer by layer and never holds the model.
    index = 0 if part == "embed" else (1 << 20) if part == "head" else int(part) + 1
    generator = torch.Generator().manual_seed((preset.seed or 0) * 1_000_003 + index)
    tensors: dict[str, torch.Tensor] = {}
    for key, (shape, is_norm) in expected.items():
        if models.part_of(preset.arch, key) != part:
            continue
        if is_norm:
            tensors[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            tensors[key] = torch.zeros(shape)
        else:
            tensors[key] = torch.empty(shape).normal_(0.0, std, generator=generator)
    return tensors


def _random_source(preset: models.Preset) -> tuple[PretrainedConfig, Callable[[], TensorParts]]:
    config = models.random_config(preset.name)
    config._attn_implementation = "sdpa"

    def parts() -> TensorParts:
        expected = expected_tensors(config, preset.kind)
        std = float(config.initializer_range)
        yield "embed", _random_part(preset, expected, "embed", std)
        for layer in range(config.num_hidden_layers):
            yield layer, _random_part(preset, expected, layer, std)
        head = _random_part(preset, expected, "head", std)
        if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in head:
            # A tied head is the token embedding itself: regenerate it rather than keep 0.5 GB alive.
            embed = _random_part(preset, expected, "embed", std)
            embed_key = "transformer.wte.weight" if preset.arch == "gpt2" else "model.embed_tokens.weight"
            head["lm_head.weight"] = embed[embed_key]
        yield "head", head

    return config, parts


_SOURCES = {"gguf": _gguf_source, "safetensors": _safetensors_source, "random": _random_source}


def _save_tokenizer(preset: models.Preset, target: Path) -> None:
    if preset.source == "safetensors":
        src = models.minilm_dir()
        for filename in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            if (src / filename).exists():
                shutil.copyfile(src / filename, target / filename)
        return
    models.smollm2_tokenizer().save_pretrained(str(target))


def _write_part(target: Path, part: Part, tensors: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save_file

    path = target / part_file(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    # safetensors writes 0600; the testbed's containers read the store as an unprivileged user.
    path.chmod(0o644)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def prepare(name: str, store_dir: Path, *, force: bool = False, progress: bool = True) -> PrepareResult:
    """Build the store entry of ``name`` (skipped when present and every checksum holds)."""
    preset = models.get_preset(name)
    started = time.perf_counter()
    if not force and is_prepared(store_dir, name):
        manifest = read_manifest(store_dir, name)
        return PrepareResult(name, True, time.perf_counter() - started, manifest.store_bytes)

    final = model_dir(store_dir, name)
    staging = Path(store_dir) / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build(preset, staging, started, progress)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PrepareResult(name, False, time.perf_counter() - started, manifest.store_bytes)


def _build(preset: models.Preset, staging: Path, started: float, progress: bool) -> Manifest:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    config, parts = _SOURCES[preset.source](preset)
    config._attn_implementation = "sdpa"
    num_layers = int(config.num_hidden_layers)
    layer_bytes = [0] * num_layers
    embed_bytes = head_bytes = 0
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task(f"preparing {preset.name}: loading weights", total=num_layers + 2)
        for part, tensors in parts():
            written = _write_part(staging, part, tensors)
            if part == "embed":
                embed_bytes = written
            elif part == "head":
                head_bytes = written
            else:
                layer_bytes[int(part)] = written
            bar.update(task, advance=1, description=f"preparing {preset.name}: wrote {part_file(part)}")
        config.save_pretrained(str(staging))
        _save_tokenizer(preset, staging)
        bar.update(task, description=f"preparing {preset.name}: checksums")
        files = {
            str(path.relative_to(staging)): FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
    if (num_layers, int(config.hidden_size)) != (preset.num_layers, preset.hidden_size):
        raise StoreError(
            f"{preset.name!r} came out with {num_layers} layers x {config.hidden_size} hidden, but its "
            f"preset says {preset.num_layers} x {preset.hidden_size}: its source package changed; "
            "update the preset in segments/models.py"
        )
    if 0 in layer_bytes:
        raise StoreError(f"preparing {preset.name!r} produced no weights for some layers: {layer_bytes}")
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=preset.name,
        arch=preset.arch,
        kind=preset.kind,
        source=preset.source,
        dtype="float32",
        hf_config=json.loads(config.to_json_string(use_diff=False)),
        num_layers=num_layers,
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        files=files,
        layer_weight_bytes=layer_bytes,
        embed_weight_bytes=embed_bytes,
        head_weight_bytes=head_bytes,
        prepare_s=round(time.perf_counter() - started, 3),
    )
    (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    return manifest
