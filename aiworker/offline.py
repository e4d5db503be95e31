"""Offline inference over a folder of studies: ``aiworker infer PATH --out DIR``.

The same selection as ``aiworker select`` (:func:`aiworker.select.headers.scan_folder` and
:func:`aiworker.select.decide.decide`) picks each study's series for one pipeline; the
chosen series run as one job through :func:`aiworker.infer.run.run_job`, the node's own run
(load, infer, write atomically, result objects), on one
:class:`~aiworker.infer.engine.Engine` loaded once for the whole run. Each study that
succeeds gets ``DIR/<StudyInstanceUID>/``:

* ``labels.nii.gz``: the label map on the first input series' own grid (its size, origin,
  spacing and direction);
* ``findings.json``: the study, the selection (pipeline, rules, the chosen series with their
  numbers and descriptions), the model, the device and the engine's findings;
* ``seg.dcm``, ``sr.dcm``, ``report.txt``, ``oru.hl7``, ``preview.png``, ``sc.dcm``: the
  DICOM SEG and SR, the text report, the HL7 ORU^R01 (with the config's ``hl7`` header),
  the preview and its Secondary Capture, as the node writes them
  (:mod:`aiworker.results.objects`);
* ``timings.json``: seconds for load (decode), preprocess, model, postprocess, resample,
  seg, sr, report, hl7, preview and total (selection to written files).

A study without a selected series, or whose series cannot be loaded or run, gets a result
with its reason and failure kind (``data``, ``model``, ``resource``) and the run goes on.
:meth:`StudyResult.as_dict` is the documented ``aiworker infer --json`` entry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from aiworker.infer.engine import Engine
from aiworker.infer.manifest import Manifest, ModelError
from aiworker.infer.registry import Registry
from aiworker.infer.run import JobReply, JobRequest, classify_error, run_job
from aiworker.results.objects import write_job_objects
from aiworker.select.decide import Pipeline, StudyDecision, decide
from aiworker.select.features import FeatureSettings
from aiworker.select.headers import StudyHeaders
from aiworker.select.rules import load_rules, resolve_rules_path
from aiworker.store.files import atomic_write
from aiworker.store.layout import ResultFolder

log = logging.getLogger("aiworker.infer")

KNEE_RULES = Path("config/rules/knee.yaml")  # the bundled rules of the knee pipeline
DONE, NO_SERIES, FAILED = "done", "no_series", "failed"


class OfflineError(Exception):
    """The run cannot start (no pipeline for the model, several to choose from)."""


@dataclass
class StudyResult:
    """What became of one study: its status, the chosen series, findings and timings."""

    study_uid: str
    status: str  # done | no_series | failed
    pipeline: str
    model: str
    series: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> series
    output: str | None = None
    findings: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    device: str | None = None
    error: dict[str, str] | None = None  # {kind, reason}

    def as_dict(self) -> dict[str, Any]:
        """The stable ``aiworker infer --json`` entry of one study (see the README)."""
        return {"study_uid": self.study_uid, "status": self.status,
                "pipeline": self.pipeline, "model": self.model, "series": self.series,
                "output": self.output, "device": self.device, "findings": self.findings,
                "timings": self.timings, "error": self.error}


@dataclass(frozen=True)
class Run:
    """What every study of one run shares: the pipeline, its loaded engine, the feature
    settings of selection and the output folder."""

    pipeline: Pipeline
    engine: Engine
    settings: FeatureSettings
    out_dir: Path
    hl7_settings: dict[str, Any] | None = None  # the config's hl7 section


def pick_pipeline(configured: list[Pipeline], model: str | None) -> Pipeline:
    """The pipeline to run: the configured one (whose model is ``model``, when given);
    with a ``model`` that no pipeline names, the bundled knee rules feeding that model."""
    if model is not None:
        name = model.partition("@")[0]
        matching = [p for p in configured if p.model.partition("@")[0] == name]
        if not matching:
            return Pipeline("knee", model, load_rules(resolve_rules_path(KNEE_RULES)))
        return Pipeline(matching[0].name, model, matching[0].rules)
    if len(configured) != 1:
        names = ", ".join(p.name for p in configured) or "none"
        raise OfflineError(f"{len(configured)} pipelines configured ({names}): "
                           "name the model to run with --model")
    return configured[0]


def load_engine(model: str, models_dir: Path | None, device: str) -> Engine:
    """The model's engine, loaded once; raises ModelError when it cannot be found or read."""
    return Engine(Registry(models_dir).get(model), device)


def run_studies(studies: list[StudyHeaders], run: Run,
                on_done: Callable[[StudyResult], None] | None = None) -> list[StudyResult]:
    """Select, load, infer and write every study in turn; one result per study."""
    results = []
    for study in studies:
        result = infer_study(study, run)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


