"""``mecsplit models ...``: prepare the per-layer model store and list what it holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

models_app = typer.Typer(help="The per-layer model store: prepare presets, list them.", no_args_is_help=True)


def _store_dir(store: Path | None) -> Path:
    from mecsplit.settings import Settings

    # A fresh Settings, not the cached one: MECSPLIT_HOME may change between calls in one process (tests).
    return store if store is not None else Settings().store_dir


@models_app.command("prepare")
def prepare_cmd(
    names: list[str] = typer.Argument(None, help="presets to prepare (default: the default set)"),
    all_presets: bool = typer.Option(False, "--all", help="prepare every preset, llama-1b (~5 GB) included"),
    force: bool = typer.Option(False, "--force", help="rebuild even when the entry is present and valid"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Build the store entries (idempotent: valid entries are checked and skipped)."""
    from segments import models
    from segments.errors import SegmentError
    from segments.store import prepare

    store_dir = _store_dir(store)
    chosen = list(models.PRESETS) if all_presets else (names or list(models.DEFAULT_PREPARE))
    try:
        for name in chosen:
            models.get_preset(name)
        for name in chosen:
            result = prepare(name, store_dir, force=force)
            verb = "valid, skipped" if result.skipped else "prepared"
            typer.echo(f"{name}: {verb} in {result.elapsed_s:.1f} s ({result.store_bytes / 1e6:.1f} MB)")
    except SegmentError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"store: {store_dir}")


@models_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="print JSON lines instead of a table"),
    verify: bool = typer.Option(False, "--verify", help="check every file's sha256 (slower)"),
    store: Path | None = typer.Option(None, help="store folder (default: $MECSPLIT_HOME/store)"),
) -> None:
    """Every preset with its shape, store size and whether it is prepared."""
    from rich.console import Console
    from rich.table import Table

    from segments import models
    from segments.errors import StoreError
    from segments.store import read_manifest
    from segments.store import verify as verify_entry

    store_dir = _store_dir(store)
    rows: list[dict[str, object]] = []
    for preset in models.PRESETS.values():
        row: dict[str, object] = {
            "name": preset.name,
            "arch": preset.arch,
            "kind": preset.kind,
            "layers": preset.num_layers,
            "hidden": preset.hidden_size,
            "description": preset.description,
        }
        try:
            manifest = (
                verify_entry(store_dir, preset.name) if verify else read_manifest(store_dir, preset.name)
            )
            row |= {
                "layers": manifest.num_layers,
                "hidden": manifest.hidden_size,
                "store_bytes": manifest.store_bytes,
                "prepared": True,
            }
        except StoreError as exc:
            row |= {
                "store_bytes": None,
                "prepared": False,
                "problem": str(exc),
            }
        rows.append(row)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table("name", "kind", "arch", "layers", "hidden", "store size", "prepared?", title=str(store_dir))
    for row in rows:
        size = row["store_bytes"]
        table.add_row(
            str(row["name"]),
            str(row["kind"]),
            str(row["arch"]),
            str(row["layers"]),
            str(row["hidden"]),
            "-" if size is None else f"{int(size) / 1e6:.1f} MB",  # type: ignore[call-overload]
            "yes" if row["prepared"] else "no",
        )
    Console().print(table)


def bench_numerics_cmd(
    runs: int = typer.Option(3, min=1, help="rounds; each runs every MKL setting once, interleaved"),
    steps: int = typer.Option(32, min=1, help="timed decode steps per run"),
    as_json: bool = typer.Option(True, "--json/--no-json", help="print JSON (the only format)"),
) -> None:
    """What pinning MKL's code path (MKL_CBWR, which exactness rests on) costs per decoded token: a
    SmolLM2-135M-shaped model on one thread, unpinned against AVX2, COMPATIBLE and AVX2,STRICT, each in a
    process of its own (JSON on stdout, progress on stderr)."""
    from mecsplit import numerics_bench

    result = numerics_bench.run(runs, steps, progress=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(result, indent=2 if as_json else None))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    bench.command("numerics")(bench_numerics_cmd)
