"""Several receiving processes on one port (node.receive_processes > 1)."""

from __future__ import annotations

import subprocess

import psutil
from helpers.tools import dcmtk_env, needs_dcmtk, wait_until


def receiving_children(node) -> list[psutil.Process]:
    """The node's receiving processes: its children that listen on the DICOM port (not the
    inference process, nor multiprocessing's resource tracker)."""
    return [child for child in psutil.Process(node.proc.pid).children()
            if _listens_on(child, node.port)]


def _listens_on(process: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in process.net_connections(kind="tcp"))
    except psutil.NoSuchProcess:
        return False


@needs_dcmtk
def test_concurrent_senders_spread_over_processes(node_factory, make_study) -> None:
    node = node_factory(node={"receive_processes": 2})
    workers = wait_until(lambda: len(receiving_children(node)) == 2 and receiving_children(node),
                         10, "two receiving processes")
    study = make_study(series=4, slices=6)
    senders = [subprocess.Popen(["storescu", "+sd", "+r", "-aec", "AIWORKER", "127.0.0.1",
                                 str(node.port), str(folder)], env=dcmtk_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for folder in sorted(p for p in study.root.iterdir() if p.is_dir())]
    assert [sender.wait(60) for sender in senders] == [0, 0, 0, 0]

    assert len(node.spool_files()) == 24
    for source in study.files:
        assert study.spool_path(node.data_dir, source).is_file()
    counts = {row["series_uid"]: row["instance_count"]
              for row in node.sql("SELECT series_uid, instance_count FROM series")}
    assert counts == {uid: 6 for uid in study.series}
    assert node.wait_for_log("association released").count("association released") == 4
    assert all(worker.is_running() for worker in workers)  # none crashed on the way


def test_workers_die_with_a_killed_parent(node_factory) -> None:
    node = node_factory(node={"receive_processes": 2})
    workers = wait_until(lambda: len(receiving_children(node)) == 2 and receiving_children(node),
                         10, "two receiving processes")
    node.kill9()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], "receiving processes outlived the killed node"
    node.start()  # the port is free again for a fresh node
    assert len(wait_until(lambda: len(receiving_children(node)) == 2 and
                          receiving_children(node), 10, "two new receiving processes")) == 2
