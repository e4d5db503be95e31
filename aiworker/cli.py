"""The ``aiworker`` command line: serve, echo, send, status, select, infer, retry, resend,
purge, phantom, train-demo, demo.

Every command but ``phantom`` and ``demo`` takes ``--config FILE`` (default: the
``AIWORKER_CONFIG`` variable, else ``config/aiworker.yaml``), so ``docker exec ... aiworker
status`` reads the server's file. A bad config stops the command with one line per problem and exit
code 2.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from aiworker import logs
from aiworker.config import DEFAULT_CONFIG, Config, ConfigError, load_config

if TYPE_CHECKING:  # the commands import their stages lazily, to start fast
    from aiworker.offline import Run
    from aiworker.select.decide import Pipeline, StudyDecision
    from aiworker.store.db import StateDB

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="aiworker: DICOM network AI node for knee MRI.")
console = Console()
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


def _config(path: Path) -> Config:
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


@app.command()
def status(config: ConfigOption = DEFAULT_CONFIG,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
           problems: Annotated[int, typer.Option(help="How many recent problems to list.")] = 10,
           ) -> None:
    """List received studies (series, instance counts, state) and recent problems."""
    from aiworker.store.db import StateDB
    from aiworker.store.layout import DataPaths
    from aiworker.store.status import status_report

    cfg = _config(config)
    db_path = DataPaths(cfg.storage.data_dir).db
    db = StateDB(db_path) if db_path.exists() else None
    report = status_report(db, problems) if db else {"studies": [], "problems": []}
    studies = report["studies"]
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if not studies:
        console.print(f"no studies received yet (state DB: {db_path})")
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
    if job is not None and (found is None or found["state"] == "failed"):
        _requeue_failed(job, config, "resend")  # queues it again, or says why not
        return
    requeued = _requeue_outbox(config, found and found["job_id"], study)
    if found is not None and not requeued:
        err.print(f"resend: job {found['job_id']} is {found['state']}, not failed, and none "
                  "of its outbox rows is dead", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{requeued} outbox row(s) queued again; the running node sends them: "
                  "follow them with `aiworker status`", highlight=False, markup=False)


def _find_job(ref: str, config: Path) -> dict[str, Any] | None:
    """The one job ``ref`` names (an exact id or a unique prefix); None when it names none
    or several."""
    from aiworker.store.db import StateDB
    from aiworker.store.layout import DataPaths

    db_path = DataPaths(_config(config).storage.data_dir).db
    if not db_path.exists():
        return None
    db = StateDB(db_path)
    try:
        jobs = [j for j in db.jobs() if j["job_id"].startswith(ref)]
    finally:
        db.close()
    exact = [j for j in jobs if j["job_id"] == ref]
    found = exact or jobs
    return found[0] if len(found) == 1 else None


def _node_db(config: Path, command: str, why_empty: str) -> StateDB:
    """The running node's state DB; exit 1 saying ``why_empty`` when it has none yet."""
    from aiworker.store.db import StateDB
    from aiworker.store.layout import DataPaths

    db_path = DataPaths(_config(config).storage.data_dir).db
    if not db_path.exists():
        err.print(f"{command}: no state DB at {db_path}: {why_empty}", highlight=False,
                  markup=False)
        raise typer.Exit(1)
    return StateDB(db_path)


