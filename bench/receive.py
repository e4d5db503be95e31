#!/usr/bin/env python3
"""Receive throughput: how fast aiworker stores a study sent by dcmtk's storescu.

The same synthetic MR study (3 series of 512x512 16-bit slices, cached under bench/out/) is
sent with ``storescu`` over loopback to each target, every run to a freshly started target
with an empty data directory:

* ``aiworker serve`` with ``storage.fsync: true`` and with ``storage.fsync: false``;
* dcmtk ``storescp -od DIR PORT`` (one process, writes files, no fsync);
* Orthanc with a generated configuration (its default SyncStorageArea: fdatasync per file).

Three send modes: one storescu with ``TCP_NODELAY=1`` (in the sender's and, for the dcmtk
based targets, the receiver's environment); one storescu with dcmtk's default (Nagle's
algorithm on, so a receiver that does not handle it stalls ~40 ms per C-STORE: only the
first series is sent, once by default); and 4 concurrent storescu processes with
``TCP_NODELAY=1``, each sending a quarter of the files. The receiver's resident memory
(with its children) is sampled every 20 ms during each send.

Figures are printed, nothing is asserted. ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from common import (
    MB,
    OUT,
    PROCS,
    SIZE,
    WARMUP_SLICES,
    Study,
    Tools,
    find_tools,
    fmt,
    keep_logs,
    load_study,
    machine_lines,
)
from targets import Mode, Server, send, settle_count, start_node, start_orthanc, start_storescp

RSS_POLL_S = 0.02


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A receiver the benchmark can start fresh in an empty folder."""

    name: str
    kind: str  # node | storescp | orthanc
    start: Callable[[Path, bool], Server]
    describe: str


def make_targets(tools: Tools, only: str | None, skip_orthanc: bool) -> list[Target]:
    """The targets to measure, in the order they are run."""
    node = " ".join(shlex.quote(a) for a in tools.aiworker) + " serve --config RUN/aiworker.yaml"
    targets = [
        Target("node fsync on", "node", start_node(tools, True), f"{node}  (fsync: true)"),
        Target("node fsync off", "node", start_node(tools, False), f"{node}  (fsync: false)"),
        Target("node 2 procs", "node", start_node(tools, True, processes=2),
               f"{node}  (fsync: true, node.receive_processes: 2)"),
        Target("storescp", "storescp", start_storescp(tools),
               f"{tools.storescp} -od RUN/received PORT  (no fsync)"),
    ]
    if tools.orthanc and not skip_orthanc:
        targets.append(Target("Orthanc", "orthanc", start_orthanc(tools),
                              f"{tools.orthanc} RUN/orthanc.json  (default SyncStorageArea)"))
    return [t for t in targets if only is None or t.kind == only]


# ----------------------------------------------------------------------------- measuring


