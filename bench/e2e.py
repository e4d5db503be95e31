#!/usr/bin/env python3
"""End to end: from the last image of a study arriving at the node to its results delivered.

A running node (``aiworker serve``, its model loaded by an untimed warm-up study) sends its
results to a real Orthanc (the PACS) and to an MLLP listener in this process that answers AA
(the RIS, :class:`aiworker.dispatch.mllp.MllpReceiver`). Each timed run sends a new phantom
knee study (three series of ``--slices`` slices, ``--matrix`` square: sagittal PD FS,
coronal PD FS, axial T2 FS) to the node with dcmtk's ``storescu``, then waits until Orthanc
holds the study's SEG and SR and the RIS has acknowledged the ORU^R01. The seconds between
are split by stage, from the node's state DB and the job's own timings:

* stability wait: last image -> study complete (``completion.series_stable_seconds`` of
  quiet, a setting: reported but left out of the total);
* select: study complete -> job queued (features, rules);
* queue: job queued -> the inference process takes it;
* load (decode the series), infer (preprocess, model, postprocess, resample back to the
  source grid), labels (write labels.nii.gz and findings.json), SEG, SR, report (text and
  ORU^R01), preview (PNG), other (the rest of the job's round trip);
* send: job done -> the last outbox row delivered (SEG and SR stored by Orthanc, which
  answers a C-STORE once the instance is stored, and the ACK received).

Peers measured in the same run: dcmtk ``storescu`` sending the same study to Orthanc and
to the node (receive), and dcmtk ``storescu`` sending the node's SEG and SR files to
Orthanc (the send stage done by dcmtk, process start included). Figures are printed,
nothing is asserted. ``--device cuda`` runs the model on a GPU.

Every study sent is one knee-demo's quality gate accepts: ``--slices`` must lie in the
gate's slice range, and phantom seeds whose drawn slice spacing, coverage or pixel spacing
the gate would refuse are skipped (checked on the study's plan, before anything is rendered).
A study whose job fails, whose result the gate finds not assessable, for which selection
makes no job, or whose results are not delivered within ``--timeout`` seconds stops the
benchmark with a message saying which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common import (
    OUT,
    PROCS,
    ROOT,
    START_TIMEOUT_S,
    Tools,
    clean_env,
    find_tools,
    free_port,
    git_revision,
    rows,
    wait_for_port,
)
from targets import launch_orthanc

from aiworker.dispatch.mllp import MllpReceiver  # the stand-in RIS: answers AA
from aiworker.infer import gate
from aiworker.infer.gate_spec import InputGate
from aiworker.infer.registry import Registry
from aiworker.phantom.protocol import Overrides
from aiworker.store.layout import ResultFolder

ROLES = ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs")
STAGES = ("select", "queue", "load", "infer", "labels", "seg", "sr", "report", "preview",
          "other", "send")
INFER_STEPS = ("preprocess", "model", "postprocess", "resample")
MODEL = "knee-demo"
FIRST_SEED, MAX_SEEDS = 900, 200  # phantom seeds tried for studies the gate accepts


@dataclass
class Orthanc:
    proc: subprocess.Popen
    dicom_port: int
    http_port: int

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                    timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: bytes) -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                         data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def result_modalities(self, study_uid: str) -> set[str]:
        """The modalities of the SEG and SR series Orthanc holds in the study."""
        found = self.post("/tools/lookup", study_uid.encode())
        if not found:
            return set()
        series = self.get(f"/studies/{found[0]['ID']}/series?expand")
        return {s["MainDicomTags"].get("Modality") for s in series} & {"SEG", "SR"}


def start_orthanc(tools: Tools, folder: Path) -> Orthanc:
    return Orthanc(*launch_orthanc(tools, folder, nodelay=True))


def start_node(tools: Tools, folder: Path, orthanc: Orthanc, ris: MllpReceiver,
               args: argparse.Namespace) -> tuple[int, Path]:
    """``aiworker serve`` sending the knee pipeline's results to Orthanc and the RIS;
    returns its port and state DB."""
    port = free_port()
    config = {
        "node": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": str(folder / "data"), "min_free_mb": 1},
        "completion": {"series_stable_seconds": args.stable},
        "destinations": {
            "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port,
                     "ae_title": "ORTHANC"},
            "ris": {"kind": "hl7", "host": "127.0.0.1", "port": ris.port}},
        "pipelines": [{"name": "knee", "rules": "config/rules/knee.yaml",
                       "model": "knee-demo", "send_to": ["pacs", "ris"]}],
        "dispatch": {"interval_s": 0.05},
        "web": {"host": "127.0.0.1", "port": free_port()},
        "inference": {"device": args.device, "threads": args.threads},
        "logging": {"level": "WARNING"}}
    path = folder / "aiworker.yaml"
    path.write_text(json.dumps(config))
    log = folder / "node.log"
    proc = PROCS.start([*tools.aiworker, "serve", "--config", str(path)], clean_env(True), log,
                       cwd=ROOT)
    wait_for_port(port, proc, log, START_TIMEOUT_S)
    return port, folder / "data" / "state.db"


def study_options(seed: int, args: argparse.Namespace):
    """The phantom knee study (torn ACL) of the three series for ``seed``."""
    from aiworker.phantom.study import StudyOptions

    return StudyOptions(seed=seed, acl="torn", rescan=False, derived=False, truth=False,
                        overrides=Overrides(ROLES, args.matrix, args.slices))


def gate_refusals(seed: int, args: argparse.Namespace, spec: InputGate) -> list[str]:
    """Why the gate's geometric input checks (slices, coverage, spacing; not intensity,
    which needs the pixels) would refuse the model's input series of ``seed``'s study."""
    from aiworker.phantom.study import study_plan

    plan = next(s for s in study_plan(study_options(seed, args)).series if s.role == ROLES[0])
    height, width = plan.field_of_view
    stats = gate.InputStats(plan.slices, plan.slices * plan.spacing,
                            (width / plan.columns, height / plan.rows, plan.spacing), {})
    geometric = spec.model_copy(update={"intensity_percentiles": {}})
    return [c.reason for c in gate.input_checks(geometric, stats) if not c.passed]


def accepted_seeds(args: argparse.Namespace, count: int) -> list[int]:
    """``count`` phantom seeds whose studies pass knee-demo's geometric input checks; exits
    with the gate's reasons when ``--slices``/``--matrix`` leave too few (or none)."""
    spec = Registry().get(MODEL).manifest.gate
    if spec is None:
        return list(range(FIRST_SEED, FIRST_SEED + count))
    slices = spec.input.slices
    if slices and not ((slices[0] is None or args.slices >= slices[0])
                       and (slices[1] is None or args.slices <= slices[1])):
        sys.exit(f"error: {MODEL}'s quality gate accepts {slices[0]:g} to {slices[1]:g} "
                 f"slices per series, not --slices {args.slices}: every result would be "
                 "not assessable")
    seeds, first_refusal = [], None
    for seed in range(FIRST_SEED, FIRST_SEED + MAX_SEEDS):
        refusals = gate_refusals(seed, args, spec.input)
        if not refusals:
            seeds.append(seed)
            if len(seeds) == count:
                return seeds
        first_refusal = first_refusal or refusals
    sys.exit(f"error: only {len(seeds)} of {MAX_SEEDS} phantom seeds give a study "
             f"{MODEL}'s quality gate accepts with --slices {args.slices} --matrix "
             f"{args.matrix} (e.g. {'; '.join(first_refusal or [])})")


