"""The chaos soak (bench/soak.py) in its short version, and its invariant checker.

The short soak is the real thing for 8 s and on until each kind of fault has struck once
and lasted its time: three modalities send phantom studies to a real node (the tiny model of
test_infer_worker.py) that is killed with -9, while dcmtk's storescp (the PACS) and the MLLP
receiver (the RIS) go down and come back and the node's data tmpfs fills up; then every
invariant must hold. The checker's tests feed it fabricated
observations, so a broken invariant is seen to fail.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.tools import REPO, needs_dcmtk
from test_infer_worker import TINY, write_model

from aiworker.dispatch.mllp import DELIVERED, MllpReceiver, send_mllp

sys.path.insert(0, str(REPO / "bench"))
import soak_invariants as inv  # noqa: E402

STUDY = "1.2.826.0.1.3680043.10.9"
SEG, SR = STUDY + ".90.1", STUDY + ".90.2"


def observations(**changes) -> inv.Observations:
    """One study sent, selected and delivered as it must be; ``changes`` break it."""
    obs = inv.Observations(
        acked={STUDY + ".1.1": STUDY, STUDY + ".1.2": STUDY},
        spool={STUDY + ".1.1": 1, STUDY + ".1.2": 1},
        selected={STUDY: [inv.Expected("job1", "done", SEG, SR, "CTRL1")]},
        pacs=[inv.Received(STUDY, SEG, "seg"), inv.Received(STUDY, SR, "sr")],
        ris=[(STUDY, "CTRL1")])
    for key, value in changes.items():
        setattr(obs, key, value)
    return obs


def failed(obs: inv.Observations) -> dict[str, list[str]]:
    return {i.name: i.details for i in inv.check(obs) if not i.held}


def test_the_checker_passes_a_clean_run_and_allows_what_at_least_once_repeats():
    assert failed(observations()) == {}
    again = observations(pacs=[inv.Received(STUDY, SEG, "seg")] * 2
                         + [inv.Received(STUDY, SR, "sr")], ris=[(STUDY, "CTRL1")] * 3)
    assert failed(again) == {}
    assert inv.duplicates(again) == {"pacs_duplicate_receives": 1,
                                     "ris_duplicate_messages": 2}


PACS = "every selected study has one SEG and one SR at the PACS"
RIS = "every selected study has one control ID at the RIS"


@pytest.mark.parametrize(("change", "names", "detail"), [
    ({"pacs": [inv.Received(STUDY, SR, "sr")]}, [PACS],
     f"study {STUDY}: SEG at the receiver none, expected {SEG}"),
    ({"pacs": [inv.Received(STUDY, SEG, "seg"), inv.Received(STUDY, SEG + "9", "seg"),
               inv.Received(STUDY, SR, "sr")]}, [PACS],
     f"study {STUDY}: SEG at the receiver ['{SEG}', '{SEG}9'], expected {SEG}"),
    ({"ris": [(STUDY, "CTRL1"), (STUDY, "CTRL2")]}, [RIS],
     f"study {STUDY}: HL7 control ID at the receiver ['CTRL1', 'CTRL2'], expected CTRL1"),
    ({"spool": {STUDY + ".1.1": 1, STUDY + ".1.2": 2}},
     ["every acknowledged instance is in the spool once"],
     f"instance {STUDY}.1.2 (study {STUDY}): 2 files in the spool"),
    ({"spool": {STUDY + ".1.1": 1}}, ["every acknowledged instance is in the spool once"],
     f"instance {STUDY}.1.2 (study {STUDY}): 0 files in the spool"),
    ({"selected": {}}, ["every study sent has one job", PACS, RIS],
     f"study {STUDY}: sent but no job"),
    ({"selected": {STUDY: [inv.Expected("job1", "failed", None, None, None)]}}, [PACS, RIS],
     f"study {STUDY}: the node wrote no SEG"),
    ({"orphans": ["pid 42: python -c spawn_main"]}, ["no orphan process after the final stop"],
     "pid 42: python -c spawn_main"),
    ({"stuck": ["outbox row 7 pending"]},
     ["no job or outbox row stuck after the quiet period"],
     "outbox row 7 pending"),
])
def test_the_checker_names_what_broke_an_invariant(change, names, detail):
    broken = failed(observations(**change))
    assert sorted(broken) == sorted(names)
    assert detail in broken[names[0]]


def test_a_closed_mllp_receiver_refuses_at_once_and_a_new_one_takes_its_port():
    """Regression: close() used to leave the socket listening (the accept thread still
    waited in it), so a RIS 'outage' accepted messages and its port could not be reused."""
    first = MllpReceiver()
    port = first.port
    first.close()
    time.sleep(0.05)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    second = MllpReceiver(port=port)
    try:
        message = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|CTRL9|P|2.5.1\rPID|1||X\r"
        assert send_mllp("127.0.0.1", port, message, 5).outcome == DELIVERED
    finally:
        second.close()


@needs_dcmtk
def test_a_short_chaos_soak_keeps_every_invariant(tmp_path: Path):
    write_model(tmp_path / "models", TINY)
    summary_path = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--duration", "8",
         "--fault-every", "1.5", "--studies-parallel", "3", "--settle", "40", "--seed", "3",
         "--model", "tiny", "--models-dir", str(tmp_path / "models"),
         "--json", str(summary_path)],
        capture_output=True, text=True, timeout=90, cwd=REPO)
    assert summary_path.exists(), run.stdout + run.stderr
    summary = json.loads(summary_path.read_text())
    assert [(i["name"], i["details"]) for i in summary["invariants"] if not i["held"]] == []
    assert run.returncode == 0 and summary["held"]
    assert summary["node_kills"] >= 1 and summary["pacs_outages"] >= 1
    assert summary["ris_outages"] >= 1
    assert summary["disk_full_episodes"] >= 1 or summary["disk_full_skipped"]
    assert summary["instances_acked"] == 32 * summary["studies_sent"] > 0
    assert summary["selected_studies"] == summary["studies_sent"]
    assert summary["pacs_files"] >= 2 * summary["selected_studies"]
    assert summary["ris_messages"] >= summary["selected_studies"]
    assert summary["node_log_tracebacks"] == 0
