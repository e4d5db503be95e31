"""``aiworker export``: a de-identified research export of studies the node ran, written to
a folder or sent to a configured destination (:mod:`aiworker.export`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from aiworker.cli.common import ConfigOption, app, console, err, node_db, read_config, since_seconds
from aiworker.config import Config
from aiworker.config_loader import DEFAULT_CONFIG

if TYPE_CHECKING:
    from aiworker.export.export import ExportReport
    from aiworker.export.send import SendReport
    from aiworker.store.db import StateDB

PROFILE_HELP = ("basic: PS3.15 Basic Profile, dates removed; retain-dates: + Retain "
                "Longitudinal Temporal Information with Modified Dates; research: "
                "retain-dates + retain-device + clean-descriptors.")


@app.command("export")
def export_command(
        to: Annotated[str, typer.Option(
            "--to", metavar="DIR|DESTINATION",
            help="A folder to write the export to, or the name of a destination of the "
                 "config (kind dicom or dicomweb) to send it to; ./NAME for a folder "
                 "that has a destination's name.")],
        studies: Annotated[list[str] | None, typer.Argument(
            metavar="STUDY_UID", help="Studies to export (Study Instance UIDs).",
            show_default=False)] = None,
        since: Annotated[str | None, typer.Option(
            help="Also every study with a job done within this: 30m, 12h, 7d, 2w.")] = None,
        deidentify: Annotated[bool, typer.Option(
            "--deidentify", help="De-identify (required: the export writes de-identified "
                                 "data only).")] = False,
        profile: Annotated[str, typer.Option(help=PROFILE_HELP)] = "basic",
        option: Annotated[list[str] | None, typer.Option(
            "--option", metavar="NAME", help="Add one option to the profile: "
                                             "retain-dates, retain-device, clean-descriptors "
                                             "(repeatable).", show_default=False)] = None,
        mapping: Annotated[Path | None, typer.Option(
            help="Where to write the mapping (original -> new UIDs, patient pseudonyms), "
                 "mode 0600, outside the export (default: beside the folder, "
                 "DIR-mapping.json).", show_default=False)] = None,
        no_mapping: Annotated[bool, typer.Option(
            "--no-mapping", help="Write no mapping: the export cannot be traced back.")] = False,
        reuse_mapping: Annotated[Path | None, typer.Option(
            help="An earlier export's mapping file: the same sources get the same UIDs, "
                 "pseudonyms and date shift (to send again, or to add studies to a cohort).",
            show_default=False)] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
        config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Export studies the node ran (the series the model read, with the node's SEG, SR
    and SC) de-identified per DICOM PS3.15's Basic Profile and the options chosen."""
    from aiworker.export.deid import Options
    from aiworker.export.export import ExportError, export_studies, mapping_seed

    if not deidentify:
        _fail("aiworker export writes de-identified data only: add --deidentify", 2)
    try:
        options = Options.of(profile, option or ())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile/--option") from exc
    if no_mapping and (mapping or reuse_mapping):
        _fail("--no-mapping writes no mapping: leave out --mapping / --reuse-mapping", 2)
    cfg = read_config(config)
    sending = to in cfg.destinations and "/" not in to
    if sending:
        _check_destination(cfg, to)
    try:
        seed = mapping_seed(reuse_mapping) if reuse_mapping else None
        db = node_db(cfg, "export", "the node has run nothing to export yet")
        uids = _studies(db, studies or [], since_seconds(since))
        out_dir = _out_dir(cfg, to, sending)
        mapping_file = None if no_mapping else _mapping_file(out_dir, mapping, reuse_mapping)
        report = export_studies(db, uids, out_dir, options, profile, mapping_file, seed)
    except ExportError as exc:
        _fail(f"export: {exc}", 1)
    sent = _send(cfg, to, report, out_dir) if sending else None
    _show(report, sent, as_json)
    if sent is not None and not sent.ok:
        raise typer.Exit(1)