def write_phantom(folder: Path, seed: int, args: argparse.Namespace) -> Path:
    """The phantom knee study of ``seed``; its DICOM folder."""
    from aiworker.phantom.study import write_study

    return write_study(folder, study_options(seed, args)).dicom_dir


def storescu(tools: Tools, port: int, aet: str, *paths: Path) -> float:
    """Seconds dcmtk's storescu takes to send ``paths`` (folders recursively), proposing
    the SOP classes of the files (-R: its default list has no SEG)."""
    started = time.perf_counter()
    done = subprocess.run([tools.storescu, "-R", "+sd", "+r", "-aec", aet, "127.0.0.1",
                           str(port), *map(str, paths)], env=clean_env(True),
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {done.stdout}{done.stderr}")
    return time.perf_counter() - started


def study_uid_of(folder: Path) -> str:
    import pydicom

    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def wait_for_results(db: Path, orthanc: Orthanc, study_uid: str, timeout_s: float) -> dict:
    """The study's job once every outbox row is sent and Orthanc shows the SEG and SR;
    raises, saying why, when the job fails, its result is not assessable, selection makes
    no job, or ``timeout_s`` pass first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = rows(db, "SELECT * FROM jobs WHERE study_uid = ?", (study_uid,))
        if not jobs:
            unmatched = rows(db, "SELECT explanation FROM selections WHERE study_uid = ? AND"
                             " matched = 0", (study_uid,))
            if unmatched:
                raise RuntimeError(f"selection made no job for the study: "
                                   f"{unmatched[0]['explanation']}")
        elif jobs[0]["state"] == "failed":
            raise RuntimeError(f"the job failed: {jobs[0]['error']}")
        elif jobs[0]["state"] == "done":
            if reasons := not_assessable(jobs[0]):
                raise RuntimeError(f"{MODEL}'s quality gate found the result "
                                   f"{gate.reason_text(reasons)}")
            outbox = rows(db, "SELECT state, sent_at FROM outbox WHERE job_id = ?",
                          (jobs[0]["job_id"],))
            if (len(outbox) == 3 and all(r["state"] == "sent" for r in outbox)
                    and orthanc.result_modalities(study_uid) == {"SEG", "SR"}):
                return jobs[0] | {"sent_at": max(r["sent_at"] for r in outbox)}
        time.sleep(0.05)
    state = jobs[0]["state"] if jobs else "no job yet"
    raise RuntimeError(f"no results delivered for the study after {timeout_s:.0f} s "
                       f"(job: {state}; see node.log in the work dir)")


def not_assessable(job: dict) -> list[str]:
    """Why the gate found the done ``job``'s whole result not assessable (empty if not)."""
    try:
        document = json.loads(ResultFolder(Path(job["result_dir"])).findings.read_text())
    except (OSError, ValueError, TypeError):
        return []
    return gate.whole_reasons(document.get("findings", document))


def stages_of(db: Path, job: dict) -> dict[str, float]:
    """Seconds per stage of one study (see the module docstring)."""
    [study] = rows(db, "SELECT * FROM studies WHERE study_uid = ?", (job["study_uid"],))
    timings = json.loads(job["timings"])
    completed = study["completed_at"]
    out = {"stability wait": completed - study["last_received"],
           "select": job["created_at"] - completed,
           "queue": job["started_at"] - job["created_at"],
           "load": timings["load"],
           "infer": sum(timings.get(step, 0.0) for step in INFER_STEPS),
           "labels": timings.get("write", 0.0),
           "seg": timings.get("seg", 0.0), "sr": timings.get("sr", 0.0),
           "report": timings.get("report", 0.0) + timings.get("hl7", 0.0),
           "preview": timings.get("preview", 0.0)}
    out |= {f"  infer: {step}": timings.get(step, 0.0) for step in INFER_STEPS}
    job_s = job["finished_at"] - job["started_at"]
    out["other"] = max(0.0, job_s - sum(out[k] for k in STAGES[2:9]))
    out["send"] = job["sent_at"] - job["finished_at"]
    out["total"] = job["sent_at"] - study["last_received"] - out["stability wait"]
    return out


def one_run(tools: Tools, node_port: int, db: Path, orthanc: Orthanc, study: Path,
            results: Path, timeout_s: float) -> dict[str, float]:
    """Send ``study`` to Orthanc and to the node; the node's stage seconds and the peers'."""
    to_orthanc = storescu(tools, orthanc.dicom_port, "ORTHANC", study)
    to_node = storescu(tools, node_port, "AIWORKER", study)
    uid = study_uid_of(study)
    job = wait_for_results(db, orthanc, uid, timeout_s)
    out = stages_of(db, job)
    folder = Path(job["result_dir"])
    shutil.copy(folder / "seg.dcm", results / "seg.dcm")
    shutil.copy(folder / "sr.dcm", results / "sr.dcm")
    out["peer: storescu SEG+SR -> Orthanc"] = storescu(tools, orthanc.dicom_port, "ORTHANC",
                                                       results / "seg.dcm",
                                                       results / "sr.dcm")
    out["peer: storescu study -> Orthanc"] = to_orthanc
    out["storescu study -> node"] = to_node
    out["device"] = job["device"]
    return out


def print_report(runs: list[dict], args: argparse.Namespace, images: int) -> None:
    keys = ["stability wait", *STAGES[:4], *(f"  infer: {s}" for s in INFER_STEPS), *STAGES[4:],
            "total", "storescu study -> node",
            "peer: storescu study -> Orthanc", "peer: storescu SEG+SR -> Orthanc"]
    print(f"\n{len(runs)} runs, {images} images per study ({len(ROLES)} series x "
          f"{args.slices} slices, {args.matrix}x{args.matrix}), device {runs[0]['device']}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'stage':36} {'median s':>9} {'min s':>7} {'max s':>7}")
    for key in keys:
        values = [run[key] for run in runs]
        marker = "  <- last image to SEG+SR in Orthanc and ACK, beyond the stability wait" \
            if key == "total" else ""
        print(f"{key:36} {statistics.median(values):9.3f} {min(values):7.3f} "
              f"{max(values):7.3f}{marker}")
    target = 1.0 if str(runs[0]["device"]).startswith("cuda") else 5.0
    total = statistics.median(run["total"] for run in runs)
    print(f"target <= {target:g} s: median {total:.2f} s "
          f"({'met' if total <= target else 'NOT met'})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed studies (default 3)")
    parser.add_argument("--slices", type=int, default=32,
                        help="slices per series (default 32; within the gate's range)")
    parser.add_argument("--matrix", type=int, default=320, help="rows = columns")
    parser.add_argument("--stable", type=float, default=2.0,
                        help="completion.series_stable_seconds (default 2)")
    parser.add_argument("--device", default="auto", help="inference.device (auto, cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="inference.threads (default: the node's, every CPU)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for one study's results (default 300)")
    parser.add_argument("--json", type=Path, help="also write the runs to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tools = find_tools(want_orthanc=True)
    if tools.orthanc is None:
        sys.exit("error: Orthanc is needed (apt-get install orthanc)")
    seeds = accepted_seeds(args, args.runs + 1)
    workdir = Path(tempfile.mkdtemp(prefix="aiworker-e2e-", dir=OUT if OUT.exists()
                                    else None))
    print(f"{platform.node()} {platform.processor() or platform.machine()}, "
          f"revision {git_revision()}, work dir {workdir}", flush=True)
    try:
        ris, orthanc = MllpReceiver(), start_orthanc(tools, workdir)
        node_port, db = start_node(tools, workdir, orthanc, ris, args)
        studies = [write_phantom(workdir / f"study{n}", seed, args)
                   for n, seed in enumerate(seeds)]
        images = sum(1 for p in studies[0].rglob("*") if p.is_file())
        print(f"phantom seeds {seeds} (the gate accepts their geometry); "
              "warm-up study (loads the model; not timed) ...", flush=True)
        one_run(tools, node_port, db, orthanc, studies[0], workdir, args.timeout)
        runs = []
        for n, study in enumerate(studies[1:], 1):
            runs.append(one_run(tools, node_port, db, orthanc, study, workdir, args.timeout))
            print(f"run {n}: total {runs[-1]['total']:.2f} s", flush=True)
        print_report(runs, args, images)
        if args.json:
            args.json.write_text(json.dumps(runs, indent=2))
    except RuntimeError as exc:
        sys.exit(f"error: {exc} (work dir kept: {workdir})")
    finally:
        PROCS.stop_all()
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
