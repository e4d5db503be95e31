#!/usr/bin/env python3
"""Receive throughput during inference: the node's images/s idle and while a model runs.

Uses the receive benchmark's parts (``bench/common.py``, ``bench/targets.py``): the same
cached study (3 series of 512x512, ``--slices`` per series, default 170 = 510 instances),
sent by one dcmtk ``storescu`` with ``TCP_NODELAY=1`` over loopback to ``aiworker serve``
started fresh in an empty folder and warmed up with 12 other instances, every run. Runs
alternate idle / during inference, for each ``--fsync`` setting, ``--runs`` of each (default
3); the medians and their ratio (the issue's target: >= 0.80) are printed, then one JSON
line.

Two loads (``--load``):

* ``worker`` (default): the node's own inference worker. The node runs with a pipeline
  (config/rules/knee.yaml -> ``--model``, default knee-demo) and ``inference.nice`` /
  ``inference.threads`` (default: the node's defaults, nice 10 and one thread less than
  the CPUs). Before a busy run's timed send, three studies holding bench/infer.py's series
  (32 slices of 384x384 sagittal PD FS) are sent; the send starts when the second job is
  ``running`` (the first one started the inference process and loaded the model), and the
  run counts as failed unless a job is still running when the send ends.
* ``engine``: a separate process beside the node that runs :class:`Engine` on that series
  in a loop, at ``nice --nice`` (default 10) with ``--threads`` torch threads (default 2);
  paused (SIGSTOP) for the idle runs.

The CPU time the receiving node and the load used during each timed send is reported in
cores (CPU seconds / send seconds). The loads are in ``bench/inference_loads.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from common import (
    MB,
    OUT,
    PROCS,
    WARMUP_SLICES,
    Study,
    Tools,
    find_tools,
    fmt,
    git_revision,
    keep_logs,
    load_study,
    machine_lines,
)
from inference_loads import EngineLoad, Load, WorkerLoad
from targets import Mode, send, settle_count, start_node

TARGET = 0.80


def tree_cpu(procs: list[psutil.Process]) -> float:
    """CPU seconds used so far by these processes."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


# ----------------------------------------------------------------------------- measuring


@dataclass
class Sample:
    """One timed send: seconds (None: failed), and CPU cores used by the node and the load."""

    seconds: float | None
    node_cores: float = 0.0
    load_cores: float = 0.0
    error: str = ""


@dataclass
class Series:
    """All runs of one node setting under one load state."""

    fsync: bool
    busy: bool
    images: int
    samples: list[Sample] = field(default_factory=list)

    def times(self) -> list[float]:
        return [s.seconds for s in self.samples if s.seconds is not None]

    def images_per_s(self) -> float | None:
        times = self.times()
        return self.images / statistics.median(times) if times else None

    def median_of(self, key: str) -> float | None:
        values = [getattr(s, key) for s in self.samples if s.seconds is not None]
        return statistics.median(values) if values else None

    @property
    def name(self) -> str:
        return f"fsync {'on' if self.fsync else 'off'}, {'inference' if self.busy else 'idle'}"