class RssSampler(threading.Thread):
    """Samples a process's RSS (plus its children's) every 20 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.perf_counter()
        self._halt = threading.Event()
        self.sample()

    def sample(self) -> None:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            rss = 0
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        self.samples.append((time.perf_counter() - self.t0, rss))

    def run(self) -> None:
        while not self._halt.wait(RSS_POLL_S):
            self.sample()

    def finish(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def at(self, seconds: float) -> int:
        """The last sample taken at or before ``seconds`` after the start."""
        return max((s for s in self.samples if s[0] <= seconds), default=self.samples[0])[1]


@dataclass
class Run:
    """One timed send."""

    seconds: float | None  # None: timed out or failed
    received: int
    rss: list[int]  # start, 1/3, 2/3, end of the send; then peak
    error: str = ""
    kept: Path | None = None  # where a failed run's logs were kept


@dataclass
class Result:
    """All runs of one target in one mode."""

    target: Target
    mode: Mode
    images: int
    nbytes: int
    runs: list[Run] = field(default_factory=list)

    def ok_times(self) -> list[float]:
        return [r.seconds for r in self.runs if r.seconds is not None]

    def median(self) -> float | None:
        times = self.ok_times()
        return statistics.median(times) if times else None

    def images_per_s(self) -> float | None:
        med = self.median()
        return self.images / med if med else None

    def median_run(self) -> Run | None:
        """The run whose time is the median (the lower middle for an even count)."""
        ok = sorted((r for r in self.runs if r.seconds is not None), key=lambda r: r.seconds)
        return ok[(len(ok) - 1) // 2] if ok else None


def one_run(tools: Tools, target: Target, mode: Mode, images: int, workdir: Path,
            timeout_s: float, warmup: Study) -> Run:
    """Start the target fresh in an empty folder, warm it up, send, stop it, delete the folder.

    The logs and configs of a failed or incomplete run are kept under bench/out/failed/.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    mark = len(PROCS.started)
    os.sync()  # no writeback left over from earlier runs or from generating the study
    try:
        run = timed_send(tools, target, mode, images, run_dir, timeout_s, warmup)
    finally:
        PROCS.stop_since(mark)
    if run.seconds is None or run.received != images:
        run.kept = keep_logs(run_dir, f"{target.name}-{mode.name}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return run


def timed_send(tools: Tools, target: Target, mode: Mode, images: int, run_dir: Path,
               timeout_s: float, warmup: Study) -> Run:
    """Start the target, send it the small warm-up study (untimed: a long-running receiver
    has its code paths and caches warm), then send while sampling its RSS, and count what
    it received."""
    server = None
    try:
        server = target.start(run_dir, mode.nodelay)
        warm = Mode("warm-up", mode.nodelay, [[warmup.folder]], True, 1, "")
        send(tools, server, warm, run_dir, timeout_s)
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        try:
            seconds = send(tools, server, mode, run_dir, timeout_s)
        finally:
            sampler.finish()
    except RuntimeError as exc:
        received = settle_count(server, images, 0) - len(warmup.files) if server else 0
        return Run(None, received, [], str(exc))
    rss = [sampler.at(seconds * f) for f in (0, 1 / 3, 2 / 3, 1)]
    rss.append(max(s[1] for s in sampler.samples))
    return Run(seconds, settle_count(server, images + len(warmup.files)) - len(warmup.files),
               rss)


def run_mode(tools: Tools, targets: list[Target], mode: Mode, study: Study, workdir: Path,
             timeout_s: float, warmup: Study) -> list[Result]:
    """All runs of one mode, interleaving the targets run by run."""
    files = [f for batch in mode.batches for f in expand(batch, mode.dirs)]
    nbytes = sum(f.stat().st_size for f in files)
    results = [Result(t, mode, len(files), nbytes) for t in targets]
    print(f"\n== mode {mode.name}: {mode.note}", flush=True)
    for i in range(mode.runs):
        for result in results:
            run = one_run(tools, result.target, mode, len(files), workdir, timeout_s, warmup)
            result.runs.append(run)
            line = describe_run(run, result)
            print(f"  run {i + 1}/{mode.runs}  {result.target.name:<15} {line}", flush=True)
    return results


def expand(batch: list[Path], dirs: bool) -> list[Path]:
    """The DICOM files a batch sends."""
    if not dirs:
        return batch
    return sorted(f for d in batch for f in d.rglob("*.dcm"))


def describe_run(run: Run, result: Result) -> str:
    """One progress line for a finished run."""
    kept = f"\n    logs kept in {run.kept}" if run.kept else ""
    if run.seconds is None:
        return f"FAILED ({run.received} received): {run.error}{kept}"
    check = "" if run.received == result.images else f"  !! {run.received} received"
    return (f"{result.images} images in {run.seconds:7.3f} s = "
            f"{result.images / run.seconds:7.1f} images/s{check}{kept}")


def make_modes(study: Study, runs: int, nagle_runs: int, concurrency: int) -> list[Mode]:
    """The three send modes over the study."""
    first = study.folder / "001"
    n_first = len(study.series_files(1))
    files = study.files
    parts = [files[i * len(files) // concurrency:(i + 1) * len(files) // concurrency]
             for i in range(concurrency)]
    sizes = sorted({len(p) for p in parts})
    return [
        Mode("1x TCP_NODELAY", True, [[study.folder]], True, runs,
             f"one storescu, whole study ({len(files)} images), TCP_NODELAY=1"),
        Mode("1x Nagle on", False, [[first]], True, nagle_runs,
             f"one storescu, dcmtk default (Nagle on), first series only "
             f"({first.name}/, {n_first} images)"),
        Mode(f"{concurrency}x TCP_NODELAY", True, parts, False, runs,
             f"{concurrency} concurrent storescu, {'-'.join(map(str, sizes))} files each "
             f"(consecutive slices), TCP_NODELAY=1; time until the last one ends"),
    ]


# ----------------------------------------------------------------------------- report


def ratio(a: Result, b: Result | None) -> str:
    """a's images/s over b's, as '0.42x'."""
    x, y = a.images_per_s(), b.images_per_s() if b else None
    return f"{x / y:.2f}x" if x and y else "-"


def print_table(results: list[Result]) -> None:
    """Throughput per target and mode, with node/storescp and node/Orthanc ratios."""
    print("\nvs storescp, vs Orthanc: the node's images/s divided by theirs in the same mode")
    head = (f"{'target':<15} {'mode':<15} {'images':>6} {'runs':>4} {'median s':>9} "
            f"{'min-max s':>15} {'images/s':>9} {'MB/s':>7} {'vs storescp':>11} {'vs Orthanc':>10}")
    print(head + "\n" + "-" * len(head))
    for result in results:
        peers = {r.target.kind: r for r in results if r.mode is result.mode}
        times = result.ok_times()
        spread = f"{min(times):.3f}-{max(times):.3f}" if times else "-"
        ips = result.images_per_s()
        mbs = result.nbytes / MB / result.median() if result.median() else None
        is_node = result.target.kind == "node"
        bad = sum(1 for r in result.runs if r.seconds is None or r.received != result.images)
        print(f"{result.target.name:<15} {result.mode.name:<15} {result.images:>6} "
              f"{len(times):>4} {fmt(result.median(), '9.3f')} {spread:>15} "
              f"{fmt(ips, '9.1f')} {fmt(mbs, '7.1f')} "
              f"{ratio(result, peers.get('storescp')) if is_node else '':>11} "
              f"{ratio(result, peers.get('orthanc')) if is_node else '':>10}"
              + (f"  ({bad} run(s) failed or incomplete)" if bad else ""))


def print_rss(results: list[Result]) -> None:
    """Receiver RSS (MiB, with children) in each target's median run."""
    head = (f"{'target':<15} {'mode':<15} {'images':>6} {'start':>7} {'at 1/3':>7} "
            f"{'at 2/3':>7} {'end':>7} {'peak':>7} {'peak-start':>10}")
    print("\nreceiver RSS in MiB (process + children, sampled every 20 ms; 1/3, 2/3 = of the "
          "send time, ~ of the study)\n" + head + "\n" + "-" * len(head))
    for result in results:
        run = result.median_run()
        if not run or not run.rss:
            continue
        start, third, two_thirds, end, peak = (v / 2**20 for v in run.rss)
        print(f"{result.target.name:<15} {result.mode.name:<15} {result.images:>6} "
              f"{start:7.1f} {third:7.1f} {two_thirds:7.1f} {end:7.1f} {peak:7.1f} "
              f"{peak - start:10.1f}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per target in the TCP_NODELAY modes (default 3, --quick 1)")
    parser.add_argument("--nagle-runs", type=int, default=1,
                        help="runs per target in the Nagle-on mode (default 1)")
    parser.add_argument("--slices", type=int, default=None,
                        help="slices per series (default 170 = 510 instances, --quick 20)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="storescu processes in the concurrent mode (default 4)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: a small study, 1 run")
    parser.add_argument("--skip-orthanc", action="store_true", help="do not run Orthanc")
    parser.add_argument("--only", choices=("node", "storescp", "orthanc"),
                        help="run only this target")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before one send is abandoned (default 300)")
    parser.add_argument("--workdir", type=Path, default=OUT,
                        help="where run folders are made (default bench/out; keep it on the "
                             "disk you want to measure, not tmpfs)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    args.slices = args.slices or (20 if args.quick else 170)
    if args.runs < 1 or args.nagle_runs < 1 or args.slices < 1 or args.concurrency < 1:
        parser.error("--runs, --nagle-runs, --slices and --concurrency must be >= 1")
    return args


def run_benchmark(args: argparse.Namespace) -> None:
    """Everything between parsing the arguments and stopping the processes."""
    want_orthanc = not args.skip_orthanc and args.only in (None, "orthanc")
    tools = find_tools(want_orthanc)
    targets = make_targets(tools, args.only, args.skip_orthanc)
    if not targets:
        sys.exit(f"error: no target to run (--only {args.only}, but it is unavailable)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    for line in machine_lines(tools, args.workdir.resolve()):
        print(line)
    study = load_study(args.slices)
    warmup = load_study(WARMUP_SLICES, seed=1)
    print(f"study:    {len(study.files)} instances, 3 series x {args.slices} slices, "
          f"{SIZE}x{SIZE} 16-bit, {study.bytes / MB:.1f} MB, in {study.folder}")
    print("targets (each run: sync, start fresh with an empty folder, send an untimed warm-up "
          f"study of {len(warmup.files)} other instances, send, stop, delete):")
    for target in targets:
        print(f"  {target.name:<15} {target.describe}")
    print(f"sender:   {tools.storescu} +sd +r -aec AET 127.0.0.1 PORT DIR  "
          f"(concurrent mode: -aec AET 127.0.0.1 PORT FILE...)")
    print("MB = 10^6 bytes of the DICOM files sent; images/s uses the median time.")
    workdir = Path(tempfile.mkdtemp(prefix="receive-", dir=args.workdir))
    results: list[Result] = []
    try:
        for mode in make_modes(study, args.runs, args.nagle_runs, args.concurrency):
            results += run_mode(tools, targets, mode, study, workdir, args.timeout, warmup)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(results)
    print_rss(results)


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
