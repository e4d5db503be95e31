"""``aiworker select``: the dry run over a folder (table and the documented JSON), other rule
files, and ``--replay`` over the spool, which lists changes and creates no jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.selection import datasets_of, sag_pd_fs, write
from test_select_stage import Clock, complete, receive

from aiworker.select.decide import Pipeline
from aiworker.select.rules import load_rules
from aiworker.select.worker import SelectionWorker
from aiworker.store.db import StateDB
from aiworker.store.layout import DataPaths

REPO = Path(__file__).resolve().parents[1]
AIWORKER = str(Path(sys.executable).parent / "aiworker")


def aiworker(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIWORKER, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def write_study(root: Path, study_uid: str, *specs) -> list[str]:
    """Header-only files of a study, one nested folder per series; the series UIDs."""
    uids = []
    for i, spec in enumerate(specs):
        datasets = datasets_of(spec, study_uid, f"{study_uid}.0")
        write(datasets, root / f"patient/{study_uid[-2:]}/series{i}")
        uids.append(str(datasets[0].SeriesInstanceUID))
    return uids


@pytest.fixture
def two_studies(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    folder = tmp_path / "incoming"
    matching = write_study(folder, "1.2.826.0.1.3680043.8.498.11",
                           sag_pd_fs(plane="coronal"), sag_pd_fs())
    lacking = write_study(folder, "1.2.826.0.1.3680043.8.498.22",
                          sag_pd_fs(te=12, tr=600, fat_sat=False))
    (folder / "README.txt").write_text("not DICOM")
    return folder, matching, lacking


def test_json_is_a_list_of_studies_in_the_documented_shape(two_studies, tmp_path):
    folder, matching, lacking = two_studies
    proc = aiworker("select", folder, "--json", cwd=tmp_path)  # no config here: bundled rules
    assert proc.returncode == 0, proc.stderr
    studies = json.loads(proc.stdout)
    assert [set(s) for s in studies] == [{"study_uid", "series", "chosen"}] * 2
    by_uid = {s["study_uid"]: s for s in studies}
    first = by_uid["1.2.826.0.1.3680043.8.498.11"]
    assert first["chosen"] == {"knee": {"main": matching[1]}}
    assert [s["series_uid"] for s in first["series"]] == matching
    for series in first["series"]:
        assert set(series) == {"series_uid", "description", "features", "verdicts"}
        assert set(series["verdicts"]["knee/main"]) == {"matched", "reason"}
    second = by_uid["1.2.826.0.1.3680043.8.498.22"]
    assert second["chosen"] == {"knee": {"main": None}}
    assert second["series"][0]["verdicts"]["knee/main"] == {
        "matched": False, "reason": "weighting is T1 (TE 12 ms, TR 600 ms), needs PD"}


def test_table_shows_features_decisions_and_reasons(two_studies, tmp_path):
    folder, _matching, _lacking = two_studies
    proc = aiworker("select", folder, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "study 1.2.826.0.1.3680043.8.498.11" in out
    assert "plane is coronal, needs sagittal" in out
    assert "knee: main: series" in out
    assert "knee: no match: role main: none of the 1 series meets its conditions" in out
    assert "skipped 1 files that are not DICOM" in out


def test_another_rule_file_and_a_bad_one(two_studies, tmp_path):
    folder, matching, _lacking = two_studies
    coronal = tmp_path / "coronal.yaml"
    coronal.write_text(yaml.safe_dump({"roles": {"main": {"require": [
        {"feature": "plane", "equals": "coronal"}]}}}))
    proc = aiworker("select", folder, "--rules", coronal, "--json", cwd=tmp_path)
    first = next(s for s in json.loads(proc.stdout)
                 if s["study_uid"].endswith(".11"))
    assert first["chosen"] == {"knee": {"main": matching[0]}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"roles": {"main": {"require": [{"feature": "plan",
                                                                   "equals": "coronal"}]}}}))
    proc = aiworker("select", folder, "--rules", bad, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"rules error: {bad}: roles.main.require[0].feature: "
                                  "unknown feature 'plan'")


def test_a_folder_without_dicom_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = aiworker("select", tmp_path / "empty", cwd=tmp_path)
    assert proc.returncode == 1
    assert "no DICOM series found" in proc.stderr


@pytest.fixture
def spooled(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A data dir whose state DB holds two studies decided with the bundled knee rules:
    one with a 20-slice and one with a 30-slice sagittal PD FS. Returns the config file
    and study UID -> chosen series UID."""
    data_dir = tmp_path / "var"
    config = tmp_path / "node.yaml"
    settings = yaml.safe_load((REPO / "config" / "aiworker.yaml").read_text())
    settings["storage"]["data_dir"] = str(data_dir)
    config.write_text(yaml.safe_dump(settings))  # pipelines: knee, config/rules/knee.yaml
    db = StateDB(DataPaths(data_dir).db)
    clock, chosen = Clock(), {}
    for name, slices in (("short", 20), ("long", 30)):
        study_uid = f"1.2.826.0.1.3680043.8.498.{slices}"
        chosen[study_uid] = receive(db, tmp_path / name,
                                    sag_pd_fs(slices=slices, series_number=1), clock.tick(),
                                    study_uid)
        complete(db, clock)
    rules = load_rules(REPO / "config" / "rules" / "knee.yaml")
    SelectionWorker(db, [Pipeline("knee", "knee-demo", rules)]).tick()
    assert len(db.jobs()) == 2
    db.close()
    return config, chosen


