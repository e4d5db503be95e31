"""End to end: generated studies sent with dcmtk's storescu to the running node become a
queued job (or a recorded no-match) with the explanation in ``aiworker status --json``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tools import dcmtk, needs_dcmtk, wait_until

from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study


def generate(tmp_path: Path, name: str, seed: int, roles: tuple[str, ...]) -> WrittenStudy:
    return write_study(tmp_path / name, StudyOptions(
        seed=seed, vendor="ge", descriptions="empty", rescan=False, derived=False, truth=False,
        volume_spacing=3.0,
        overrides=Overrides(roles=roles, matrix=32, slices=16)))


def send(node, study: WrittenStudy) -> None:
    proc = dcmtk("storescu", "+sd", "+r", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 study.dicom_dir)
    assert proc.returncode == 0, proc.stdout


@needs_dcmtk
def test_a_sent_study_becomes_a_queued_job_explained_in_status(node, tmp_path):
    study = generate(tmp_path, "knee", 301, ("localizer", "sag_pd_fs", "sag_t1", "cor_pd_fs"))
    target = next(s.uid for s in study.series if s.plan.role == "sag_pd_fs")
    send(node, study)

    [job] = wait_until(lambda: node.sql("SELECT * FROM jobs"), 30, "a job row")
    assert (job["study_uid"], job["series_uid"], job["pipeline"], job["model"]) == \
        (study.study_uid, target, "knee", "knee-demo")
    running = ("queued", "running", "done")  # the infer stage takes the job at once
    assert job["state"] in running

    status = node.study_status(study.study_uid)
    decision = status["selection"]["knee"]
    assert decision["matched"] and decision["chosen"] == {"main": target}
    assert [j["job_id"] for j in decision["jobs"]] == [job["job_id"]]
    assert decision["jobs"][0]["state"] in running
    reasons = {s["series_uid"]: s["selection"]["knee/main"]["reason"] for s in status["series"]}
    roles = {s.uid: s.plan.role for s in study.series}
    assert reasons[target] == "chosen: meets every condition"
    by_role = {roles[uid]: reason for uid, reason in reasons.items()}
    assert by_role["localizer"].startswith("localizer is true (ImageType LOCALIZER)")
    assert by_role["sag_t1"].startswith("weighting is T1 (TE ")
    assert by_role["cor_pd_fs"].startswith("plane is coronal")
    assert [e["detail"]["job_id"] for e in node.events("selected")] == [job["job_id"]]


@needs_dcmtk
def test_a_study_without_the_series_is_recorded_as_no_match(node, tmp_path):
    study = generate(tmp_path, "other", 302, ("sag_t1", "ax_t2_fs"))
    send(node, study)
    wait_until(lambda: node.events("not_selected"), 30, "a not_selected event")
    assert node.sql("SELECT * FROM jobs") == []
    decision = node.study_status(study.study_uid)["selection"]["knee"]
    assert (decision["matched"], decision["jobs"]) == (False, [])
    assert decision["reason"] == "role main: none of the 2 series meets its conditions"
    table = node.cli("status", "--config", str(node.config_path)).stdout
    assert "knee: no match: role main: none of the 2 series meets its conditions" in table


def test_a_bad_rule_file_stops_the_node_with_one_line_per_problem(node_factory, tmp_path):
    (tmp_path / "bad.yaml").write_text("roles:\n  main:\n    require:\n"
                                       "      - {feature: plan, equals: sagittal}\n")
    node = node_factory(start=False, pipelines=[
        {"name": "knee", "rules": str(tmp_path / "bad.yaml"), "model": "knee-demo"},
        {"name": "other", "rules": "missing.yaml", "model": "other"}])
    with pytest.raises(RuntimeError, match="exited with 2"):
        node.start()
    problems = [line.split("rules error: ", 1)[1] for line in node.log_text().splitlines()
                if "rules error: " in line]
    assert problems[0].startswith(f"pipelines.0.rules (knee): {tmp_path / 'bad.yaml'}: "
                                  "roles.main.require[0].feature: unknown feature 'plan'")
    assert problems[1] == ("pipelines.1.rules (other): missing.yaml: cannot read the rule file: "
                           "No such file or directory")