def measure(tools: Tools, load: Load, series: Series, study: Study,
            warmup: Study, workdir: Path, timeout_s: float) -> tuple[Sample, str]:
    """Start the node fresh, warm it up, make the load busy or idle, send the study; the
    sample and a note for the progress line."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    mark = len(PROCS.started)
    os.sync()
    load.set_busy(series.busy)
    note = ""
    try:
        server = start_node(tools, series.fsync, extra_config=load.node_config)(run_dir,
                                                                                    True)
        send(tools, server, Mode("warm-up", True, [[warmup.folder]], True, 1, ""),
                run_dir, timeout_s)
        load.prepare(server, run_dir, series.busy, tools, timeout_s)
        node, others = [psutil.Process(server.proc.pid)], load.processes(server)
        node0, load0 = tree_cpu(node), tree_cpu(others)
        seconds = send(tools, server, Mode("timed", True, [[study.folder]], True, 1, ""),
                          run_dir, timeout_s)
        sample = Sample(seconds, (tree_cpu(node) - node0) / seconds,
                        (tree_cpu(others) - load0) / seconds)
        note = load.after_send(run_dir, series.busy)
        before = len(warmup.files) + load.extra_images(series.busy)
        received = settle_count(server, series.images + before) - before
        if received != series.images:
            sample = Sample(None, error=f"{received} of {series.images} received")
    except RuntimeError as exc:
        sample = Sample(None, error=str(exc))
    finally:
        PROCS.stop_since(mark)
        load.set_busy(False)
    if sample.seconds is None:
        note = f"logs kept in {keep_logs(run_dir, series.name)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    return sample, note


def run_all(args: argparse.Namespace, tools: Tools, load: Load,
            study: Study, warmup: Study, workdir: Path) -> list[Series]:
    """Idle and busy runs, alternating, for each fsync setting; progress printed."""
    results = []
    for fsync in args.fsync:
        pair = [Series(fsync, busy, len(study.files)) for busy in (False, True)]
        print(f"\n== node fsync {'on' if fsync else 'off'}", flush=True)
        for i in range(args.runs):
            for series in pair:
                sample, note = measure(tools, load, series, study, warmup, workdir,
                                       args.timeout)
                series.samples.append(sample)
                print(f"  run {i + 1}/{args.runs} {series.name:<24} "
                      + describe(sample, series.images, note), flush=True)
        results += pair
    return results


def describe(sample: Sample, images: int, note: str) -> str:
    """One progress line."""
    if sample.seconds is None:
        return f"FAILED: {sample.error}" + (f"\n    {note}" if note else "")
    return (f"{images} images in {sample.seconds:6.3f} s = {images / sample.seconds:6.1f} "
            f"images/s; CPU cores: node {sample.node_cores:.2f}, load {sample.load_cores:.2f}"
            + (f"; {note}" if note else ""))


# ----------------------------------------------------------------------------- report


def report(results: list[Series]) -> dict:
    """Print the table of medians and ratios; return the JSON-ready summary."""
    head = (f"{'node':<10} {'load':<10} {'runs':>4} {'median s':>9} {'images/s':>9} "
            f"{'node cores':>10} {'load cores':>10} {'busy/idle':>9}")
    print("\nmedian of the runs; cores = CPU seconds / send seconds\n" + head + "\n"
          + "-" * len(head))
    summary = {}
    for idle, busy in zip(results[::2], results[1::2], strict=True):
        ratio = (busy.images_per_s() / idle.images_per_s()
                 if busy.images_per_s() and idle.images_per_s() else None)
        for series in (idle, busy):
            times = series.times()
            mark = ""
            if series.busy and ratio is not None:
                mark = f"{ratio:9.2f}  {'>=' if ratio >= TARGET else '<'} {TARGET:.2f}"
            print(f"{'fsync ' + ('on' if series.fsync else 'off'):<10} "
                  f"{'inference' if series.busy else 'idle':<10} {len(times):>4} "
                  f"{fmt(statistics.median(times) if times else None, '9.3f')} "
                  f"{fmt(series.images_per_s(), '9.1f')} "
                  f"{fmt(series.median_of('node_cores'), '10.2f')} "
                  f"{fmt(series.median_of('load_cores'), '10.2f')} {mark}")
        summary[f"fsync_{'on' if idle.fsync else 'off'}"] = {
            "idle_images_per_s": rounded(idle.images_per_s(), 1),
            "busy_images_per_s": rounded(busy.images_per_s(), 1),
            "ratio": rounded(ratio, 3), "idle_s": [round(t, 3) for t in idle.times()],
            "busy_s": [round(t, 3) for t in busy.times()],
            "busy_load_cores": rounded(busy.median_of("load_cores"), 2),
            "busy_node_cores": rounded(busy.median_of("node_cores"), 2),
            "idle_node_cores": rounded(idle.median_of("node_cores"), 2)}
    return summary


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", choices=("worker", "engine"), default="worker",
                        help="worker (default): the node's inference worker; engine: a "
                             "separate looping engine process")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed sends per node setting and load state (default 3)")
    parser.add_argument("--slices", type=int, default=170,
                        help="slices per series of the sent study (default 170 = 510 images)")
    parser.add_argument("--fsync", default="off,on",
                        help="node storage.fsync settings to measure: off, on or off,on")
    parser.add_argument("--model", default="knee-demo", help="the model (default knee-demo)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="a site models folder besides the bundled models")
    parser.add_argument("--nice", type=int, default=None,
                        help="the load's nice (worker: inference.nice, default the node's; "
                             "engine: default 10)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the load's torch threads (worker: inference.threads, default "
                             "the node's; engine: default 2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per send")
    parser.add_argument("--workdir", type=Path, default=OUT,
                        help="where run folders are made (default bench/out)")
    parser.add_argument("--out-json", type=Path, default=None,
                        help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    try:
        args.fsync = [{"off": False, "on": True}[v] for v in args.fsync.split(",")]
    except KeyError:
        parser.error("--fsync takes off, on or off,on")
    if args.runs < 1 or args.slices < 1:
        parser.error("--runs and --slices must be >= 1")
    if args.load == "engine":
        args.nice = 10 if args.nice is None else args.nice
        args.threads = args.threads or 2
    return args


def run_benchmark(args: argparse.Namespace) -> None:
    """Everything between parsing the arguments and stopping the processes."""
    tools = find_tools(want_orthanc=False)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for line in machine_lines(tools, args.workdir.resolve()):
        print(line)
    study = load_study(args.slices)
    warmup = load_study(WARMUP_SLICES, seed=1)
    workdir = Path(tempfile.mkdtemp(prefix="receive-infer-", dir=args.workdir))
    try:
        load = (WorkerLoad if args.load == "worker" else EngineLoad)(args, workdir)
        print(f"study:    {len(study.files)} instances, {study.bytes / MB:.1f} MB, sent "
              "with storescu +sd +r, TCP_NODELAY=1, to aiworker serve (fresh per run)")
        print(f"load:     {load.describe}")
        try:
            results = run_all(args, tools, load, study, warmup, workdir)
        finally:
            load.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {"bench": "receive_during_inference", "load": args.load,
               "images": len(study.files), "model": args.model, "load_nice": args.nice,
               "load_threads": args.threads, "target_ratio": TARGET,
               "aiworker": git_revision(), **report(results)}
    if args.out_json:
        args.out_json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    try:
        run_benchmark(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        PROCS.stop_all()
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
