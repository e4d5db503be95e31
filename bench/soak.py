#!/usr/bin/env python3
"""Chaos soak: phantom studies keep arriving while the node, the PACS, the RIS and the disk fail.

For ``--duration`` seconds, ``--studies-parallel`` modalities (pynetdicom SCUs, one
association per study) send phantom knee studies to a real ``aiworker serve``, each sending
again whatever was not acknowledged, while at random moments (``--fault-every`` seconds
apart on average; every kind once first, then drawn; the faults go on past the duration
until every kind has struck once and each fault has lasted its time) the soak

* ``kill -9``s the node and starts it again (node kill);
* kills the PACS, dcmtk ``storescp``, for 2-10 s and starts it again (PACS outage);
* closes the RIS, an MLLP receiver answering AA, for 2-10 s (RIS outage);
* fills the node's data dir, a tmpfs mounted for the run, with a ballast file until it is
  full, and deletes it 2-8 s later (disk full; skipped, and said so, where the mount fails).

The node's stability wait, dispatch interval, retry backoff and timeouts are set short in
its config so the run goes through many cycles. When the time is up every fault is mended,
the modalities finish their studies, the node gets a quiet period (``--settle`` seconds at
most) and is stopped, and the invariants of :mod:`soak_invariants` are checked. A JSON
summary (``--json``) and a table are written; the exit code is 1 when an invariant failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak_invariants as inv  # noqa: E402
from common import find_dcmtk, free_port, rows  # noqa: E402
from soak_peers import MARK, Disk, Modality, Node, Pacs, Ris  # noqa: E402

from aiworker.dispatch.mllp import control_id  # noqa: E402

FAULTS = ("node_kill", "pacs_outage", "ris_outage", "disk_full")


def node_config(workdir: Path, data_dir: Path, pacs: Pacs, ris: Ris,
                args: argparse.Namespace) -> dict[str, Any]:
    """Short waits everywhere, so a run of minutes sees many stability, retry and timeout
    cycles; retention off, so the spool keeps every instance for the checks."""
    pipeline = {"name": "knee", "rules": "config/rules/knee.yaml", "model": args.model,
                "outputs": ["seg", "sr", "report", "hl7"], "send_to": ["pacs", "ris"]}
    return {
        "node": {"host": "127.0.0.1", "port": free_port(), "network_timeout_s": 10,
                 "acse_timeout_s": 5, "dimse_timeout_s": 10},
        "storage": {"data_dir": str(data_dir), "min_free_mb": 4, "retention_days": 0,
                    "emergency_free_percent": 0},
        "completion": {"series_stable_seconds": 1.0},
        "destinations": {
            "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                     "ae_title": "PACS", "connect_timeout_s": 2, "acse_timeout_s": 3,
                     "dimse_timeout_s": 5},
            "ris": {"kind": "hl7", "host": "127.0.0.1", "port": ris.port,
                    "connect_timeout_s": 2, "ack_timeout_s": 3}},
        "pipelines": [pipeline],
        "dispatch": {"retry_base_s": 0.5, "retry_cap_s": 4, "interval_s": 0.2},
        "web": {"enabled": False},
        "inference": {"device": "cpu", "threads": 1,
                      **({"models_dir": args.models_dir} if args.models_dir else {})},
        "logging": {"level": "INFO"},
    }


class Chaos:
    """Breaks and mends the parts at random moments; counts each fault and keeps the node
    running (restarting it when it is down and can start)."""

    def __init__(self, rng: random.Random, node: Node, pacs: Pacs, ris: Ris, disk: Disk,
                 every_s: float):
        self.rng, self.node, self.pacs, self.ris, self.disk = rng, node, pacs, ris, disk
        self.every_s = every_s
        self.counts: Counter[str] = Counter()
        self.down: dict[str, float] = {}  # pacs | ris | disk -> when it is mended
        self.start_failures: list[str] = []
        self.t0 = time.monotonic()
        kinds = [k for k in FAULTS if k != "disk_full" or disk.mounted]
        self.kinds = kinds
        self.plan = rng.sample(kinds, len(kinds))  # every kind once first

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {text}", flush=True)

    def run(self, until: float) -> None:
        """Strike and mend until ``until``; past it, on until every kind has struck once and
        every fault begun has lasted its drawn time (no new ones but the first of a kind)."""
        next_at = time.monotonic() + self.rng.uniform(0.3, 1.0) * self.every_s
        while time.monotonic() < until or self.plan or self.down:
            self.mend(due_only=True)
            self.ensure_node()
            if time.monotonic() >= next_at and (time.monotonic() < until or self.plan):
                self.strike(self.plan.pop(0) if self.plan else self.rng.choice(self.kinds))
                next_at = time.monotonic() + self.rng.uniform(0.5, 1.5) * self.every_s
            time.sleep(0.1)
        self.mend(due_only=False)
        self.ensure_node()

    def strike(self, kind: str) -> None:
        if kind == "node_kill":
            self.node.kill9()
            self.counts[kind] += 1
            self.say("node killed (-9)")
            time.sleep(self.rng.uniform(0, 1.5))
            self.ensure_node()
            return
        part = {"pacs_outage": "pacs", "ris_outage": "ris", "disk_full": "disk"}[kind]
        if part in self.down:
            return
        {"pacs": self.pacs.stop, "ris": self.ris.stop, "disk": self.disk.fill}[part]()
        low, high = (2, 8) if part == "disk" else (2, 10)
        self.down[part] = time.monotonic() + self.rng.uniform(low, high)
        self.counts[kind] += 1
        self.say(f"{kind} begins")

    def mend(self, due_only: bool) -> None:
        for part, at in list(self.down.items()):
            if due_only and time.monotonic() < at:
                continue
            {"pacs": self.pacs.start, "ris": self.ris.start, "disk": self.disk.free}[part]()
            del self.down[part]
            self.say(f"{part} back")

    def ensure_node(self) -> None:
        """Start the node when it is down: killed by us, or gone by itself (noted)."""
        if self.node.proc is not None and not self.node.check_alive():
            self.say("node exited by itself")
        if self.node.proc is not None:
            return
        try:
            self.node.start()
            self.say("node started")
        except RuntimeError as error:
            self.node.proc = None
            why = f"{error} (disk full: {'disk' in self.down})"
            self.start_failures.append(why)
            self.say(f"node start failed: {why}")
            time.sleep(1)


QUIET = ("SELECT (SELECT COUNT(*) FROM studies WHERE state <> 'complete')"
         " + (SELECT COUNT(*) FROM studies s WHERE NOT EXISTS (SELECT 1 FROM selections d"
         "    WHERE d.study_uid = s.study_uid AND d.completed_at = s.completed_at))"
         " + (SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running'))"
         " + (SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending')) AS busy")


def wait_quiet(db: Path, node: Node, timeout: float) -> float:
    """Seconds until the node has nothing left to do (twice in a row, 1 s apart)."""
    started = time.monotonic()
    calm = 0
    while time.monotonic() - started < timeout and calm < 2:
        with contextlib.suppress(sqlite3.Error):
            calm = calm + 1 if rows(db, QUIET)[0]["busy"] == 0 else 0
        node.check_alive()
        time.sleep(1)
    return time.monotonic() - started


def stuck_rows(status: dict[str, Any]) -> list[str]:
    """Jobs queued, running or failed and outbox rows pending, sending or dead, per
    ``aiworker status --json``."""
    out = []
    for study in status["studies"]:
        for pipeline, decision in study["selection"].items():
            out += [f"study {study['study_uid']}: {pipeline} job {j['job_id']} {j['state']}"
                    + (f" ({j['error_kind']}: {j['error']})" if j["error"] else "")
                    for j in decision["jobs"] if j["state"] in ("queued", "running", "failed")]
        out += [f"study {study['study_uid']}: outbox row {r['id']} ({r['object_kind']} to "
                f"{r['destination']}) {r['state']}: {r['last_error']}"
                for r in study["outbox"] if r["state"] in ("pending", "sending", "dead")]
    return out


def expected_results(db: Path) -> dict[str, list[inv.Expected]]:
    """Per study, each job a decision still wants, with its result UIDs and control ID."""
    out: dict[str, list[inv.Expected]] = {}
    for job in rows(db, "SELECT * FROM jobs WHERE state <> 'superseded'"):
        objects = {r["object_kind"]: r for r in rows(
            db, "SELECT object_kind, sop_instance_uid, path FROM outbox WHERE job_id = ?",
            (job["job_id"],))}
        hl7 = objects.get("hl7")
        msh10 = None
        if hl7 is not None and Path(hl7["path"]).is_file():
            msh10 = control_id(Path(hl7["path"]).read_text(encoding="utf-8"), "MSH", 10)
        out.setdefault(job["study_uid"], []).append(inv.Expected(
            job["job_id"], job["state"], (objects.get("seg") or {}).get("sop_instance_uid"),
            (objects.get("sr") or {}).get("sop_instance_uid"), msh10))
    return out


def spool_counts(spool: Path) -> dict[str, int]:
    counts: Counter[str] = Counter(p.stem for p in spool.rglob("*.dcm"))
    return dict(counts)


def orphans(mark: str) -> list[str]:
    """Processes still alive that carry the run's mark in their environment or name the
    run's folder on their command line (the soak itself aside)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARK}={mark}".encode() in environ.split(b"\0") or mark in cmdline:
            found.append(f"pid {proc.name}: {cmdline.strip()[:200]}")
    return found


