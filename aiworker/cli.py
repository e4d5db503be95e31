"""The ``aiworker`` command line: serve, echo, send, status, phantom.

Every command but ``phantom`` takes ``--config FILE`` (default ``config/aiworker.yaml``). A
bad config stops the command with one line per problem and exit code 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from aiworker import logs
from aiworker.config import DEFAULT_CONFIG, Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="aiworker: DICOM network AI node for knee MRI.")
console = Console()
err = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
AETOption = Annotated[str, typer.Option("--aet", help="Called AE title of the remote node.")]
CallingOption = Annotated[str | None, typer.Option(
    "--calling-aet", help="Our (calling) AE title; default: node.ae_title from the config.")]


def _config(path: Path) -> Config:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.problems:  # plain print: one line per problem, never wrapped
            print(f"config error: {line}", file=sys.stderr)
        raise typer.Exit(2) from exc
    logs.setup(config.logging.level, config.logging.json_lines)
    return config


def _client_config(path: Path) -> Config:
    """The config for the SCU commands, which also run away from a node's folder: the
    embedded defaults when the default file is not there."""
    if path == DEFAULT_CONFIG and not path.exists():
        return Config()
    return _config(path)


@app.command()
def serve(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Start the node: the DICOM listener and the completion scheduler."""
    from aiworker.node import serve as run_node

    cfg = _config(config)
    run_node(cfg, on_ready=lambda: _print_banner(cfg))


def _print_banner(cfg: Config) -> None:
    """Where the node listens and how to send it a study (printed once it is listening)."""
    node = cfg.node
    where = "127.0.0.1" if node.host in ("0.0.0.0", "::") else node.host
    tls = " +tls" if node.tls.enabled else ""
    console.print(
        f"aiworker listening as AE [bold]{node.ae_title}[/] on {node.host}:{node.port}, "
        f"data in {cfg.storage.data_dir.resolve()}\n"
        f"  check it:      echoscu{tls} {where} {node.port} -aec {node.ae_title}\n"
        f"  send a study:  storescu{tls} +sd +r -aec {node.ae_title} {where} {node.port} STUDYDIR\n"
        f"  then:          aiworker status",
        highlight=False,
    )
    sys.stdout.flush()


@app.command()
def echo(host: str, port: int, aet: AETOption = "AIWORKER", calling_aet: CallingOption = None,
         config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Send a C-ECHO to HOST PORT."""
    from aiworker.dispatch.scu import SCUError
    from aiworker.dispatch.scu import echo as c_echo

    try:
        status = c_echo(host, port, aet, calling_aet or _client_config(config).node.ae_title)
    except SCUError as exc:
        err.print(f"echo failed: {exc}")
        raise typer.Exit(1) from exc
    console.print(f"C-ECHO {aet}@{host}:{port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def send(path: Path, host: str, port: int, aet: AETOption = "AIWORKER",
         calling_aet: CallingOption = None, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """C-STORE a DICOM file, or every file under a folder, to HOST PORT."""
    from aiworker.dispatch.scu import SCUError, dicom_files
    from aiworker.dispatch.scu import send as c_store

    cfg = _client_config(config)
    files = dicom_files(path)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"sending to {aet}", total=len(files))
        try:
            summary = c_store(files, host, port, aet, calling_aet or cfg.node.ae_title,
                              progress=lambda _p, _s: bar.advance(task))
        except SCUError as exc:
            err.print(f"send failed: {exc}")
            raise typer.Exit(1) from exc
    for status, count in sorted(summary.statuses.items()):
        name = "success" if status == 0 else "failure" if status >= 0 else "no response"
        console.print(f"  status 0x{max(status, 0):04X} ({name}): {count}")
    if summary.unreadable:
        console.print(f"  not DICOM, skipped: {len(summary.unreadable)}")
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def status(config: ConfigOption = DEFAULT_CONFIG,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
           problems: Annotated[int, typer.Option(help="How many recent problems to list.")] = 10,
           ) -> None:
    """List received studies (series, instance counts, state) and recent problems."""
    from aiworker.store.db import PROBLEM_EVENTS, StateDB
    from aiworker.store.layout import DataPaths

    cfg = _config(config)
    db_path = DataPaths(cfg.storage.data_dir).db
    db = StateDB(db_path) if db_path.exists() else None
    studies = db.studies() if db else []
    recent = db.events(PROBLEM_EVENTS, limit=problems) if db else []
    report = {"studies": [_study_json(s) for s in studies],
              "problems": [_problem_json(e) for e in recent]}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if not studies:
        console.print(f"no studies received yet (state DB: {db_path})")
    for study in report["studies"]:
        table = Table(title=f"study {study['study_uid']}  [{study['state']}]", title_justify="left")
        for column in ("#", "modality", "description", "instances", "state", "closed by"):
            table.add_column(column)
        for s in study["series"]:
            table.add_row(str(s["series_number"] or ""), s["modality"], s["description"],
                          str(s["instances"]), s["state"], s["closed_by"] or "")
        console.print(table)
    if report["problems"]:
        table = Table(title="recent problems (newest first)", title_justify="left")
        for column in ("when", "what", "from", "status", "why"):
            table.add_column(column)
        for p in report["problems"]:
            table.add_row(p["at"], p["kind"], p["calling_ae"] or "", p["status"] or "",
                          p["reason"] or "")
        console.print(table)


def _problem_json(event: dict[str, Any]) -> dict[str, Any]:
    """The stable ``status --json`` shape of one problem event (documented in the README)."""
    detail = event["detail"]
    return {
        "at": _when(event["at"]),
        "kind": event["kind"],
        "calling_ae": detail.get("calling_ae"),
        "status": detail.get("status"),
        "reason": detail.get("reason"),
        "study_uid": event["study_uid"],
        "series_uid": event["series_uid"],
        "sop_uid": event["sop_uid"],
        "detail": detail,
    }


def _when(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def _study_json(study: dict[str, Any]) -> dict[str, Any]:
    """The stable ``status --json`` shape of one study (documented in the README)."""
    return {
        "study_uid": study["study_uid"],
        "state": study["state"],
        "calling_ae": study["calling_ae"],
        "first_received": _when(study["first_received"]),
        "last_received": _when(study["last_received"]),
        "completed_at": _when(study["completed_at"]),
        "instances": sum(s["instance_count"] for s in study["series"]),
        "series": [
            {
                "series_uid": s["series_uid"],
                "series_number": s["series_number"],
                "modality": s["modality"],
                "description": s["series_description"],
                "sop_class_uid": s["sop_class_uid"],
                "instances": s["instance_count"],
                "frames": s["frame_count"],
                "bytes": s["bytes"],
                "expected_frames": s["expected_frames"],
                "state": s["state"],
                "closed_by": s["closed_by"],
                "first_received": _when(s["first_received"]),
                "last_received": _when(s["last_received"]),
                "completed_at": _when(s["completed_at"]),
            }
            for s in study["series"]
        ],
    }


@app.command()
def phantom(out_dir: Path, seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
            slices: Annotated[int, typer.Option(help="Slices per series.")] = 20,
            size: Annotated[int, typer.Option(help="Rows and columns.")] = 128) -> None:
    """Write a synthetic 3-series MR study (sagittal, coronal, axial) to OUT_DIR."""
    from aiworker.phantom.simple import DEFAULT_SERIES, write_study

    series = tuple(replace(s, slices=slices, rows=size, columns=size) for s in DEFAULT_SERIES)
    paths = write_study(out_dir, series, seed=seed)
    console.print(f"wrote {len(paths)} instances in {len(series)} series to {out_dir}")


if __name__ == "__main__":
    app()
