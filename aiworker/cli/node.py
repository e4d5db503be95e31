"""Commands that talk DICOM: ``serve`` (the node), ``echo`` and ``send``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress

from aiworker.config import Config
from aiworker.config_loader import DEFAULT_CONFIG

if TYPE_CHECKING:  # the commands import their stages lazily, to start fast
    pass

from aiworker.cli.common import (
    AETOption,
    CallingOption,
    ConfigOption,
    app,
    client_config,
    console,
    err,
    read_config,
)

RoleOption = Annotated[str, typer.Option(
    "--role", help="all: every stage in this process; receive: the DICOM listener, "
    "completion, retention and web only (several receivers share a PostgreSQL state.url; "
    "`aiworker worker` runs the rest)")]
QueuesOption = Annotated[str | None, typer.Option(
    "--queues", help="comma-separated: select,infer,results,outbox (default: all); "
    "infer alone makes a GPU worker that keeps its models loaded")]


@app.command()
def serve(config: ConfigOption = DEFAULT_CONFIG, role: RoleOption = "all") -> None:
    """Start the node: the DICOM listener, the completion scheduler and (role all) every
    stage."""
    from aiworker.node import ROLES
    from aiworker.node import serve as run_node

    if role not in ROLES:
        raise typer.BadParameter(f"use {' or '.join(ROLES)}", param_hint="--role")
    cfg = read_config(config)
    run_node(cfg, on_ready=lambda: _print_banner(cfg), role=role)


@app.command()
def worker(config: ConfigOption = DEFAULT_CONFIG, queues: QueuesOption = None) -> None:
    """Run stage jobs (select, infer, results, outbox) from the shared PostgreSQL state;
    start several, on several hosts."""
    from aiworker.node import work
    from aiworker.queue.worker import parse_queues

    try:
        chosen = parse_queues(queues)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--queues") from exc
    work(read_config(config), chosen)


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
    if cfg.web.enabled:
        web = "127.0.0.1" if cfg.web.host in ("0.0.0.0", "::") else cfg.web.host
        console.print(f"  dashboard:     http://{web}:{cfg.web.port}/  (API /docs, /metrics, "
                      "/readyz)", highlight=False, soft_wrap=True)
    sys.stdout.flush()


@app.command()
def echo(host: str, port: int, aet: AETOption = "AIWORKER", calling_aet: CallingOption = None,
         config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Send a C-ECHO to HOST PORT."""
    from aiworker.dispatch.scu import SCUError
    from aiworker.dispatch.scu import echo as c_echo

    try:
        status = c_echo(host, port, aet, calling_aet or client_config(config).node.ae_title)
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

    cfg = client_config(config)
    if not path.exists():
        err.print(f"send: {path} does not exist", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    files = dicom_files(path)
    if not files:
        err.print(f"send: no files under {path}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
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
        for skipped in summary.unreadable:
            console.print(f"    {skipped}", highlight=False, soft_wrap=True)
    if not summary.statuses:
        err.print(f"send: none of the {len(files)} file(s) under {path} is DICOM",
                  highlight=False, soft_wrap=True)
    raise typer.Exit(0 if summary.ok else 1)
