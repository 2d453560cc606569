"""The ``mecsplit`` command line.

Each package contributes its commands through a module in ``mecsplit.commands`` that defines
``register(app, bench)``; heavy imports (torch, prefect, docker) happen inside the commands so that
``mecsplit --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="mecsplit",
    help="Run foundation models split into layer segments across (emulated) MEC edge nodes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bench = typer.Typer(
    help="Benchmarks that print JSON (several runs, medians, ratios to a baseline).", no_args_is_help=True
)
app.add_typer(bench, name="bench")


@bench.callback()
def _bench_cleans_up_on_signals() -> None:
    # Benchmarks build testbeds, namespaces and servers of their own: a killed one removes them.
    from mecsplit.process import exit_cleanly_on_signals

    exit_cleanly_on_signals()


# Modules under mecsplit.commands, each with register(app, bench).
_COMMAND_MODULES: tuple[str, ...] = ("testbed", "models", "flows", "run", "plan", "reaction")


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"mecsplit.commands.{name}")
        module.register(app, bench)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
