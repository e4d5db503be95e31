#!/usr/bin/env python3
"""Scale-out: studies per hour through the whole pipeline with 1, 2 and 4 CPU workers on
PostgreSQL, against the single SQLite process, and the queue latency procrastinate adds.

Setups, each fresh (its own data folder, database, PACS and RIS), in one run:

* ``sqlite``: one ``aiworker serve`` (no role), the SQLite state file; its stages poll;
* ``pg-N``: one ``aiworker serve --role receive`` and N ``aiworker worker`` (every queue)
  on one database of a throwaway PostgreSQL cluster (tests/helpers/pg_cluster.py).

Every process runs inference on the CPU with ``inference.threads: 1``. Each setup gets the
same phantom studies (one sagittal PD FS series, 64x64): ``--studies`` sent at once with
dcmtk ``storescu`` (one association), timed from the first image sent to the last result
acknowledged (SEG and SR stored by dcmtk ``storescp``, the ORU^R01 answered AA by an MLLP
listener): studies per hour. Then ``--paced`` more, one at a time, each waiting for its
results: the latency of a study on an idle setup (last image -> acknowledged, the
stability wait included).

Queue latency, per procrastinate job: its ``started`` event less its ``deferred`` event
(or its scheduled time, if later), from ``procrastinate_events`` (mirrored by a trigger, as
the workers delete succeeded jobs and their events); in the burst that is mostly waiting
for a free worker, in the paced studies the overhead of the queue itself. Beside it, from
the node's own ``jobs`` table on both backends: inference job created -> started.

Workers beyond the CPU count cannot add throughput: on 2 cores expect saturation at 2
workers. Every result arrives once (SOP Instance UIDs at the PACS, control ids at the RIS)
or the run says so. Output: a table, and ``bench/out/scale.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import OUT, PROCS, find_dcmtk, git_revision  # noqa: E402
from helpers.pg_cluster import PgCluster, PgClusterError  # noqa: E402
from scale_parts import (  # noqa: E402
    Setup,
    node_config,
    pacs_received,
    queue_waits,
    send,
    start_pacs,
    write_studies,
)
from soak_peers import Ris  # noqa: E402

FIRST_SEED = 7000


def wait_delivered(setup: Setup, studies: int, timeout_s: float) -> float:
    """Once ``studies`` jobs have put their results in the outbox and every outbox row is
    sent (SEG and SR, or only the SR of a result the gate found not assessable, and the
    ORU^R01): the last row's ``sent_at``. Raises on a failed job, a dead outbox row or the
    timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        [out] = setup.query(
            "SELECT COUNT(DISTINCT job_id) AS jobs, SUM(CASE WHEN state = 'sent' THEN 0"
            " ELSE 1 END) AS unsent, MAX(sent_at) AS last FROM outbox") or [{"jobs": 0}]
        if out["jobs"] >= studies and not out["unsent"]:
            return float(out["last"])
        bad = setup.query("SELECT state, error FROM jobs WHERE state = 'failed'")
        bad += setup.query("SELECT state, last_error AS error FROM outbox WHERE state = 'dead'")
        if bad:
            raise RuntimeError(f"{setup.label}: {bad[0]['state']}: {bad[0]['error']}")
        time.sleep(0.1)
    states = setup.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    raise RuntimeError(f"{setup.label}: results of {studies} studies not delivered after "
                       f"{timeout_s:.0f} s (jobs: {states}; logs in {setup.folder})")


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values``, None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "median_s": pct(values, 0.5), "p95_s": pct(values, 0.95)}


def run_setup(setup: Setup, warmup: Path, burst: list[Path], paced: list[Path], ris: Ris,
              timeout_s: float) -> dict[str, Any]:
    """Start ``setup``, send it the untimed warm-up study (the single node starts its
    inference process on its first job), the burst, then the paced studies one at a time;
    its figures."""
    load = os.getloadavg()[0]
    setup.start()
    try:
        send(setup.port, [warmup])
        wait_delivered(setup, 1, timeout_s)
        started = time.time()
        send(setup.port, burst)
        sent = time.time()
        last = wait_delivered(setup, 1 + len(burst), timeout_s)
        paced_from, latencies = time.time(), []
        for n, folder in enumerate(paced, 1):
            send(setup.port, [folder])
            image_sent = time.time()  # storescu ends once the node stored the last image
            latencies.append(wait_delivered(setup, 1 + len(burst) + n, timeout_s)
                             - image_sent)
        time.sleep(0.5)  # a duplicate still on its way would show
        figures = {"setup": setup.label, "workers": setup.workers,
                   "studies": len(burst), "send_s": sent - started,
                   "burst_s": last - started,
                   "studies_per_hour": len(burst) / (last - started) * 3600,
                   "paced_latency": summary(latencies), "load_before": round(load, 2)}
        figures |= job_waits(setup, started, paced_from) | delivery_checks(setup, ris)
    finally:
        setup.stop()
    return figures


