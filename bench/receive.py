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
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
SIZE = 512
SERIES = ("sag_pd_fs", "cor_pd_fs", "ax_t2_fs")  # phantom protocol roles
START_TIMEOUT_S = 60.0
RSS_POLL_S = 0.02
MB = 1e6


# ----------------------------------------------------------------------------- processes


class Processes:
    """Every process this script started; :meth:`stop_all` ends whichever are still running."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str], log: Path | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` in its own session, output to ``log`` (or discarded)."""
        out = open(log, "wb") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            if log:
                out.close()
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = 10.0) -> None:
        """SIGTERM the process group we started, then SIGKILL it after ``grace_s``."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        if proc in self.started:
            self.started.remove(proc)

    def stop_since(self, mark: int) -> None:
        """Stop the processes started after ``len(self.started)`` was ``mark``."""
        for proc in list(self.started[mark:]):
            self.stop(proc)

    def stop_all(self) -> None:
        self.stop_since(0)


PROCS = Processes()


def clean_env(nodelay: bool) -> dict[str, str]:
    """Our environment without AIWORKER_* overrides, with TCP_NODELAY=1 or without it."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIWORKER_") and k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Return once 127.0.0.1:port accepts a TCP connection; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before listening on "
                               f"{port}:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout_s:.0f} s:\n{tail(log)}")


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Return once ``text`` appears in ``log``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}:\n{tail(log)}")
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not in its log after {timeout_s:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text) or "    (empty log)"


# ----------------------------------------------------------------------------- tools


@dataclass
class Tools:
    """Paths of the external programs the benchmark runs."""

    storescu: str
    storescp: str
    orthanc: str | None
    aiworker: list[str]


def find_dcmtk(name: str) -> str | None:
    """dcmtk's ``name`` on PATH, skipping same-named tools (pynetdicom's apps in the venv)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for folder in dirs:
        exe = Path(folder) / name
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            continue
        try:
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in out.lower():
            return str(exe)
    return None


def find_orthanc() -> str | None:
    """The Orthanc server binary, if installed."""
    found = shutil.which("Orthanc")
    if found:
        return found
    for path in ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc"):
        if os.access(path, os.X_OK):
            return path
    return None


def find_aiworker() -> list[str]:
    """The ``aiworker`` console script next to this Python, else ``python -m aiworker.cli``."""
    script = Path(sys.executable).parent / "aiworker"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "aiworker.cli"]


def find_tools(want_orthanc: bool) -> Tools:
    """Locate dcmtk, Orthanc and aiworker; exit with a clear message if dcmtk is missing."""
    storescu, storescp = find_dcmtk("storescu"), find_dcmtk("storescp")
    if not (storescu and storescp):
        sys.exit("error: dcmtk's storescu and storescp are needed (Debian/Ubuntu: "
                 "apt-get install dcmtk; or make system-deps). Note: the venv's "
                 "pynetdicom 'storescu' is not dcmtk's and is not used.")
    orthanc = find_orthanc() if want_orthanc else None
    if want_orthanc and not orthanc:
        print("note: Orthanc not found (apt-get install orthanc): skipping the Orthanc "
              "target; use --skip-orthanc to silence this.", flush=True)
    return Tools(storescu, storescp, orthanc, find_aiworker())


def version_line(argv: list[str]) -> str:
    """First non-empty line of ``argv``'s output, for the header."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "?"


# ----------------------------------------------------------------------------- study


@dataclass
class Study:
    """The cached study on disk: its folder, its files in order, their total size."""

    folder: Path
    files: list[Path]
    bytes: int

    def series_files(self, number: int) -> list[Path]:
        return sorted((self.folder / f"{number:03d}").glob("*.dcm"))


WARMUP_SLICES = 4  # per series: 12 instances sent untimed to every target before each run


def load_study(slices: int, seed: int = 0) -> Study:
    """The 3-series 512x512 study with ``slices`` per series, generated once under bench/out."""
    folder = OUT / (f"knee-3x{slices}-{SIZE}" + (f"-seed{seed}" if seed else ""))
    marker = folder.with_suffix(".json")  # beside the folder: storescu +sd sends every file
    if not (marker.exists() and folder.is_dir()):
        generate_study(folder, marker, slices, seed)
    meta = json.loads(marker.read_text())
    files = [folder / name for name in meta["files"]]
    return Study(folder, files, sum(f.stat().st_size for f in files))


