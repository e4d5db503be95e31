#!/usr/bin/env python3
"""Receiving over STOW-RS against receiving over C-STORE, in the same run.

One synthetic sagittal MR series (``--images`` 512x512 16-bit slices, cached under
bench/out/) goes to a freshly started ``aiworker serve`` (storage.fsync true, an empty data
folder, ``web.stow_enabled``) in each mode:

* ``C-STORE storescu``: dcmtk's ``storescu`` with TCP_NODELAY=1, one association;
* ``STOW-RS 1/request``: one instance per ``POST /dicomweb/studies`` on one keep-alive
  connection (how a router that forwards image by image sends);
* ``STOW-RS N/request``: ``--per-request`` instances per POST (a router that batches);
* ``STOW-RS N/request x4``: the same from 4 threads at once.

The multipart bodies are encoded before the clock starts, with dicomweb-client's own
encoder from the files' bytes, so the figures are the node's (HTTP, parse, spool write with
fsync, DB record), not the sender's. Each mode's time is the median of ``--runs``; every
run checks that the node stored every instance. Figures are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from common import OUT, ROOT, START_TIMEOUT_S, find_dcmtk, free_port, wait_for_port
from dicomweb_client.api import DICOMwebClient

TOKEN = "bench-stow-token-0123456789"
BOUNDARY = "aiworker-bench-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def series(images: int) -> list[Path]:
    """The cached phantom series of ``images`` 512x512 slices (written on first use)."""
    folder = OUT / f"stow-{images}"
    files = sorted(folder.rglob("*.dcm")) if folder.exists() else []
    if len(files) == images:
        return files
    from aiworker.phantom.protocol import Overrides
    from aiworker.phantom.study import StudyOptions, write_study

    shutil.rmtree(folder, ignore_errors=True)
    study = write_study(folder, StudyOptions(
        seed=7, vendor="siemens", rescan=False, derived=False, truth=False,
        volume_spacing=2.0, overrides=Overrides(("sag_pd_fs",), 512, images)))
    return sorted(study.files)


class Node:
    """``aiworker serve`` on free loopback ports with an empty data folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.dicom_port, self.web_port = free_port(), free_port()
        self.spool = folder / "data" / "spool"
        config = folder / "aiworker.yaml"
        config.write_text(json.dumps({
            "node": {"host": "127.0.0.1", "port": self.dicom_port},
            "storage": {"data_dir": str(folder / "data"), "min_free_mb": 1, "fsync": True},
            "completion": {"series_stable_seconds": 30}, "logging": {"level": "WARNING"},
            "web": {"port": self.web_port, "token": TOKEN, "stow_enabled": True},
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
        self.log = folder / "node.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "aiworker"), "serve", "--config",
                 str(config)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.dicom_port, self.proc, self.log, START_TIMEOUT_S)
            wait_for_port(self.web_port, self.proc, self.log, START_TIMEOUT_S)
        except RuntimeError as exc:
            self.stop()
            sys.exit(f"aiworker serve {exc}")

    def stored(self) -> int:
        return sum(1 for _ in self.spool.rglob("*.dcm")) if self.spool.exists() else 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def bodies(files: list[Path], per_request: int) -> list[bytes]:
    """Multipart bodies of ``per_request`` files each, encoded by dicomweb-client."""
    encoder = DICOMwebClient("http://127.0.0.1")  # only its encoder is used
    return [encoder._encode_multipart_message([p.read_bytes() for p in files[i:i + per_request]],
                                              CONTENT_TYPE)
            for i in range(0, len(files), per_request)]


def stow(node: Node, prepared: list[bytes], threads: int = 1) -> None:
    """POST every body, from ``threads`` threads each with its own keep-alive session."""
    url = f"http://127.0.0.1:{node.web_port}/dicomweb/studies"
    headers = {"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}",
               "Accept": "application/dicom+json"}

    def send(share: list[bytes]) -> None:
        with requests.Session() as session:
            for body in share:
                answer = session.post(url, data=body, headers=headers, timeout=120)
                if answer.status_code != 200:
                    sys.exit(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, [prepared[i::threads] for i in range(threads)]))


def storescu(exe: str, node: Node, folder: Path) -> None:
    env = dict(os.environ, TCP_NODELAY="1")
    done = subprocess.run([exe, "+sd", "+r", "-aec", "AIWORKER", "127.0.0.1",
                           str(node.dicom_port), str(folder)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"storescu failed: {done.stdout[-500:]}{done.stderr[-500:]}")


def timed(send: Callable[[Node], None], expected: int, runs: int, scratch: Path) -> float:
    """Median seconds of ``send`` to a fresh node, checking every instance is stored."""
    times = []
    for run in range(runs):
        folder = scratch / f"run-{time.monotonic_ns()}-{run}"
        folder.mkdir()
        subprocess.run(["sync"], check=False)
        node = Node(folder)
        try:
            started = time.perf_counter()
            send(node)
            times.append(time.perf_counter() - started)
            if node.stored() != expected:
                print(f"  !! node stored {node.stored()} of {expected}")
        finally:
            node.stop()
            shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--per-request", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    exe = find_dcmtk("storescu")
    if exe is None:
        sys.exit("dcmtk's storescu is needed: apt-get install dcmtk")
    files = series(args.images)
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    one, batched = bodies(files, 1), bodies(files, args.per_request)
    n = args.per_request
    modes = {
        "C-STORE storescu": lambda node: storescu(exe, node, files[0].parent),
        "STOW-RS 1/request": lambda node: stow(node, one),
        f"STOW-RS {n}/request": lambda node: stow(node, batched),
        f"STOW-RS {n}/request x4": lambda node: stow(node, batched, threads=4),
    }
    print(f"{len(files)} images, {size_mb:.0f} MB, fsync on, median of {args.runs} runs, "
          f"{os.cpu_count()} CPUs")
    print(f"{'mode':<26}{'seconds':>9}{'images/s':>10}{'MB/s':>8}{'vs C-STORE':>12}")
    with tempfile.TemporaryDirectory(dir=OUT) as scratch:
        baseline = None
        for name, send in modes.items():
            seconds = timed(send, len(files), args.runs, Path(scratch))
            baseline = baseline or seconds
            print(f"{name:<26}{seconds:>9.2f}{len(files) / seconds:>10.0f}"
                  f"{size_mb / seconds:>8.0f}{baseline / seconds:>11.2f}x")


if __name__ == "__main__":
    main()
