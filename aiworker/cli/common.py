"""What every command shares: the Typer app, the consoles, the options, reading the
config (one line per problem, exit 2) and opening the node's state DB."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from aiworker import logs
from aiworker.config import Config
from aiworker.config_loader import DEFAULT_CONFIG, ConfigError, load_config

if TYPE_CHECKING:  # the commands import their stages lazily, to start fast
    from aiworker.store.db import StateDB


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="aiworker: DICOM network AI node for knee MRI.")


PIPED_WIDTH = 200  # output into a file or a pipe: wide enough that no table cell wraps

console = Console(width=None if sys.stdout.isatty() else PIPED_WIDTH)


err = Console(stderr=True)


ConfigOption = Annotated[Path, typer.Option(
    "--config", "-c", envvar="AIWORKER_CONFIG",
    help="YAML config file (default: $AIWORKER_CONFIG, else config/aiworker.yaml).")]


AETOption = Annotated[str, typer.Option(
    "--called-ae", "-aec", help="Called AE title of the remote node (dcmtk's -aec).")]


CallingOption = Annotated[str | None, typer.Option(
    "--calling-ae", "-aet", help="Our (calling) AE title (dcmtk's -aet); default: "
                                 "node.ae_title from the config.")]


def _show_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        console.print(f"aiworker {version('aiworker')}", highlight=False)
        raise typer.Exit(0)


VERBOSE = threading.Event()  # --verbose: other libraries log at logging.level too


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True,
        help="Print the version and exit.")] = False,
          verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Let the libraries (highdicom, pydicom, MONAI, ...) log at "
                                "logging.level too, not only their warnings.")] = False,
          ) -> None:
    """aiworker: DICOM network AI node for knee MRI."""
    if verbose:
        VERBOSE.set()


def read_config(path: Path) -> Config:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.problems:  # plain print: one line per problem, never wrapped
            print(f"config error: {line}", file=sys.stderr)
        raise typer.Exit(2) from exc
    if VERBOSE.is_set():
        config.logging.verbose = True
    logs.setup(config.logging.level, config.logging.format, config.logging.verbose)
    return config


def client_config(path: Path) -> Config:
    """The config for the SCU commands, which also run away from a node's folder: the
    embedded defaults when the default file is not there."""
    if path == DEFAULT_CONFIG and not path.exists():
        return Config()
    return read_config(path)


def select_config(path: Path) -> Config:
    """The config ``select`` works with; away from a node's folder, the bundled defaults."""
    from aiworker.select.rules import INSTALL_ROOT

    if path == DEFAULT_CONFIG and not path.exists() and (INSTALL_ROOT / DEFAULT_CONFIG).exists():
        path = INSTALL_ROOT / DEFAULT_CONFIG
    return client_config(path)


def since_seconds(text: str | None) -> float | None:
    """``--since`` as seconds: a number with a unit, s, m, h, d or w."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise typer.BadParameter("use a number and a unit: 30m, 12h, 7d, 2w", param_hint="--since")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def node_db(config: Path | Config, command: str, why_empty: str) -> StateDB:
    """The node's state DB (by its config, or the config file's path); exit 1 saying
    ``why_empty`` when it has none yet."""
    from aiworker.store.backend import STATE_ERRORS, describe
    from aiworker.store.db import StateDB, state_location

    cfg = config if isinstance(config, Config) else read_config(config)
    where = state_location(cfg)
    if isinstance(where, Path) and not where.exists():
        err.print(f"{command}: no state DB at {where}: {why_empty}", highlight=False,
                  markup=False)
        raise typer.Exit(1)
    try:
        return StateDB(where, cfg.state.busy_timeout_s)
    except STATE_ERRORS as exc:
        err.print(f"{command}: cannot open the state at {describe(where)}: "
                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}",
                  highlight=False, markup=False)
        raise typer.Exit(1) from exc
