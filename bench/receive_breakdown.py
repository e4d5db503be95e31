#!/usr/bin/env python3
"""Where a received instance's time goes: the node's C-STORE handler cut down step by step.

Runs the node in this process and sends the benchmark study (see receive.py; generate it
first with ``bench/receive.py --quick`` or a full run) with one ``storescu`` over loopback,
``TCP_NODELAY=1``, 4 runs per variant, median printed:

* ``stock-noop``: pynetdicom as shipped, a handler that answers success and stores nothing;
* ``noop``: the node's pynetdicom speed-ups (receive/fastpath.py), the same empty handler;
* ``parse``: + walking the data set's header;
* ``write``: + writing the file into the spool (no header walk, no DB);
* ``full``: the node's real handler (header, spool file, state DB row).

``--fsync`` turns storage.fsync on. Figures are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import UID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiworker.config_loader import load_config  # noqa: E402
from aiworker.node import Node  # noqa: E402
from aiworker.receive import fastpath, scp  # noqa: E402
from aiworker.receive.dataset import read_whole_data_set  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import OUT, find_dcmtk, free_port  # noqa: E402

VARIANTS = ("stock-noop", "noop", "parse", "write", "full")


def cut_down_handler(variant: str):
    """A C-STORE handler doing only the steps the variant names."""

    def handle(self: scp.Receiver, event) -> int:
        request = event.request
        if variant == "parse":
            read_whole_data_set(request.DataSet, UID(event.context.transfer_syntax))
        if variant == "write":
            path = self.spool.root / "x" / f"{request.AffectedSOPInstanceUID}.dcm"
            self.spool.write(path, [b"\0" * 300, request.DataSet.getbuffer()])
        return 0x0000

    return handle


def measure(variant: str, study: Path, fsync: bool, runs: int) -> float:
    """Median images/s of ``runs`` sends of ``study`` to a node running ``variant``."""
    if variant != "full":
        scp.Receiver._on_store = cut_down_handler(variant)
    if variant == "stock-noop":
        fastpath.install = lambda: None
    data = Path(tempfile.mkdtemp(prefix="breakdown-", dir=OUT))
    port, storescu = free_port(), find_dcmtk("storescu") or "storescu"
    os.environ.update(AIWORKER_STORAGE__DATA_DIR=str(data), AIWORKER_NODE__PORT=str(port),
                      AIWORKER_NODE__HOST="127.0.0.1", AIWORKER_STORAGE__MIN_FREE_MB="1",
                      AIWORKER_STORAGE__FSYNC=str(fsync).lower(),
                      AIWORKER_LOGGING__LEVEL="WARNING")
    node = Node(load_config(ROOT / "config" / "aiworker.yaml"))
    node.start()
    images = sum(1 for _ in study.rglob("*.dcm"))
    rates = []
    try:
        for _ in range(runs):
            for folder in node.spool.root.iterdir():
                if folder.name != ".incoming":
                    shutil.rmtree(folder)
            node.spool._known_dirs.clear()
            os.sync()
            started = time.perf_counter()
            subprocess.run([storescu, "+sd", "+r", "-aec", "AIWORKER", "127.0.0.1",
                            str(port), str(study)], check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, TCP_NODELAY="1"))
            rates.append(images / (time.perf_counter() - started))
    finally:
        node.stop()
        shutil.rmtree(data, ignore_errors=True)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", nargs="?", choices=VARIANTS,
                        help="one variant (each runs in its own process); default: all")
    parser.add_argument("--fsync", action="store_true", help="storage.fsync on")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--study", type=Path, default=OUT / "knee-3x170-512")
    args = parser.parse_args()
    if not args.study.is_dir():
        sys.exit(f"no study at {args.study}: run bench/receive.py once to generate it")
    if args.variant:
        rate = measure(args.variant, args.study, args.fsync, args.runs)
        print(f"{args.variant:<11} {rate:7.0f} images/s  {1000 / rate:5.2f} ms/image", flush=True)
        return
    print(f"study: {args.study}, fsync {'on' if args.fsync else 'off'}, median of {args.runs}")
    for variant in VARIANTS:  # a fresh process each: the variants patch the node's code
        command = [sys.executable, __file__, variant, "--runs", str(args.runs),
                   "--study", str(args.study)] + (["--fsync"] if args.fsync else [])
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