def infer_study(study: StudyHeaders, run: Run) -> StudyResult:
    """One study: its selection, then (when a series is chosen) inference and its files."""
    started = time.perf_counter()
    decision = decide(study, [run.pipeline], run.settings)
    result = StudyResult(study.study_uid, NO_SERIES, run.pipeline.name, run.engine.model_id,
                         series=chosen_series(decision, run.pipeline.name))
    if not decision.matched(run.pipeline.name):
        result.error = {"kind": "data",
                        "reason": f"no series selected: {decision.reason(run.pipeline.name)}"}
        log.info("study %s: no series selected", study.study_uid)
        return result
    try:
        request = job_request(study, decision, run, result)
    except ModelError as exc:
        reply = JobReply.failed(classify_error(exc))
    else:
        reply = run_job(request, run.engine, write_job_objects)
    if reply.failure is not None:
        result.status = FAILED
        result.error = {"kind": reply.failure.kind,
                        "reason": reply.failure.error.splitlines()[0]}
        log.warning("study %s failed (%s): %s", study.study_uid, result.error["kind"],
                    result.error["reason"])
        return result
    result.status, result.device, result.findings = DONE, reply.device, reply.findings
    result.output = reply.result_dir
    result.timings = reply.timings | {"total": round(time.perf_counter() - started, 4)}
    atomic_write(ResultFolder(Path(reply.result_dir or "")).timings,
                 json.dumps(result.timings, indent=2) + "\n")
    return result


def chosen_series(decision: StudyDecision, pipeline: str) -> dict[str, dict[str, Any]]:
    """Role -> the chosen series' UID, number and description (only roles with a choice)."""
    by_uid = {s.series_uid: s for s in decision.series}
    return {role: {"series_uid": uid, "series_number": by_uid[uid].features.series_number,
                   "description": by_uid[uid].description}
            for role, uid in decision.chosen.get(pipeline, {}).items() if uid is not None}


def input_series(manifest: Manifest, chosen: dict[str, str | None]) -> list[str]:
    """The series UID for each of the model's input channels, in channel order: by role
    name when the rules name the model's channels, else in the rules' role order."""
    channels = manifest.roles
    roles = {role: uid for role, uid in chosen.items() if uid is not None}
    if all(channel in roles for channel in channels):
        return [roles[channel] for channel in channels]
    if len(roles) == len(channels):
        return list(roles.values())
    raise ModelError(f"{manifest.name}: reads channels {', '.join(channels)} but the "
                     f"pipeline's rules choose roles {', '.join(roles)}")


def series_files(study: StudyHeaders, series_uid: str) -> list[Path]:
    """The files of one series of ``study``."""
    series = next(s for s in study.series if s.series_uid == series_uid)
    return [Path(ds.filename) for ds in series.instances]


def job_request(study: StudyHeaders, decision: StudyDecision, run: Run, result: StudyResult
                ) -> JobRequest:
    """The study's job, as the node's inference process would get it: the files of each
    input series, the study's folder, the objects to write (the Secondary Capture and the
    config's HL7 header), and what ``findings.json`` says about the selection."""
    uids = input_series(run.engine.manifest, decision.chosen[run.pipeline.name])
    rules = decision.rules.get(run.pipeline.name)
    about = {"study_uid": result.study_uid, "model": result.model,
             "selection": {"pipeline": run.pipeline.name,
                           "rules": rules.source if rules else None, "series": result.series}}
    return JobRequest(result.study_uid, result.model,
                      [[str(path) for path in series_files(study, uid)] for uid in uids],
                      run.out_dir / result.study_uid,
                      {"secondary_capture": True, "hl7": run.hl7_settings}, about)


def summary_table(results: list[StudyResult]) -> Table:
    """One row per study: the series chosen, the ACL decision, the femur volume, seconds
    (or, for a study without a result, its status; :func:`problem_lines` says why)."""
    table = Table(title="aiworker infer", title_justify="left")
    for column in ("study", "series chosen", "ACL", "femur mL", "seconds"):
        table.add_column(column, overflow="fold")
    for r in results:
        series = ", ".join(f"{s['series_number']} '{s['description']}'"
                           for s in r.series.values()) or "none"
        if r.status != DONE:
            status = "no series selected" if r.status == NO_SERIES else "failed"
            table.add_row(r.study_uid, series, f"[red]{status}[/]", "", "")
            continue
        findings = r.findings or {}
        acl = findings.get("classification", {}).get("acl")
        femur = findings.get("volumes_ml", {}).get("Femur")
        table.add_row(r.study_uid, series,
                      f"{acl['decision']} (p {acl['probability']:.2f})" if acl else "",
                      "" if femur is None else f"{femur:.1f}", f"{r.timings['total']:.1f}")
    return table


def problem_lines(results: list[StudyResult]) -> list[str]:
    """``study UID: kind: reason`` for each study without a result."""
    return [f"{r.study_uid}: {r.error['kind']}: {r.error['reason']}"
            for r in results if r.error is not None]
