"""The chaos soak's parts (bench/soak.py): the node under test, the PACS (dcmtk storescp), the
RIS (:class:`aiworker.dispatch.mllp.MllpReceiver`), the data disk (a tmpfs that can be
filled), and the modalities that send phantom studies. Each can be broken and mended."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
from common import ROOT, START_TIMEOUT_S, find_dcmtk, free_port, wait_for_port
from pynetdicom import AE

from aiworker.dispatch.mllp import MllpReceiver, control_id
from aiworker.dispatch.requestor import associate

AIWORKER = str(Path(sys.executable).parent / "aiworker")
MARK = "AIWORKER_SOAK_RUN"  # in the node's environment, so its children carry it too


class Pacs:
    """dcmtk's storescp (one association at a time), each arrival in its own file."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.folder.mkdir(parents=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        env = dict(os.environ, TCP_NODELAY="1")
        log_path = self.folder.parent / "pacs.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [find_dcmtk("storescp") or "storescp", "-aet", "PACS", "-od", str(self.folder),
                 "+uf", "--acse-timeout", "5", "--dimse-timeout", "10", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, log_path, START_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def received(self) -> tuple[list[tuple[str, str, str]], int]:
        """(study UID, SOP Instance UID, seg|sr|other) of each complete file, and how many
        files were cut off (an outage mid-transfer)."""
        out, partial = [], 0
        for path in sorted(self.folder.iterdir()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                kind = {"SEG": "seg", "SR": "sr"}.get(str(ds.Modality), "other")
                out.append((str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), kind))
            except Exception:  # noqa: BLE001 - cut off by an outage: not a receive
                partial += 1
        return out, partial


class Ris:
    """The MLLP receiver, answering AA, keeping (study UID from ZDS-1, MSH-10) of each
    message; stopped and restarted on the same port."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.receiver: MllpReceiver | None = MllpReceiver(self._answer)
        self.port = self.receiver.port

    def _answer(self, message: str) -> tuple[str, str]:
        study = control_id(message, "ZDS", 1).split("^")[0]
        with self.lock:
            self.messages.append((study, control_id(message, "MSH", 10)))
        return "AA", ""

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None

    def start(self) -> None:
        if self.receiver is None:
            self.receiver = MllpReceiver(self._answer, port=self.port)


class Disk:
    """The node's data dir on a tmpfs of ``size_mb``, filled by a ballast file; ``skipped``
    says why not, where the mount failed (not root, no CAP_SYS_ADMIN)."""

    def __init__(self, folder: Path, size_mb: int):
        self.folder = folder
        self.folder.mkdir(parents=True)
        self.ballast = folder / "ballast.soak"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        self.mounted = done.returncode == 0
        self.skipped = None if self.mounted else (
            f"mount -t tmpfs failed: {(done.stderr or done.stdout).strip()}")

    def fill(self) -> None:
        """Write the ballast until the file system is full (ENOSPC)."""
        chunk = b"\0" * (1 << 20)
        try:
            with open(self.ballast, "ab") as ballast:
                while True:
                    ballast.write(chunk)
        except OSError:
            pass

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def close(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


class Node:
    """``aiworker serve`` with the soak's config; kill9, stop and start; an exit the soak
    did not cause is kept in ``unexpected``."""

    def __init__(self, workdir: Path, config: dict[str, Any], mark: str):
        self.workdir, self.config, self.mark = workdir, config, mark
        self.port = config["node"]["port"]
        self.config_path = workdir / "aiworker.yaml"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen | None = None
        self.unexpected: list[str] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
        return env | {"PYTHONUNBUFFERED": "1", MARK: self.mark}

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([AIWORKER, "serve", "--config", str(self.config_path)],
                                         cwd=ROOT, env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log_path, START_TIMEOUT_S)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.unexpected.append("did not stop within 30 s of SIGTERM")
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self.proc = None

    def check_alive(self) -> bool:
        """False (and the exit noted) when the node exited by itself."""
        if self.proc is not None and self.proc.poll() is not None:
            self.unexpected.append(f"exited with {self.proc.returncode} at {time.time():.0f}")
            self.proc = None
            return False
        return True

    def status(self) -> dict[str, Any]:
        done = subprocess.run([AIWORKER, "status", "--json", "--problems", "0", "--config",
                               str(self.config_path)], cwd=ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"aiworker status failed: {done.stderr.strip()}")
        return json.loads(done.stdout)


class Modality:
    """A sender thread: writes phantom studies and C-STOREs each on one association,
    sending again what was not acknowledged (an abort, a refusal, 0xA700) until every
    instance is; new studies until ``stop_new`` is set, the current one until ``stop``."""

    def __init__(self, index: int, node_port: int, workdir: Path, seed: int,
                 stop_new: threading.Event, stop: threading.Event, gap_s: float = 0.0):
        self.index, self.node_port, self.workdir, self.seed = index, node_port, workdir, seed
        self.gap_s = gap_s
        self.stop_new, self.stop = stop_new, stop
        self.acked: dict[str, str] = {}  # SOP Instance UID -> study UID
        self.started: list[str] = []
        self.finished: list[str] = []
        self.statuses: Counter[str] = Counter()
        self.associations = 0
        self.thread = threading.Thread(target=self.run, name=f"modality-{index}", daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stop_new.is_set():
            files, study_uid = self.write_study(n)
            self.started.append(study_uid)
            if self.send(files, study_uid):
                self.finished.append(study_uid)
            shutil.rmtree(self.workdir / f"m{self.index}-{n}", ignore_errors=True)
            n += 1
            self.stop_new.wait(self.gap_s)

    def write_study(self, n: int) -> tuple[list[tuple[Path, str]], str]:
        """Phantom study ``n`` of this modality: (file, SOP Instance UID) each, its UID."""
        from aiworker.phantom.protocol import Overrides
        from aiworker.phantom.study import StudyOptions, write_study

        study = write_study(self.workdir / f"m{self.index}-{n}", StudyOptions(
            seed=self.seed * 10_000 + self.index * 1000 + n, vendor="ge", rescan=False,
            derived=False, truth=False, volume_spacing=3.0,
            overrides=Overrides(roles=("sag_pd_fs", "cor_pd_fs"), matrix=64, slices=16)))
        files = sorted(p for p in study.dicom_dir.rglob("*") if p.is_file())
        return [(p, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
                for p in files], study.study_uid

    def send(self, files: list[tuple[Path, str]], study_uid: str) -> bool:
        """True once every file of the study is acknowledged (False: told to stop)."""
        pending = list(files)
        while pending and not self.stop.is_set():
            pending = self.one_association(pending, study_uid)
            if pending:
                time.sleep(0.5)
        return not pending

    def one_association(self, files: list[tuple[Path, str]],
                        study_uid: str) -> list[tuple[Path, str]]:
        """Send ``files`` on one association; the ones not acknowledged."""
        ae = AE(ae_title=f"MOD{self.index}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(pydicom.uid.MRImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", self.node_port, ae_title="AIWORKER")
        if not assoc.is_established:
            self.statuses["no association"] += 1
            return files
        self.associations += 1
        left = []
        try:
            for path, sop_uid in files:
                if left or not assoc.is_established:
                    left.append((path, sop_uid))
                    continue
                status = assoc.send_c_store(path)
                code = int(status.Status) if "Status" in status else None
                self.statuses["no response" if code is None else f"0x{code:04X}"] += 1
                if code == 0x0000:
                    self.acked[sop_uid] = study_uid
                else:
                    left.append((path, sop_uid))
        finally:
            if assoc.is_established:
                assoc.release()
        return left
