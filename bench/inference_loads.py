"""The two loads of ``receive_during_inference.py``: what keeps the CPUs busy while the
node receives.

* :class:`WorkerLoad`: the node's own inference worker, given jobs by sending the node
  studies its pipeline selects;
* :class:`EngineLoad`: a separate process beside the node running :class:`Engine` in a loop
  (this file run as a script, :func:`loop_forever`), paused with SIGSTOP for idle runs.

Both offer the same methods to the benchmark: ``set_busy``, ``prepare`` (before the timed
send), ``processes`` (whose CPU time is the load's), ``after_send``, ``extra_images`` and
``close``; ``node_config`` is YAML added to the node's config, ``describe`` one line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
from common import PROCS, ROOT, Tools, clean_env, rows, tail, wait_for_text
from targets import Mode, Server, send

LOAD_START_TIMEOUT_S = 600.0
TRIGGER_STUDIES = 3
POLL_S = 0.1


# ----------------------------------------------------------------------------- engine load


def loop_forever(args: argparse.Namespace) -> None:
    """The engine load process (this file run as a script): run the engine on the series in
    ``args.series_dir`` until killed, printing ``ready`` after the first run and each run's
    seconds after that."""
    import infer  # torch and the engine only in this process (infer puts aiworker on the path)
    import SimpleITK as sitk
    import torch

    from aiworker.infer.engine import Engine
    from aiworker.infer.registry import Registry, model_id

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    spec = Registry(models_dir=args.models_dir).get(args.model)
    engine = Engine(spec, device="cpu")
    files = sorted(args.series_dir.rglob("*.dcm"))
    infer.one_run(engine, files)
    print(f"ready: {model_id(spec)} on {len(files)} slices", flush=True)
    while True:
        print(f"run {infer.one_run(engine, files)['total']:.2f} s", flush=True)


class EngineLoad:
    """A looping engine process beside the node, paused for idle runs."""

    node_config = ""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        import infer

        series_dir = workdir / "load-series"
        infer.write_series(series_dir)
        argv = ["nice", "-n", str(args.nice), sys.executable, __file__,
                "--series-dir", str(series_dir), "--model", args.model,
                "--threads", str(args.threads)]
        if args.models_dir:
            argv += ["--models-dir", str(args.models_dir)]
        self.log = workdir / "load.log"
        self.proc = PROCS.start(argv, clean_env(False), self.log, cwd=ROOT)
        wait_for_text(self.log, "ready:", self.proc, LOAD_START_TIMEOUT_S)
        self.ps = psutil.Process(self.proc.pid)
        self.describe = (f"a separate process: Engine on bench/infer.py's series in a loop, "
                         f"nice {args.nice}, {args.threads} torch threads "
                         f"({self.ready_line()}); paused (SIGSTOP) for the idle runs")

    def ready_line(self) -> str:
        """What the load printed once its first run ended: the model and series size."""
        lines = self.log.read_text().splitlines()
        return next((line for line in lines if line.startswith("ready:")), "?")

    def set_busy(self, busy: bool) -> None:
        """Resume (busy) or pause (idle) the load's process group."""
        os.killpg(self.proc.pid, signal.SIGCONT if busy else signal.SIGSTOP)

    def prepare(self, server: Server, run_dir: Path, busy: bool, tools: Tools,
                timeout_s: float) -> None:
        """Nothing to do once the node runs: the load was paused or resumed before."""

    def processes(self, server: Server) -> list[psutil.Process]:
        return [self.ps]

    def after_send(self, run_dir: Path, busy: bool) -> str:
        return ""

    def extra_images(self, busy: bool) -> int:
        """Instances the node receives besides the warm-up and timed studies: none."""
        return 0

    def close(self) -> None:
        self.set_busy(True)  # a stopped process does not act on SIGTERM
        PROCS.stop(self.proc)


# ----------------------------------------------------------------------------- worker load


class WorkerLoad:
    """The node's own inference worker, given jobs by sending it studies it selects."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        import infer

        self.studies = workdir / "trigger-studies"
        subprocess.run(infer.phantom_argv(self.studies, TRIGGER_STUDIES), cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        from aiworker.config import Inference
        from aiworker.infer.process import default_threads

        args.nice = Inference().nice if args.nice is None else args.nice
        args.threads = args.threads or default_threads()
        inference = {"nice": args.nice, "threads": args.threads}
        if args.models_dir:
            inference["models_dir"] = str(args.models_dir)
        pipeline = {"name": "knee", "rules": str(ROOT / "config/rules/knee.yaml"),
                    "model": args.model, "outputs": [], "send_to": []}
        self.node_config = (f"pipelines: [{json.dumps(pipeline)}]\n"
                            f"inference: {json.dumps(inference)}\n")
        self.describe = (f"the node's inference worker (inference.nice {args.nice}, "
                         f"inference.threads {args.threads}), model {args.model}; busy runs "
                         f"first send "
                         f"{TRIGGER_STUDIES} studies of bench/infer.py's series and start "
                         "the timed send once the 2nd job runs")

    def set_busy(self, busy: bool) -> None:
        """Nothing: the worker is idle until the node is sent studies it selects."""

    def prepare(self, server: Server, run_dir: Path, busy: bool, tools: Tools,
                timeout_s: float) -> None:
        """For a busy run: send the trigger studies and return once the 2nd job runs."""
        if not busy:
            return
        cases = sorted(self.studies.glob("case-*"))
        send(tools, server, Mode("trigger", True, [cases], True, 1, ""), run_dir,
                timeout_s)
        db = run_dir / "data" / "state.db"
        deadline = time.monotonic() + LOAD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            states = job_states(db)
            if states.count("done") >= 1 and "running" in states:
                return
            if "failed" in states or server.proc.poll() is not None:
                raise RuntimeError(f"jobs {states}; node log:\n{tail(run_dir / 'node.log')}")
            time.sleep(POLL_S)
        raise RuntimeError(f"the 2nd job did not start within {LOAD_START_TIMEOUT_S:g} s "
                           f"(jobs: {job_states(db)})")

    def processes(self, server: Server) -> list[psutil.Process]:
        """The node's children: the inference process (and multiprocessing's helper)."""
        return psutil.Process(server.proc.pid).children(recursive=True)

    def after_send(self, run_dir: Path, busy: bool) -> str:
        """For a busy run: a job must still be running when the send ends."""
        if not busy:
            return ""
        states = job_states(run_dir / "data" / "state.db")
        if "running" not in states:
            raise RuntimeError(f"no job was running at the end of the send (jobs: {states})")
        return f"jobs at the end of the send: {', '.join(states)}"

    def extra_images(self, busy: bool) -> int:
        """The trigger studies' instances, in a busy run."""
        return len(list(self.studies.rglob("*.dcm"))) if busy else 0

    def close(self) -> None:
        """Nothing: each node (and its worker) is stopped after its run."""


def job_states(db: Path) -> list[str]:
    """The state of every job in the node's state DB, oldest first ([] before it exists)."""
    try:
        return [r["state"] for r in rows(db, "SELECT state FROM jobs ORDER BY created_at, job_id")]
    except sqlite3.Error:
        return []


Load = EngineLoad | WorkerLoad


def parse_loop_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The engine load process's arguments (given by :class:`EngineLoad`)."""
    parser = argparse.ArgumentParser(description="the engine load of "
                                                 "receive_during_inference.py (internal)")
    parser.add_argument("--series-dir", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--models-dir", type=Path, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    loop_forever(parse_loop_args())