def generate_study(folder: Path, marker: Path, slices: int, seed: int) -> None:
    """Write the study into a scratch folder, move it into place, then write its marker."""
    sys.path.insert(0, str(ROOT))
    from aiworker.phantom.protocol import Overrides
    from aiworker.phantom.study import StudyOptions, write_study

    print(f"generating the study ({3 * slices} instances) in {folder} ...", flush=True)
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    options = StudyOptions(seed=seed, vendor="siemens", descriptions="vendor", rescan=False,
                           derived=False, images_in_acquisition=True, truth=False,
                           overrides=Overrides(SERIES, SIZE, slices))
    study = write_study(scratch, options)
    names = [str(p.relative_to(study.dicom_dir)) for p in study.files]
    shutil.rmtree(folder, ignore_errors=True)
    study.dicom_dir.rename(folder)
    shutil.rmtree(scratch)
    marker.write_text(json.dumps({"slices": slices, "files": names}))


# ----------------------------------------------------------------------------- targets


@dataclass
class Server:
    """One running target: its process, port, called AE title and a received-instance count."""

    proc: subprocess.Popen
    port: int
    aet: str
    count: Callable[[], int]


@dataclass
class Target:
    """A receiver the benchmark can start fresh in an empty folder."""

    name: str
    kind: str  # node | storescp | orthanc
    start: Callable[[Path, bool], Server]
    describe: str


def start_node(tools: Tools, fsync: bool, processes: int = 1,
               extra_config: str = "") -> Callable[[Path, bool], Server]:
    """A starter for ``aiworker serve`` with a config written into the run folder
    (``extra_config``: more YAML sections, e.g. pipelines and inference)."""

    def start(run_dir: Path, nodelay: bool) -> Server:
        port, data = free_port(), run_dir / "data"
        config = run_dir / "aiworker.yaml"
        config.write_text(
            f"node: {{host: 127.0.0.1, port: {port}, receive_processes: {processes}}}\n"
            f"storage: {{data_dir: {json.dumps(str(data))}, min_free_mb: 1, "
            f"fsync: {str(fsync).lower()}}}\n"
            "completion: {series_stable_seconds: 5}\n"
            "logging: {level: WARNING}\nweb: {enabled: false}\n" + extra_config
        )
        log = run_dir / "node.log"
        proc = PROCS.start([*tools.aiworker, "serve", "--config", str(config)],
                           clean_env(nodelay), log, cwd=ROOT)
        wait_for_port(port, proc, log, START_TIMEOUT_S)
        # the port opens with the first receiving process; the banner comes once all listen
        wait_for_text(log, "aiworker listening as AE", proc, START_TIMEOUT_S)
        return Server(proc, port, "AIWORKER", lambda: count_files(data / "spool", "*.dcm"))

    return start


def start_storescp(tools: Tools) -> Callable[[Path, bool], Server]:
    """A starter for dcmtk's ``storescp -od DIR PORT`` (single process)."""

    def start(run_dir: Path, nodelay: bool) -> Server:
        port, data = free_port(), run_dir / "received"
        data.mkdir()
        log = run_dir / "storescp.log"
        proc = PROCS.start([tools.storescp, "-od", str(data), str(port)],
                           clean_env(nodelay), log)
        wait_for_port(port, proc, log, START_TIMEOUT_S)
        return Server(proc, port, "STORESCP", lambda: count_files(data, "*"))

    return start