def test_replay_lists_what_a_changed_rule_would_select_differently(spooled, tmp_path):
    config, chosen = spooled
    stricter = yaml.safe_load((REPO / "config" / "rules" / "knee.yaml").read_text())
    stricter["roles"]["main"]["require"].append({"feature": "slice_count",
                                                 "range": {"min": 25}})
    new_rules = tmp_path / "knee-new.yaml"
    new_rules.write_text(yaml.safe_dump(stricter))

    proc = aiworker("select", "--replay", "--rules", new_rules, "--config", config, "--json",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["studies_checked"] == 2
    short = "1.2.826.0.1.3680043.8.498.20"
    assert report["changes"] == [{
        "study_uid": short, "pipeline": "knee", "role": "main", "before": chosen[short],
        "after": None, "recorded": True,
        "why": "series 1: slice_count is 20, needs at least 25"}]

    table = aiworker("select", "--replay", "--rules", new_rules, "--config", config,
                     cwd=tmp_path)
    assert "2 complete studies checked with" in table.stdout
    assert "1 selections would change" in table.stdout
    unchanged = aiworker("select", "--replay", "--config", config, "--since", "7d", "--json",
                         cwd=tmp_path)
    assert json.loads(unchanged.stdout) == {"studies_checked": 2, "changes": []}
    recent = aiworker("select", "--replay", "--config", config, "--since", "1h", "--json",
                      cwd=tmp_path)
    assert json.loads(recent.stdout)["studies_checked"] == 0

    db = StateDB(DataPaths(tmp_path / "var").db)
    assert len(db.jobs()) == 2 and all(d["matched"] for d in db.selections())
    db.close()


def test_replay_rejects_a_bad_since(spooled, tmp_path):
    config, _chosen = spooled
    proc = aiworker("select", "--replay", "--config", config, "--since", "soon", cwd=tmp_path)
    assert proc.returncode == 2
    assert "30m, 12h, 7d, 2w" in proc.stderr


def test_status_shows_each_decision_its_job_and_the_reasons(spooled, tmp_path):
    config, chosen = spooled
    db = StateDB(DataPaths(tmp_path / "var").db)
    clock = Clock()
    clock.now += 1_000
    lacking = "1.2.826.0.1.3680043.8.498.33"
    receive(db, tmp_path / "t1", sag_pd_fs(te=12, tr=600, series_number=4), clock.tick(),
            lacking)
    complete(db, clock)
    rules = load_rules(REPO / "config" / "rules" / "knee.yaml")
    SelectionWorker(db, [Pipeline("knee", "knee-demo", rules)]).tick()
    jobs = {j.study_uid: j for j in db.jobs()}
    db.close()

    proc = aiworker("status", "--json", "--config", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    studies = {s["study_uid"]: s for s in json.loads(proc.stdout)["studies"]}
    short = studies["1.2.826.0.1.3680043.8.498.20"]
    decision = short["selection"]["knee"]
    assert decision["matched"] and decision["reason"] is None
    assert decision["chosen"] == {"main": chosen[short["study_uid"]]}
    job = jobs[short["study_uid"]]
    assert decision["jobs"] == [{
        "job_id": job.job_id, "job_key": job.job_key, "state": "queued",
        "model": "knee-demo", "series_uid": chosen[short["study_uid"]],
        "inputs": {"main": chosen[short["study_uid"]]},
        "created_at": decision["jobs"][0]["created_at"],
        "updated_at": decision["jobs"][0]["updated_at"],
        "started_at": None, "finished_at": None, "attempts": 0, "device": None,
        "timings": None, "findings": None, "error_kind": None, "error": None,
        "result_dir": None, "warnings": [], "worker": None}]
    [series] = short["series"]
    assert series["selection"] == {"knee/main": {"matched": True,
                                                 "reason": "chosen: meets every condition"}}
    assert series["features"]["plane"] == "sagittal"

    none = studies[lacking]["selection"]["knee"]
    assert (none["matched"], none["jobs"]) == (False, [])
    assert none["reason"] == "role main: none of the 1 series meets its conditions"
    assert studies[lacking]["series"][0]["selection"]["knee/main"]["reason"] == (
        "weighting is T1 (TE 12 ms, TR 600 ms), needs PD")

    table = aiworker("status", "--config", config, cwd=tmp_path).stdout
    assert f"knee: job {job.job_id[:8]} queued (main: series 1" in table
    assert "knee: no match: role main: none of the 1 series meets its conditions" in table
    assert "weighting is T1 (TE 12 ms, TR 600 ms), needs PD" in table