def job_waits(setup: Setup, started: float, paced_from: float) -> dict[str, Any]:
    """Queue waits: the node's jobs table (inference job created -> started) on both
    backends, and procrastinate's per queue on PostgreSQL; burst and paced apart."""
    jobs = setup.query("SELECT created_at, started_at, finished_at, attempts FROM jobs")
    out: dict[str, Any] = {"node_infer_wait": {
        "burst": summary([j["started_at"] - j["created_at"] for j in jobs
                          if started <= j["created_at"] < paced_from]),
        "paced": summary([j["started_at"] - j["created_at"] for j in jobs
                          if j["created_at"] >= paced_from])},
        "job_s": summary([j["finished_at"] - j["started_at"] for j in jobs
                          if started <= j["created_at"] < paced_from]),
        "jobs": len(jobs), "jobs_run_twice": sum(1 for j in jobs if j["attempts"] > 1)}
    if setup.postgresql:
        burst = queue_waits(setup.state, started, paced_from)
        paced = queue_waits(setup.state, paced_from, float("inf"))
        out["procrastinate_wait"] = {
            queue: {"burst": summary(burst.get(queue, [])),
                    "paced": summary(paced.get(queue, []))}
            for queue in ("select", "infer", "results", "outbox")}
    return out


def delivery_checks(setup: Setup, ris: Ris) -> dict[str, Any]:
    """What the PACS and the RIS got: counts, and anything that arrived twice."""
    received = pacs_received(setup.folder / "pacs")
    kinds = Counter(modality for modality, _ in received)
    uids = Counter(uid for _, uid in received)
    ids = Counter(msh10 for _, msh10 in ris.messages)
    return {"pacs_seg": kinds["SEG"], "pacs_sr": kinds["SR"],
            "pacs_duplicates": sum(n - 1 for n in uids.values()),
            "ris_messages": len(ris.messages),
            "ris_duplicates": sum(n - 1 for n in ids.values())}


def make_setup(args: argparse.Namespace, workdir: Path, cluster: PgCluster | None,
           pacs_port: int, ris: Ris, label: str, workers: int) -> Setup:
    folder = workdir / label
    folder.mkdir(exist_ok=True)
    url = cluster.new_database() if workers else None
    return Setup(label, workers, folder, node_config(folder / "data", pacs_port, ris.port,
                                                     url, args.stable))