def log_counts(log: Path) -> dict[str, int]:
    """Lines of the node's log worth a look: tracebacks, and C-STORE responses pynetdicom's
    reactor took off the queue before the waiting send (its race; the send then waits
    out its DIMSE timeout and the object goes again)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return {"node_log_tracebacks": text.count("Traceback (most recent call last)"),
            "pynetdicom_lost_responses": text.count("Received unexpected C-STORE service")}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    disk = Disk(workdir / "data", args.disk_mb)
    pacs, ris = Pacs(workdir / "pacs"), Ris()
    node = Node(workdir, node_config(workdir, disk.folder, pacs, ris, args), str(workdir))
    stop_new, stop = threading.Event(), threading.Event()
    modalities = [Modality(i, node.port, workdir / "studies", args.seed, stop_new, stop,
                           args.study_gap) for i in range(args.studies_parallel)]
    chaos = Chaos(rng, node, pacs, ris, disk, args.fault_every)
    try:
        node.start()
        for modality in modalities:
            modality.thread.start()
        chaos.run(time.monotonic() + args.duration)
        stop_new.set()
        chaos.say("faults over; modalities finish their studies")
        deadline = time.monotonic() + args.settle
        for modality in modalities:
            modality.thread.join(max(0.0, deadline - time.monotonic()))
        chaos.say("modalities done")
        stop.set()
        db = disk.folder / "state.db"
        settle_s = wait_quiet(db, node, max(5.0, deadline - time.monotonic()))
        chaos.say(f"quiet after {settle_s:.1f} s")
        stuck = stuck_rows(node.status())
        node.stop()
        node.check_alive()
        pacs.stop()
        time.sleep(2)  # let a process that would outlive the node show itself
        obs = inv.Observations(
            acked={k: v for m in modalities for k, v in m.acked.items()},
            unfinished_studies=[u for m in modalities for u in m.started
                                if u not in m.finished],
            spool=spool_counts(disk.folder / "spool"), selected=expected_results(db),
            stuck=stuck, orphans=orphans(str(workdir)), unexpected_exits=node.unexpected)
        received, partial = pacs.received()
        obs.pacs = [inv.Received(*r) for r in received]
        obs.ris = list(ris.messages)
    finally:
        stop_new.set()
        stop.set()
        node.kill9()
        pacs.stop()
        ris.stop()
        disk.close()
    invariants = inv.check(obs)
    statuses: Counter[str] = Counter()
    for modality in modalities:
        statuses.update(modality.statuses)
    return {
        "started": started_at, "duration_s": args.duration, "seed": args.seed,
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}", "model": args.model,
        "studies_parallel": args.studies_parallel,
        "studies_sent": sum(len(m.finished) for m in modalities),
        "instances_acked": len(obs.acked),
        "associations": sum(m.associations for m in modalities),
        "store_outcomes": dict(statuses),
        "node_kills": chaos.counts["node_kill"], "pacs_outages": chaos.counts["pacs_outage"],
        "ris_outages": chaos.counts["ris_outage"],
        "disk_full_episodes": chaos.counts["disk_full"], "disk_full_skipped": disk.skipped,
        "node_start_failures": chaos.start_failures,
        "selected_studies": len(obs.selected), "settle_s": round(settle_s, 1),
        "pacs_files": len(obs.pacs), "pacs_partial_files": partial,
        "ris_messages": len(obs.ris), **inv.duplicates(obs), **log_counts(node.log_path),
        "invariants": [asdict(i) for i in invariants],
        "held": all(i.held for i in invariants),
    }


def print_table(summary: dict[str, Any]) -> None:
    keys = ("studies_sent", "instances_acked", "associations", "node_kills", "pacs_outages",
            "ris_outages", "disk_full_episodes", "selected_studies", "pacs_files",
            "pacs_duplicate_receives", "ris_messages", "ris_duplicate_messages", "settle_s",
            "node_log_tracebacks", "pynetdicom_lost_responses")
    print(f"\nchaos soak: {summary['duration_s']:g} s, seed {summary['seed']}, "
          f"{summary['studies_parallel']} modalities, model {summary['model']}, "
          f"{summary['machine']}")
    for key in keys:
        print(f"  {key:28} {summary[key]}")
    if summary["disk_full_skipped"]:
        print(f"  disk full skipped: {summary['disk_full_skipped']}")
    print(f"  C-STORE outcomes seen by the modalities: {summary['store_outcomes']}")
    for item in summary["invariants"]:
        print(f"  {'held  ' if item['held'] else 'FAILED'} {item['name']}")
        for line in item["details"]:
            print(f"           {line}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=1, help="faults and studies drawn from it")
    parser.add_argument("--studies-parallel", type=int, default=3,
                        help="modalities sending at once, one association each")
    parser.add_argument("--study-gap", type=float, default=0.0,
                        help="seconds each modality waits between studies")
    parser.add_argument("--fault-every", type=float, default=8.0,
                        help="mean seconds between faults")
    parser.add_argument("--settle", type=float, default=180.0,
                        help="longest wait for the quiet period at the end")
    parser.add_argument("--model", default="knee-demo", help="the pipeline's model")
    parser.add_argument("--models-dir", help="inference.models_dir (a site model)")
    parser.add_argument("--disk-mb", type=int, default=256, help="size of the data tmpfs")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if find_dcmtk("storescp") is None:
        sys.exit("error: dcmtk's storescp is needed (apt-get install dcmtk)")
    workdir = Path(tempfile.mkdtemp(prefix="aiworker-soak-"))
    print(f"work folder {workdir}", flush=True)
    summary: dict[str, Any] = {"held": False}
    try:
        summary = run(args, workdir)
    finally:
        if args.keep or not summary["held"]:
            print(f"kept {workdir} (node.log, pacs/, aiworker.yaml)", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0 if summary["held"] else 1


if __name__ == "__main__":
    sys.exit(main())
