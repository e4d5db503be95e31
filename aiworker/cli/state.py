"""Commands on the node's state: ``status``, ``retry``, ``resend`` and ``purge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from aiworker.config_loader import DEFAULT_CONFIG
from aiworker.store.layout import DataPaths

if TYPE_CHECKING:  # the commands import their stages lazily, to start fast
    from aiworker.store.jobs import Job

from aiworker.cli.common import (
    ConfigOption,
    app,
    console,
    err,
    node_db,
    read_config,
)


@app.command()
def status(config: ConfigOption = DEFAULT_CONFIG,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
           problems: Annotated[int, typer.Option(help="How many recent problems to list.")] = 10,
           ) -> None:
    """List received studies (series, instance counts, state) and recent problems."""
    from aiworker.store.backend import describe
    from aiworker.store.db import StateDB, state_location
    from aiworker.store.status import status_report

    cfg = read_config(config)
    where = state_location(cfg)
    db = (StateDB(where, cfg.state.busy_timeout_s)
          if not isinstance(where, Path) or where.exists() else None)
    report = status_report(db, problems) if db else {"studies": [], "problems": []}
    studies = report["studies"]
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if not studies:
        console.print(f"no studies received yet (state DB: {describe(where)})")
    for study in report["studies"]:
        _print_study_status(study)
    if report["problems"]:
        table = Table(title="recent problems (newest first)", title_justify="left")
        for column in ("when", "what", "from", "status", "why"):
            table.add_column(column)
        for p in report["problems"]:
            table.add_row(p["at"], p["kind"], p["calling_ae"] or "", p["status"] or "",
                          p["reason"] or "")
        console.print(table)


def _print_study_status(study: dict[str, Any]) -> None:
    """One study's series table, with each series' verdict per pipeline role, then each
    pipeline's decision on one line."""
    table = Table(title=f"study {study['study_uid']}  [{study['state']}]", title_justify="left")
    verdict_keys = sorted({key for s in study["series"] for key in s["selection"]})
    for column in ("#", "modality", "description", "instances", "state", "closed by",
                   *verdict_keys):
        table.add_column(column, overflow="fold")
    for s in study["series"]:
        verdicts = [s["selection"].get(key) for key in verdict_keys]
        table.add_row(str(s["series_number"] or ""), s["modality"], s["description"],
                      str(s["instances"]), s["state"], s["closed_by"] or "",
                      *(_verdict_cell(v) for v in verdicts))
    console.print(table)
    for pipeline, decision in study["selection"].items():
        console.print(f"  {pipeline}: {_decision_line(decision, study)}", highlight=False)
        for job in decision["jobs"]:
            if job["state"] != "superseded":
                console.print(f"    {_job_line(job)}", highlight=False, markup=False,
                              soft_wrap=True)
    for row in study["outbox"]:
        console.print(f"  {_outbox_line(row)}", highlight=False, markup=False, soft_wrap=True)


def _outbox_line(row: dict[str, Any]) -> str:
    """An outbox row in words: destination, object, state, attempts and the last error."""
    line = (f"outbox {row['destination']} {row['object_kind']}: {row['state']}, "
            f"{row['attempts']} attempt(s)")
    return f"{line}, last error: {row['last_error']}" if row["last_error"] else line


def _job_line(job: dict[str, Any]) -> str:
    """A job in words: its state, model, device and time per step, then its findings, or
    its error with its kind and how to retry it."""
    short = job["job_id"][:8]
    line = f"job {short} {job['state']}: {job['model']}"
    timings = job["timings"] or {}
    if job["device"]:
        line += f" on {job['device']}"
    if "total" in timings:
        steps = ", ".join(f"{step} {seconds:.2f}" for step, seconds in timings.items()
                          if step != "total")
        line += f" in {timings['total']:.2f} s ({steps})"
    if job["state"] == "failed":
        retry = f"queue it again: aiworker retry {short}"
        return f"{line}\n      {job['error_kind']} error: {job['error']} ({retry})"
    findings = job["findings"] or {}
    volumes = ", ".join(f"{name} {ml:.1f} mL"
                        for name, ml in findings.get("volumes_ml", {}).items())
    heads = ", ".join(f"{name} {head['decision']} (p {head['probability']:.2f})"
                      for name, head in findings.get("classification", {}).items())
    shown = "; ".join(part for part in (volumes, heads) if part)
    return f"{line}\n      {shown}" if shown else line


def _verdict_cell(verdict: dict[str, Any] | None) -> str:
    """A series' verdict in the status table: chosen, a match not preferred, or why not."""
    if verdict is None:
        return ""
    if not verdict["matched"]:
        return verdict["reason"]
    return "chosen" if verdict["reason"].startswith("chosen") else "matches, not preferred"


def _decision_line(decision: dict[str, Any], study: dict[str, Any]) -> str:
    """A pipeline's decision in words: the job and chosen series, or why there is none."""
    if not decision["matched"]:
        return f"no match: {decision['reason']}"
    labels = {s["series_uid"]: f"series {s['series_number']}"
              + (f" '{s['description']}'" if s["description"] else "")
              for s in study["series"]}
    chosen = ", ".join(f"{role}: {labels.get(uid, uid)}"
                       for role, uid in decision["chosen"].items())
    current = [j for j in decision["jobs"] if j["state"] != "superseded"]
    jobs = ", ".join(f"job {j['job_id'][:8]} {j['state']}" for j in current) or "no job"
    return f"{jobs} ({chosen})"


