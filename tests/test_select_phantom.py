"""Selection on generated knee studies: across vendors, obliquity, transfer syntaxes, matrix
sizes, Enhanced MR and plain descriptions, the bundled rule takes the sagittal PD FS (the
re-scan when there is one) and never a localizer, a reformat (derived), T1, PD without FS,
coronal or axial series; broken geometry and missing series are explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study
from aiworker.select.decide import Pipeline, StudyDecision, decide
from aiworker.select.headers import scan_folder
from aiworker.select.rules import load_rules

REPO = Path(__file__).resolve().parents[1]
VENDORS = ("siemens", "ge", "philips")
SYNTAXES = ("explicit", "implicit", "rle", "jpegls", "jpeg2000")
MATRICES = (32, 40)
OBLIQUITY = (0.0, 12.0, 20.0)
DESCRIPTIONS = ("vendor", "generic", "empty")
WITH_SAG_PD = ("localizer", "sag_pd", "sag_pd_fs", "sag_t1", "cor_stir", "ax_pd_fs")
CASES = 63
COARSE_MM = 3.0  # a coarse anatomy volume: selection reads headers, and it is 5x faster
NEVER = {"localizer": "localizer is true", "sag_t1": "weighting is T1",
         "cor_t1": "plane is coronal", "cor_pd_fs": "plane is coronal",
         "cor_stir": "plane is coronal", "ax_pd_fs": "plane is axial",
         "ax_t2_fs": "plane is axial", "sag_pd": "fat_suppressed is false"}


def knee() -> list[Pipeline]:
    return [Pipeline("knee", "knee-demo", load_rules(REPO / "config" / "rules" / "knee.yaml"))]


def case_options(i: int) -> StudyOptions:
    """Case ``i`` of the sweep: every vendor with every obliquity, syntax and matrix size in
    turn, some Enhanced MR, some re-scans, some reformats of the sagittal PD FS, plain
    descriptions in two of three cases."""
    return StudyOptions(
        seed=5000 + i,
        vendor=VENDORS[i % 3],
        max_oblique=OBLIQUITY[(i // 3) % 3],
        transfer_syntax=SYNTAXES[i % 5],
        enhanced=i % 9 == 4,
        rescan=i % 4 == 1,
        derived=i % 3 == 1,
        descriptions=DESCRIPTIONS[(i // 2) % 3],
        overrides=Overrides(roles=WITH_SAG_PD if i % 5 == 2 else None,
                            matrix=MATRICES[i % 2], slices=16),
        truth=False,
        volume_spacing=COARSE_MM,
    )


def select(written: WrittenStudy) -> StudyDecision:
    [study], skipped = scan_folder(written.dicom_dir)
    assert skipped == 0
    return decide(study, knee())


def verdicts(decision: StudyDecision) -> dict[str, tuple[bool, str]]:
    return {s.series_uid: (s.verdicts["knee/main"].matched, s.verdicts["knee/main"].reason)
            for s in decision.series}


def test_the_sweep_covers_what_the_issue_asks():
    options = [case_options(i) for i in range(CASES)]
    assert len(options) >= 60
    for values, field in ((VENDORS, "vendor"), (SYNTAXES, "transfer_syntax"),
                          (OBLIQUITY, "max_oblique"), (DESCRIPTIONS, "descriptions")):
        assert {getattr(o, field) for o in options} == set(values)
    assert {o.overrides.matrix for o in options} == set(MATRICES)
    assert any(o.enhanced for o in options) and any(o.rescan for o in options)
    assert any(o.derived and o.enhanced for o in options)
    assert any(o.derived and o.descriptions == "empty" for o in options)


@pytest.mark.parametrize("i", range(CASES))
def test_the_sagittal_pd_fs_is_chosen_and_nothing_else(i, tmp_path):
    written = write_study(tmp_path / "case", case_options(i))
    decision = select(written)
    roles = {s.uid: s.plan for s in written.series}
    wanted = [s.uid for s in written.series
              if s.plan.role == "sag_pd_fs" and not s.plan.derived][-1]  # the re-scan
    assert decision.chosen == {"knee": {"main": wanted}}, _explain(decision, roles)
    assert any(p.derived for p in roles.values()) == (i % 3 == 1)
    for uid, (matched, reason) in verdicts(decision).items():
        plan = roles[uid]
        if plan.derived:
            assert not matched and reason.startswith("original is false"), reason
        elif plan.role in NEVER:
            assert not matched and reason.startswith(NEVER[plan.role]), (plan.role, reason)
        elif uid != wanted:  # the first acquisition of a re-scanned series
            assert matched and "preferred by acquired_at" in reason, reason


def test_no_sagittal_pd_fs_means_no_job_and_the_reason(tmp_path):
    written = write_study(tmp_path / "case", StudyOptions(
        seed=77, vendor="ge", descriptions="empty", rescan=False, derived=False, truth=False,
        volume_spacing=COARSE_MM,
        overrides=Overrides(roles=("localizer", "sag_t1", "sag_pd", "cor_pd_fs", "ax_t2_fs"),
                            matrix=32, slices=16)))
    decision = select(written)
    assert decision.chosen == {"knee": {"main": None}}
    assert decision.reason("knee") == "role main: none of the 5 series meets its conditions"
    assert not any(matched for matched, _ in verdicts(decision).values())


def _sag_pd_fs(tmp_path: Path, vendor: str) -> tuple[WrittenStudy, list[Path]]:
    written = write_study(tmp_path / vendor, StudyOptions(
        seed=91, vendor=vendor, rescan=False, derived=False, truth=False, max_oblique=15,
        volume_spacing=COARSE_MM,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=32, slices=20)))
    return written, sorted(written.series[0].files)


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_missing_slice_is_rejected_with_that_reason(vendor, tmp_path):
    written, files = _sag_pd_fs(tmp_path, vendor)
    files[9].unlink()
    [(matched, reason)] = verdicts(select(written)).values()
    assert not matched
    assert reason.startswith("geometry_consistent is false (missing slice: gap of "), reason


@pytest.mark.parametrize("vendor", VENDORS)
def test_non_uniform_spacing_is_rejected_with_that_reason(vendor, tmp_path):
    written, files = _sag_pd_fs(tmp_path, vendor)
    for path in files[12:]:  # the last slices moved 1.5 mm further along the normal
        ds = pydicom.dcmread(path)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        ds.ImagePositionPatient = [round(float(v), 6) for v in
                                   np.asarray(ds.ImagePositionPatient, float) + 1.5 * normal]
        ds.save_as(path)
    [(matched, reason)] = verdicts(select(written)).values()
    assert not matched
    assert reason.startswith("geometry_consistent is false (non-uniform spacing: gap "), reason
    assert "at slice 12 of 20" in reason


def _explain(decision: StudyDecision, roles: dict) -> str:
    return "\n".join(f"{roles[s.series_uid].role}: {s.verdicts['knee/main'].reason} "
                     f"{s.features.basis}" for s in decision.series)