def orthanc_config(run_dir: Path, dicom_port: int, http_port: int) -> dict:
    """A minimal Orthanc configuration storing into ``run_dir``."""
    return {
        "Name": "aiworker-bench",
        "StorageDirectory": str(run_dir / "storage"),
        "IndexDirectory": str(run_dir / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "SaveJobs": False,
    }


def start_orthanc(tools: Tools) -> Callable[[Path, bool], Server]:
    """A starter for Orthanc with a generated JSON config."""

    def start(run_dir: Path, nodelay: bool) -> Server:
        dicom_port, http_port = free_port(), free_port()
        config = run_dir / "orthanc.json"
        config.write_text(json.dumps(orthanc_config(run_dir, dicom_port, http_port), indent=2))
        log = run_dir / "orthanc.log"
        proc = PROCS.start([str(tools.orthanc), str(config)], clean_env(nodelay), log)
        wait_for_port(dicom_port, proc, log, START_TIMEOUT_S)
        wait_for_port(http_port, proc, log, START_TIMEOUT_S)
        return Server(proc, dicom_port, "ORTHANC", lambda: orthanc_instances(http_port))

    return start


def count_files(folder: Path, pattern: str) -> int:
    """How many files matching ``pattern`` lie under ``folder``."""
    return sum(1 for p in folder.rglob(pattern) if p.is_file()) if folder.exists() else 0


def orthanc_instances(http_port: int) -> int:
    """CountInstances from Orthanc's REST /statistics."""
    url = f"http://127.0.0.1:{http_port}/statistics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return int(json.load(reply)["CountInstances"])


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
class Mode:
    """How the study is sent: which files, in how many storescu processes, Nagle or not."""

    name: str
    nodelay: bool
    batches: list[list[Path]]
    dirs: bool  # True: each batch is one folder sent with +sd +r
    runs: int
    note: str


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


def storescu_argv(tools: Tools, server: Server, batch: list[Path], dirs: bool) -> list[str]:
    """The storescu command for one batch: a folder with +sd +r, or a list of files."""
    head = [tools.storescu]
    tail = ["-aec", server.aet, "127.0.0.1", str(server.port)]
    if dirs:
        return head + ["+sd", "+r"] + tail + [str(p) for p in batch]
    return head + tail + [str(p) for p in batch]


def send(tools: Tools, server: Server, mode: Mode, run_dir: Path, timeout_s: float) -> float:
    """Run the mode's storescu processes at once; return the wall time until the last ends."""
    env = clean_env(mode.nodelay)
    logs = [run_dir / f"storescu-{i}.log" for i in range(len(mode.batches))]
    t0 = time.perf_counter()
    procs = [PROCS.start(storescu_argv(tools, server, batch, mode.dirs), env, log)
             for batch, log in zip(mode.batches, logs, strict=True)]
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, timeout_s - (time.perf_counter() - t0)))
        elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {timeout_s:g} s") from exc
    finally:
        for proc in procs:
            PROCS.stop(proc, grace_s=2.0)
    failed = [(p, log) for p, log in zip(procs, logs, strict=True) if p.returncode != 0]
    if failed:
        proc, log = failed[0]
        raise RuntimeError(f"{len(failed)} of {len(procs)} storescu failed, the first with "
                           f"{storescu_exit(proc.returncode)}\n{tail(log)}")
    return elapsed


def storescu_exit(code: int) -> str:
    """What a non-zero storescu exit code means (dcmtk 3.6.x halts on the first failed store)."""
    if code < 0:
        return f"signal {-code}"
    if code >= 0xA0:
        return (f"exit code {code}: the receiver answered a C-STORE with failure status "
                f"0x{code:02X}xx (storescu exits with the status's high byte)")
    if code == 10:
        return "exit code 10: a C-STORE failed without a status (network error)"
    return f"exit code {code}"


def settle_count(server: Server, expected: int, wait_s: float = 3.0) -> int:
    """The target's received-instance count, re-read briefly until it reaches ``expected``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            count = server.count()
        except OSError:
            count = -1
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


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


def keep_logs(run_dir: Path, label: str) -> Path:
    """Copy a run's logs and configs to bench/out/failed/<time>-<label>/; return that folder."""
    slug = "".join(c if c.isalnum() else "-" for c in label.lower())
    dest = OUT / "failed" / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    dest.mkdir(parents=True, exist_ok=True)
    for path in run_dir.iterdir():
        if path.is_file() and path.suffix in (".log", ".yaml", ".json"):
            shutil.copy2(path, dest / path.name)
    return dest


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


def machine_lines(tools: Tools, workdir: Path) -> list[str]:
    """Command line, machine, tool versions and code revision, for the header."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = psutil.virtual_memory().total / 2**30
    lines = [
        f"command:  {shlex.join([sys.executable, *sys.argv])}",
        f"machine:  nproc {nproc}, {cpu}, {mem:.0f} GiB RAM, {platform.platform()}",
        f"disk:     {workdir} on {filesystem(workdir)}",
        f"python:   {platform.python_version()}; aiworker {git_revision()}",
        f"dcmtk:    {version_line([tools.storescu, '--version']).strip('$ ')}",
    ]
    if tools.orthanc:
        lines.append(f"orthanc:  {version_line([tools.orthanc, '--version'])}")
    return lines


def filesystem(path: Path) -> str:
    """The device and type of the filesystem holding ``path`` (longest mount prefix)."""
    best = ("?", "?", "")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if str(path).startswith(mount) and len(mount) > len(best[2]):
            best = (part.device, part.fstype, mount)
    return f"{best[0]} ({best[1]}, mounted on {best[2]})"


def git_revision() -> str:
    """The repo's commit, flagged when aiworker/ has uncommitted changes."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return out.stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD") or "?"
        dirty = git("status", "--porcelain", "--", "aiworker")
    except OSError:
        return "(git unavailable)"
    return f"commit {rev}" + (" + uncommitted changes in aiworker/" if dirty else "")


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or a dash of the same width."""
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


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