JobArgument = Annotated[str, typer.Argument(
    help="The job id, or its first characters as `aiworker status` shows them.")]


@app.command()
def retry(job: JobArgument, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Queue a failed job again; the running node picks it up."""
    _requeue_failed(job, config, "retry")


@app.command()
def resend(job: Annotated[str | None, typer.Argument(
               help="A job id or its first characters: queue it again if it failed, and "
                    "its dead outbox rows.")] = None,
           study: Annotated[str | None, typer.Option(
               "--study", help="Send every sent or dead object of this study again.")] = None,
           dead: Annotated[bool, typer.Option(
               "--dead", help="Send every dead outbox row again.")] = False,
           config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Send results again: a job's dead rows (and the job, when it failed), a whole study,
    or every dead row; the running node sends them."""
    if [job is not None, study is not None, dead].count(True) != 1:
        err.print("resend: name one of JOB, --study UID or --dead", highlight=False)
        raise typer.Exit(2)
    found = None if job is None else _find_job(job, config)
    if job is not None and (found is None or found.state == "failed"):
        _requeue_failed(job, config, "resend")  # queues it again, or says why not
        return
    requeued = _requeue_outbox(config, found and found.job_id, study)
    if found is not None and not requeued:
        err.print(f"resend: job {found.job_id} is {found.state}, not failed, and none "
                  "of its outbox rows is dead", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{requeued} outbox row(s) queued again; the running node sends them: "
                  "follow them with `aiworker status`", highlight=False, markup=False)


def _find_job(ref: str, config: Path) -> Job | None:
    """The one job ``ref`` names (an exact id or a unique prefix); None when it names none
    or several, or the node has no state DB yet."""
    from aiworker.store.db import state_location
    from aiworker.store.jobs import JobError

    where = state_location(read_config(config))
    if isinstance(where, Path) and not where.exists():
        return None
    db = node_db(config, "resend", "no jobs yet")
    try:
        return db.find_job(ref)
    except JobError:
        return None
    finally:
        db.close()


def _requeue_outbox(config: Path, job: str | None, study: str | None) -> int:
    """Queue outbox rows again: the dead rows of the job ``job``, every sent or dead row
    of ``study``, or, when neither is given, every dead row. Returns how many."""
    from aiworker.store.outbox import Outbox

    db = node_db(config, "resend", "nothing sent yet")
    try:
        outbox = Outbox(db)
        if study is not None:
            return outbox.resend_study(study)
        return outbox.resend_dead() if job is None else outbox.resend_job(job)
    finally:
        db.close()


@app.command()
def purge(studies: Annotated[list[str] | None, typer.Argument(
              help="Study Instance UIDs to forget now: their files, results and state.")] = None,
          expired: Annotated[bool, typer.Option(
              "--expired", help="Run retention now: remove every delivered study older than "
                                "storage.retention_days (and the oldest ones while the disk "
                                "is below storage.emergency_free_percent).")] = False,
          force: Annotated[bool, typer.Option(
              "--force", help="Also forget a study whose job is queued or running.")] = False,
          config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Forget studies (spool, results, state rows), or apply retention now."""
    from aiworker.store.retention import (
        PurgeRefused,
        RetentionPolicy,
        apply_retention,
        open_tables,
        purge_study,
    )

    if bool(studies) == expired:
        err.print("purge: name STUDY_UID... or --expired", highlight=False)
        raise typer.Exit(2)
    cfg = read_config(config)
    db, paths = node_db(config, "purge", "no studies yet"), DataPaths(cfg.storage.data_dir)
    refused = 0
    try:
        open_tables(db)
        if expired:
            purged = apply_retention(db, paths, RetentionPolicy(
                cfg.storage.retention_days, cfg.storage.emergency_free_percent))
        else:
            purged = []
            for uid in studies or []:
                try:
                    purged.append(purge_study(db, paths, uid, "operator", force))
                except PurgeRefused as exc:
                    err.print(f"purge: {exc}", highlight=False, soft_wrap=True)
                    refused += 1
    finally:
        db.close()
    for gone in purged:
        console.print(f"study {gone.study_uid} removed ({gone.reason}): {gone.instances} "
                      f"instance(s), {gone.bytes} bytes, {gone.jobs} job(s)",
                      highlight=False, soft_wrap=True)
    if expired and not purged:
        console.print("nothing to remove", highlight=False)
    raise typer.Exit(1 if refused else 0)


def _requeue_failed(ref: str, config: Path, command: str) -> None:
    """Re-queue the failed job ``ref`` names in the node's state DB; exit 1 when it names
    no job, several, or one that is not failed."""
    from aiworker.store.jobs import JobError

    db = node_db(config, command, "no jobs yet")
    try:
        job = db.retry_job(ref)
    except JobError as exc:
        err.print(f"{command}: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    finally:
        db.close()
    console.print(f"job {job.job_id} ({job.model}, study {job.study_uid}) queued "
                  f"again after {job.attempts} attempt(s); it had failed "
                  f"({job.error_kind}): {job.error}\n"
                  "the running node picks it up: follow it with `aiworker status`",
                  highlight=False, markup=False, soft_wrap=True)