def run(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    total = 1 + args.studies + args.paced
    print(f"writing {total} phantom studies ...", flush=True)
    warmup, *studies = write_studies(workdir / "studies", total, FIRST_SEED)
    burst, paced = studies[:args.studies], studies[args.studies:]
    plan = ([("sqlite", 0)] if not args.skip_sqlite else []) + [
        (f"pg-{n}", n) for n in args.workers]
    cluster = PgCluster().start() if args.workers else None
    results = []
    try:
        for label, workers in plan:
            ris = Ris()
            pacs_port = start_pacs(workdir / label / "pacs")
            setup = make_setup(args, workdir, cluster, pacs_port, ris, label, workers)
            print(f"{label}: starting ...", flush=True)
            try:
                results.append(run_setup(setup, warmup, burst, paced, ris, args.timeout))
            finally:
                ris.stop()
                PROCS.stop_all()  # the PACS
            r = results[-1]
            print(f"{label}: {r['studies']} studies in {r['burst_s']:.1f} s = "
                  f"{r['studies_per_hour']:.0f} studies/h", flush=True)
    finally:
        PROCS.stop_all()
        if cluster is not None:
            cluster.stop()
    return results


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def fmt(value: float | None, spec: str = "7.2f") -> str:
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    results = report["setups"]
    base = next((r for r in results if r["workers"] == 0), results[0])
    print(f"\n{report['machine']}; {report['revision']}\n{report['command']}")
    print(f"\n{'setup':8} {'studies':>7} {'seconds':>8} {'studies/h':>10} {'vs sqlite':>9} "
          f"{'paced s med':>11} {'p95':>6} {'PACS SEG/SR':>11} {'RIS':>4} {'dup':>4} "
          f"{'rerun':>5} {'job s':>5} {'load':>5}")
    for r in results:
        lat = r["paced_latency"]
        dup = r["pacs_duplicates"] + r["ris_duplicates"]
        print(f"{r['setup']:8} {r['studies']:7d} {r['burst_s']:8.1f} "
              f"{r['studies_per_hour']:10.0f} "
              f"{r['studies_per_hour'] / base['studies_per_hour']:9.2f} "
              f"{fmt(lat['median_s'], '11.2f')} {fmt(lat['p95_s'], '6.2f')} "
              f"{r['pacs_seg']:5d}/{r['pacs_sr']:<5d} {r['ris_messages']:4d} {dup:4d} "
              f"{r['jobs_run_twice']:5d} {fmt(r['job_s']['median_s'], '5.1f')} "
              f"{r['load_before']:5.1f}")
    print("\nqueue wait, seconds: due -> started (median / p95); burst: the studies sent at "
          "once, paced: one at a time on an idle setup")
    print(f"{'setup':8} {'queue':26} {'burst med':>9} {'p95':>6} {'paced med':>9} {'p95':>6}")
    for r in results:
        waits = {"infer (node jobs table)": r["node_infer_wait"]}
        waits |= {f"{q} (procrastinate)": w for q, w in r.get("procrastinate_wait", {}).items()}
        for name, w in waits.items():
            print(f"{r['setup']:8} {name:26} {fmt(w['burst']['median_s'], '9.3f')} "
                  f"{fmt(w['burst']['p95_s'], '6.3f')} {fmt(w['paced']['median_s'], '9.3f')} "
                  f"{fmt(w['paced']['p95_s'], '6.3f')}")
    print(f"\n{report['saturation']}")


def saturation(results: list[dict[str, Any]], ncores: int) -> str:
    """What the figures say about scaling on this box."""
    rate = {r["workers"]: r["studies_per_hour"] for r in results if r["workers"]}
    parts = [f"{w} workers: {rate[w] / rate[1]:.2f}x one worker" for w in sorted(rate)
             if w > 1 and 1 in rate]
    return (f"{ncores} CPU cores: every worker runs one inference at a time on one thread, "
            f"so throughput can grow up to {ncores} workers and not past it (expect "
            f"saturation at {ncores}); " + ("; ".join(parts) or "one setup only") + ".")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10,
                        help="studies sent at once per setup (default 10)")
    parser.add_argument("--paced", type=int, default=2,
                        help="studies sent one at a time after the burst (default 2)")
    parser.add_argument("--workers", default="1,2,4",
                        type=lambda t: [int(n) for n in t.split(",") if n.strip()],
                        help="PostgreSQL setups: worker counts (default 1,2,4; '' for none)")
    parser.add_argument("--skip-sqlite", action="store_true",
                        help="leave out the single SQLite process")
    parser.add_argument("--stable", type=float, default=1.0,
                        help="completion.series_stable_seconds (default 1)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for one setup's results (default 600)")
    parser.add_argument("--json", type=Path, default=OUT / "scale.json",
                        help="where the figures go (default bench/out/scale.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process and the cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (find_dcmtk("storescu") and find_dcmtk("storescp")):
        sys.exit("error: dcmtk's storescu and storescp are needed (apt-get install dcmtk)")
    ncores = cores()
    workdir = Path(tempfile.mkdtemp(prefix="aiworker-scale-"))
    print(f"work folder {workdir}", flush=True)
    t0 = time.monotonic()
    try:
        results = run(args, workdir)
    except (RuntimeError, PgClusterError) as exc:
        print(f"error: {exc}\n(work folder kept: {workdir})", file=sys.stderr)
        return 1
    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{ncores} CPU cores ({platform.processor() or platform.machine()}), "
                   f"load average at the end {os.getloadavg()[0]:.2f}, shared with other jobs",
        "cores": ncores, "revision": git_revision(), "run_s": round(time.monotonic() - t0),
        "study": "1 series (sagittal PD FS), 64x64; inference on the CPU, 1 thread",
        "latency_source": "procrastinate_events (deferred/started, mirrored by a trigger) "
                          "per queue on PostgreSQL; the node's jobs table (created_at -> "
                          "started_at of the inference job) on both backends",
        "setups": results, "saturation": saturation(results, ncores)}
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.json}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