def _requeue_outbox(config: Path, job: str | None, study: str | None) -> int:
    """Queue outbox rows again: the dead rows of the job ``job``, every sent or dead row
    of ``study``, or, when neither is given, every dead row. Returns how many."""
    from aiworker.store.outbox import Outbox

    db = _node_db(config, "resend", "nothing sent yet")
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
    from aiworker.store.layout import DataPaths
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
    cfg = _config(config)
    db, paths = _node_db(config, "purge", "no studies yet"), DataPaths(cfg.storage.data_dir)
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

    db = _node_db(config, command, "no jobs yet")
    try:
        job = db.retry_job(ref)
    except JobError as exc:
        err.print(f"{command}: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    finally:
        db.close()
    console.print(f"job {job['job_id']} ({job['model']}, study {job['study_uid']}) queued "
                  f"again after {job['attempts']} attempt(s); it had failed "
                  f"({job['error_kind']}): {job['error']}\n"
                  "the running node picks it up: follow it with `aiworker status`",
                  highlight=False, markup=False, soft_wrap=True)


RulesOption = Annotated[list[Path] | None, typer.Option(
    "--rules", help="A rule file (repeatable); default: the configured pipelines' rule files.")]
PipelineOption = Annotated[str | None, typer.Option(
    "--pipeline", help="The pipeline a --rules file stands for; default: the configured "
                       "pipeline, when there is one, else the file's name.")]


@app.command()
def select(
    path: Annotated[Path | None, typer.Argument(
        help="A folder of DICOM files (any nesting), or a spooled study folder.")] = None,
    rules: RulesOption = None,
    pipeline: PipelineOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
    replay: Annotated[bool, typer.Option(
        "--replay", help="Run the rules over the studies in the spool and list what would "
                         "now be selected differently; creates no jobs.")] = False,
    since: Annotated[str | None, typer.Option(
        help="With --replay: only studies completed within this long (30m, 12h, 7d, 2w).")
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Dry-run series selection: each study's series, features, verdicts and choice."""
    from aiworker.select.decide import decide, feature_settings
    from aiworker.select.headers import scan_folder

    since_s = _since(since)
    cfg = _select_config(config)
    pipelines = _select_pipelines(cfg, rules, pipeline)
    if replay:
        _replay(cfg, pipelines, since_s, as_json)
        return
    if path is None:
        err.print("select needs PATH (a folder of DICOM files), or --replay")
        raise typer.Exit(2)
    if not path.exists():
        err.print(f"no such file or folder: {path}")
        raise typer.Exit(2)
    studies, skipped = scan_folder(path)
    decisions = [decide(study, pipelines, feature_settings(cfg)) for study in studies]
    if as_json:
        print(json.dumps([d.as_dict() for d in decisions], indent=2))
    else:
        for decision in decisions:
            _print_decision(decision)
        if skipped:
            console.print(f"skipped {skipped} files that are not DICOM")
    if not studies:
        err.print(f"no DICOM series found under {path}")
        raise typer.Exit(1)


def _select_config(path: Path) -> Config:
    """The config ``select`` works with; away from a node's folder, the bundled defaults."""
    from aiworker.select.rules import INSTALL_ROOT

    if path == DEFAULT_CONFIG and not path.exists() and (INSTALL_ROOT / DEFAULT_CONFIG).exists():
        path = INSTALL_ROOT / DEFAULT_CONFIG
    return _client_config(path)


def _select_pipelines(cfg: Config, rules: list[Path] | None, name: str | None
                      ) -> list[Pipeline]:
    """The configured pipelines, or one per ``--rules`` file (named as --pipeline says)."""
    from aiworker.select.decide import Pipeline, configured_pipelines
    from aiworker.select.rules import RuleError, load_rules

    try:
        if not rules:
            pipelines = configured_pipelines(cfg)
        else:
            models = {p.name: p.model for p in cfg.pipelines}
            names = [name or (cfg.pipelines[0].name if len(cfg.pipelines) == 1 else file.stem)
                     for file in rules]
            pipelines = [Pipeline(n, models.get(n, ""), load_rules(file))
                         for n, file in zip(names, rules, strict=True)]
    except RuleError as exc:
        for line in exc.problems:
            print(f"rules error: {line}", file=sys.stderr)
        raise typer.Exit(2) from exc
    if not pipelines:
        err.print("no pipelines configured: pass --rules FILE")
        raise typer.Exit(2)
    return pipelines


def _since(text: str | None) -> float | None:
    """``--since`` as seconds: a number with a unit, s, m, h, d or w."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match:
        raise typer.BadParameter("use a number and a unit: 30m, 12h, 7d, 2w", param_hint="--since")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return float(match.group(1)) * unit


def _print_decision(decision: StudyDecision) -> None:
    """One study's dry run: a table of series, features and verdicts, then the choice."""
    from aiworker.select.decide import describe_series

    keys = sorted({key for s in decision.series for key in s.verdicts})
    table = Table(title=f"study {decision.study_uid}", title_justify="left")
    for column in ("#", "description", "plane", "weighting", "FS", "slices"):
        table.add_column(column, no_wrap=True)
    for key in keys:
        table.add_column(key, overflow="fold", ratio=1)
    for s in decision.series:
        f = s.features
        table.add_row(str(f.series_number or ""), s.description, f.plane, f.weighting,
                      "yes" if f.fat_suppressed else "no", str(f.slice_count),
                      *(s.verdicts[k].reason for k in keys))
    console.print(table)
    for pipeline, roles in decision.chosen.items():
        if decision.matched(pipeline):
            chosen = ", ".join(f"{role}: {describe_series(decision, uid)}"
                               for role, uid in roles.items())
            console.print(f"  {pipeline}: {chosen}", highlight=False)
        else:
            console.print(f"  {pipeline}: no match: {decision.reason(pipeline)}", highlight=False)


def _replay(cfg: Config, pipelines: list[Pipeline], since_s: float | None, as_json: bool
            ) -> None:
    """Apply ``pipelines`` to the complete studies in the spool; list the differences with
    the recorded decisions. Reads the state DB, never writes a decision or a job."""
    from aiworker.select.decide import (
        changes,
        decide,
        describe_series,
        feature_settings,
        study_headers_from_paths,
    )
    from aiworker.store.db import StateDB
    from aiworker.store.layout import DataPaths
    from aiworker.store.states import COMPLETE

    db_path = DataPaths(cfg.storage.data_dir).db
    if not db_path.exists():
        err.print(f"no state DB at {db_path}: nothing to replay")
        raise typer.Exit(1)
    db = StateDB(db_path)
    cutoff = None if since_s is None else time.time() - since_s
    studies = [s for s in db.studies() if s["state"] == COMPLETE
               and (cutoff is None or (s["completed_at"] or 0) >= cutoff)]
    stored = {(d["study_uid"], d["pipeline"]): d["explanation"] for d in db.selections()}
    found = []  # (change, the series before, the series after), as a table names them
    for study in studies:
        headers = study_headers_from_paths(study["study_uid"],
                                           db.study_instance_paths(study["study_uid"]))
        decision = decide(headers, pipelines, feature_settings(cfg))
        for p in pipelines:
            for change in changes(stored.get((study["study_uid"], p.name)), decision, p.name):
                found.append((change, describe_series(decision, change.before),
                              describe_series(decision, change.after)))
    db.close()
    if as_json:
        print(json.dumps({"studies_checked": len(studies),
                          "changes": [c.as_dict() for c, _, _ in found]}, indent=2))
        return
    rule_files = ", ".join(p.rules.source for p in pipelines)
    console.print(f"{len(studies)} complete studies checked with {rule_files}: "
                  f"{len(found)} selections would change", highlight=False)
    if found:
        table = Table(title="would now be selected differently", title_justify="left")
        for column in ("study", "pipeline/role", "before", "after", "why"):
            table.add_column(column, overflow="fold")
        for change, before, after in found:
            table.add_row(change.study_uid, f"{change.pipeline}/{change.role}",
                          before if change.recorded else "(no decision recorded)", after,
                          change.why)
        console.print(table)


@app.command()
def infer(
    path: Annotated[Path, typer.Argument(
        exists=True, help="A study folder, or a folder of studies (DICOM files, any nesting).")],
    out: Annotated[Path, typer.Option("--out", help="Each study's files go to "
                                                    "OUT/<StudyInstanceUID>/.")],
    model: Annotated[str | None, typer.Option(
        help="name or name@version; default: the configured pipeline's model.")] = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda or cuda:N; default: inference.device from the config.")] = None,
    models_dir: Annotated[Path | None, typer.Option(
        help="A folder of site models (<folder>/model.yaml) beside the bundled ones; "
             "default: inference.models_dir from the config.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Offline selection and inference over a folder of studies: per study a label volume
    (NIfTI), findings and timings. Exit code 1 when any study has no result."""
    from aiworker import offline
    from aiworker.select.headers import scan_folder

    run = _infer_run(_select_config(config), model, device, models_dir, out)
    studies, _skipped = scan_folder(path)
    if not studies:
        err.print(f"no DICOM series found under {path}")
        raise typer.Exit(1)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"inference ({run.engine.model_id})", total=len(studies))
        results = offline.run_studies(studies, run, on_done=lambda _r: bar.advance(task))
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        console.print(offline.summary_table(results))
        for line in offline.problem_lines(results):
            console.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if all(r.status == offline.DONE for r in results) else 1)


def _infer_run(cfg: Config, model: str | None, device: str | None, models_dir: Path | None,
               out: Path) -> Run:
    """The pipeline and the loaded engine ``infer`` runs; a problem exits with code 2."""
    from aiworker.infer.manifest import ManifestError, ModelError
    from aiworker.offline import OfflineError, Run, load_engine, pick_pipeline
    from aiworker.select.decide import configured_pipelines, feature_settings
    from aiworker.select.rules import RuleError

    device = device or cfg.inference.device
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise typer.BadParameter("use auto, cpu, cuda or cuda:N", param_hint="--device")
    try:
        pipeline = pick_pipeline(configured_pipelines(cfg), model)
        engine = load_engine(model or pipeline.model, models_dir or cfg.inference.models_dir,
                             device)
    except (RuleError, ManifestError) as exc:
        for line in exc.problems:
            print(f"infer: {line}", file=sys.stderr)
        raise typer.Exit(2) from exc
    except (OfflineError, ModelError) as exc:
        err.print(f"infer: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    return Run(pipeline, engine, feature_settings(cfg), out, cfg.hl7.model_dump())


@app.command("train-demo")
def train_demo(
    seed: Annotated[int | None, typer.Option(help="Seed of everything random (default 0).")] = None,
    cases: Annotated[int | None, typer.Option(help="Training studies (default 160).")] = None,
    fit_cases: Annotated[int | None, typer.Option(
        help="Studies the ACL head is fitted on (default 60).")] = None,
    iterations: Annotated[int | None, typer.Option(
        help="Training iterations (default 3000).")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Processes drawing the studies (default: one per CPU).")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where model.pt and model.yaml go (default: the bundled knee_demo folder).")] = None,
) -> None:
    """Train the bundled knee-demo model on phantoms (python -m aiworker.models.knee_demo.train)."""
    from aiworker.models.knee_demo import train

    options = {"--seed": seed, "--cases": cases, "--fit-cases": fit_cases,
               "--iterations": iterations, "--workers": workers, "--out": out}
    train.main([arg for flag, value in options.items() if value is not None
                for arg in (flag, str(value))])


@app.command()
def phantom(
    out_dir: Path,
    cases: Annotated[int, typer.Option(min=1, help="How many studies (case-0000, ...).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first case; case i uses seed + i.")] = 0,
    vendor: Annotated[str, typer.Option(
        help="siemens, ge, philips, or random (per case).")] = "random",
    acl: Annotated[str, typer.Option(help="random, intact or torn.")] = "random",
    side: Annotated[str, typer.Option(help="R, L, or random (per case).")] = "random",
    transfer_syntax: Annotated[str, typer.Option(
        help="explicit, implicit, jpeg2000, jpegls or rle (lossless).")] = "explicit",
    enhanced: Annotated[bool, typer.Option(
        help="Write each series as one Enhanced MR multi-frame instance.")] = False,
    rescan_probability: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Chance that a case has a re-scanned series.")] = 0.2,
    derived_probability: Annotated[float, typer.Option(
        min=0.0, max=1.0,
        help="Chance that a case has a reformat (MPR) of its sagittal PD FS.")] = 0.2,
    descriptions: Annotated[str, typer.Option(
        help="vendor, generic, empty, or random (per case, see --plain-descriptions).")
    ] = "random",
    plain_descriptions: Annotated[float, typer.Option(
        min=0.0, max=1.0,
        help="With --descriptions random: chance of generic or empty descriptions.")] = 0.25,
    max_oblique: Annotated[float, typer.Option(
        min=0.0, max=20.0, help="Largest oblique angle of a plane, degrees.")] = 15.0,
    series: Annotated[str | None, typer.Option(
        help="Comma-separated roles instead of the routine protocol, e.g. "
             "sag_pd_fs,cor_pd_fs,ax_t2_fs.")] = None,
    matrix: Annotated[int | None, typer.Option(
        min=16, max=1024, help="Rows and columns of every series.")] = None,
    slices: Annotated[int | None, typer.Option(
        min=1, help="Slices of every series but the localizer.")] = None,
    patient_name: Annotated[str | None, typer.Option(
        help="DICOM PN, e.g. 'MÜLLER^JÖRG'; default: drawn per case.")] = None,
    truth: Annotated[bool, typer.Option(help="Write the ground truth beside each study.")
                     ] = True,
) -> None:
    """Write synthetic knee MR studies with ground truth to OUT_DIR/case-NNNN/."""
    from aiworker.phantom.protocol import Overrides
    from aiworker.phantom.study import StudyOptions, write_study

    roles = tuple(r.strip() for r in series.split(",") if r.strip()) if series else None
    options = StudyOptions(
        vendor=None if vendor == "random" else vendor, acl=acl,
        side=None if side == "random" else side, transfer_syntax=transfer_syntax,
        enhanced=enhanced, rescan_probability=rescan_probability,
        derived_probability=derived_probability,
        descriptions=None if descriptions == "random" else descriptions,
        plain_descriptions_probability=plain_descriptions, max_oblique=max_oblique,
        patient_name=patient_name, overrides=Overrides(roles, matrix, slices), truth=truth)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("writing studies", total=cases)
        for index in range(cases):
            case_dir = out_dir / f"case-{index:04d}"
            try:
                study = write_study(case_dir, replace(options, seed=seed + index))
            except (ValueError, RuntimeError) as exc:  # a bad option; an encoder missing
                err.print(f"phantom: {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from exc
            acl_state = "torn" if study.case.acl_torn else "intact"
            console.print(f"{case_dir}: {study.plan.vendor.key} {study.plan.scanner.model},"
                          f" {len(study.series)} series, {len(study.files)} files, "
                          f"{study.case.side} knee, ACL {acl_state}", highlight=False,
                          soft_wrap=True)
            bar.advance(task)


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(
        help="Folder for the study, the node's data and what arrives; default: a new "
             "temporary folder (kept).")] = None,
    keep: Annotated[bool, typer.Option(
        help="Keep the node and the stand-in PACS and RIS running until Ctrl-C.")] = False,
    to: Annotated[str | None, typer.Option(
        "--to", help="HOST:PORT of a running node: only send it the phantom study.")] = None,
    aet: AETOption = "AIWORKER",
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the results.")
                       ] = 300.0,
) -> None:
    """See it work: a phantom knee study through a throwaway node to a stand-in PACS and RIS."""
    from aiworker.demo import DemoError, push_study, run_demo

    try:
        if to is None:
            run_demo(workdir, timeout, keep, console)
        else:
            host, _, port = to.rpartition(":")
            if not host or not port.isdigit():
                err.print(f"demo: --to wants HOST:PORT, not {to!r}", highlight=False)
                raise typer.Exit(2)
            push_study(host, int(port), aet, workdir, console)
    except DemoError as exc:
        err.print(f"demo failed: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc


if __name__ == "__main__":
    app()