def _fail(message: str, code: int) -> None:
    err.print(message, highlight=False, markup=False)
    raise typer.Exit(code)


def _studies(db: StateDB, given: list[str], since_s: float | None) -> list[str]:
    """The studies asked for: each given one must have a done job; ``--since`` adds
    every study with a job done within it."""
    from aiworker.export.export import ExportError, studies_since
    from aiworker.store.states import DONE

    if not given and since_s is None:
        raise ExportError("name a study (STUDY_UID) or --since 7d")
    for uid in given:
        if not any(job.state == DONE for job in db.jobs(uid)):
            raise ExportError(f"study {uid}: no done job (the node has no result for it; "
                              "see `aiworker status`)")
    found = studies_since(db, since_s) if since_s is not None else []
    if since_s is not None and not found and not given:
        raise ExportError(f"no study with a job done within --since ({since_s:g} s)")
    return list(dict.fromkeys([*given, *found]))


def _out_dir(cfg: Config, to: str, sending: bool) -> Path:
    """The folder written: ``--to DIR``, or for a destination a staging folder under the
    node's ``exports/`` (removed once sent)."""
    from aiworker.export.export import node_export_dir

    return node_export_dir(cfg.storage.data_dir, to) if sending else Path(to)


def _mapping_file(out_dir: Path, given: Path | None, reused: Path | None) -> Path:
    """Where the mapping goes; an existing one is never overwritten (it may be the only
    way back to an earlier export) unless it is the one being reused."""
    from aiworker.export.export import ExportError, default_mapping_path

    path = given or default_mapping_path(out_dir)
    if path.exists() and not (reused and path.resolve() == reused.resolve()):
        raise ExportError(f"the mapping file {path} exists (an earlier export's way back): "
                          "choose another --mapping, or --reuse-mapping it")
    return path


def _check_destination(cfg: Config, name: str) -> None:
    """Refuse, before exporting anything, a destination that takes no DICOM."""
    from aiworker.export.send import SendError, check_sendable

    try:
        check_sendable(name, cfg.destinations[name])
    except SendError as exc:
        _fail(f"export: {exc}", 2)


def _send(cfg: Config, name: str, report: ExportReport, out_dir: Path) -> SendReport:
    """Send the staged export to destination ``name``, then remove the staging folder."""
    from aiworker.export.send import send_export

    try:
        return send_export(out_dir, report.files, name, cfg.destinations[name],
                           cfg.node.ae_title)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _show(report: ExportReport, sent: SendReport | None, as_json: bool) -> None:
    """The export in words (or JSON): files, where, the profile, burned-in annotation,
    the mapping, and what a destination took."""
    if as_json:
        body = report.as_dict()
        if sent is not None:
            body["sent"] = {"destination": sent.destination, "sent": sent.sent,
                            "not_sent": sent.not_sent}
        print(json.dumps(body, indent=2))
        return
    where = f"sent to {sent.destination}" if sent is not None else f"in {report.out_dir}"
    console.print(f"exported {report.studies} study(ies), {len(report.files)} file(s) {where}; "
                  f"profile {report.profile} (options: {', '.join(report.options) or 'none'})",
                  highlight=False, markup=False)
    if sent is not None:
        console.print(f"{sent.sent} sent, {len(sent.not_sent)} not sent", highlight=False)
        for row in sent.not_sent:
            console.print(f"  {row['file']}: {row['outcome']}: {row['reason']}",
                          highlight=False, markup=False, soft_wrap=True)
    for item in report.burned_in:
        console.print(f"check before sharing: {item['file']} ({item['kind']}) has burned-in "
                      f"annotation ({item['burned_in_annotation']})", highlight=False,
                      markup=False, soft_wrap=True)
    console.print(f"mapping (keep it private): {report.mapping}" if report.mapping
                  else "no mapping written: the export cannot be traced back",
                  highlight=False, markup=False, soft_wrap=True)
