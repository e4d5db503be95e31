"""The rule language and the decision: conditions on tags and features, combinators, the
first failed condition as the reason, preferences, and the bundled knee rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.selection import VENDORS, rotation, sag_pd_fs, series, study

from aiworker.select.conditions import Candidate
from aiworker.select.decide import Pipeline, decide
from aiworker.select.features import compute_features
from aiworker.select.rules import RuleError, load_rules, parse_rules

REPO = Path(__file__).resolve().parents[1]
KNEE_RULES = REPO / "config" / "rules" / "knee.yaml"


def knee() -> list[Pipeline]:
    return [Pipeline("knee", "knee-demo", load_rules(KNEE_RULES))]


def check(condition: dict, **spec_changes):
    """The outcome of one condition on a sagittal PD FS series (changed as given)."""
    rules = parse_rules({"roles": {"r": {"require": [condition]}}}, "test.yaml")
    headers = series(sag_pd_fs(**spec_changes))
    return rules.roles[0].check(Candidate(compute_features(headers), headers.first))


def routine_knee(vendor: str, **changes) -> list:
    """A routine knee protocol, descriptions empty: localizer, sag T1, sag PD (no FS),
    cor PD FS, ax T2 FS, an MPR, and the sagittal PD FS."""
    return [
        sag_pd_fs(vendor=vendor, orientations=("sagittal", "coronal", "axial"), slices=9,
                  gradient=True, te=4, tr=8, flip=20, fat_sat=False),
        sag_pd_fs(vendor=vendor, te=12, tr=600, fat_sat=False),
        sag_pd_fs(vendor=vendor, fat_sat=False),
        sag_pd_fs(vendor=vendor, plane="coronal"),
        sag_pd_fs(vendor=vendor, plane="axial", te=80, tr=4000),
        sag_pd_fs(vendor=vendor, image_type=("DERIVED", "SECONDARY", "MPR")),
        sag_pd_fs(vendor=vendor, rotation=rotation((0, 0, 1), 12), **changes),
    ]


# --- conditions ---------------------------------------------------------------------------


def test_equals_on_a_tag_ignores_case_and_compares_numbers_as_numbers():
    assert check({"tag": "Manufacturer", "equals": "siemens"}).ok
    assert check({"tag": "RepetitionTime", "equals": 3000}).ok
    outcome = check({"tag": "Manufacturer", "equals": "GE MEDICAL SYSTEMS"})
    assert not outcome.ok
    assert outcome.text == "Manufacturer is SIEMENS, needs GE MEDICAL SYSTEMS"


def test_multi_valued_tags_compare_joined_or_as_a_list():
    assert check({"tag": "ScanOptions", "equals": "PFP\\FS"}).ok
    assert check({"tag": "ScanOptions", "equals": ["PFP", "FS"]}).ok
    assert check({"tag": "ImageType", "regex": "^ORIGINAL\\\\PRIMARY"}).ok


def test_one_of_regex_range_present():
    assert check({"feature": "plane", "one_of": ["sagittal", "coronal"]}).ok
    assert check({"tag": "SequenceName", "regex": "tse"}).ok
    assert not check({"tag": "SequenceName", "regex": "^tir"}).ok
    assert check({"feature": "slice_thickness", "range": {"min": 2, "max": 4}}).ok
    assert check({"tag": "PixelSpacing", "range": {"max": 0.6}}).ok  # every value
    outcome = check({"feature": "slice_count", "range": {"min": 25}})
    assert outcome.text == "slice_count is 20, needs at least 25"
    assert check({"tag": "InversionTime", "present": False}).ok
    absent = check({"tag": "InversionTime", "present": True})
    assert absent.text == "InversionTime is absent, needs it present"


def test_range_on_a_missing_value_fails_with_a_reason():
    outcome = check({"tag": "RepetitionTime", "range": {"min": 1000}}, tr=None)
    assert outcome.text == "RepetitionTime is missing, needs at least 1000"


def test_combinators():
    assert check({"any": [{"feature": "plane", "equals": "axial"},
                          {"feature": "plane", "equals": "sagittal"}]}).ok
    none = check({"any": [{"feature": "plane", "equals": "axial"},
                          {"feature": "weighting", "equals": "T1"}]})
    assert none.text == ("none of: plane is sagittal, needs axial; weighting is PD "
                         "(TE 33 ms, TR 3000 ms), needs T1")
    excluded = check({"not": {"tag": "SeriesDescription", "regex": "mpr"}},
                     description="SAG PD MPR")
    assert excluded.text == "excluded: SeriesDescription SAG PD MPR matches /mpr/"
    assert check({"all": [{"feature": "fat_suppressed", "equals": True},
                          {"not": {"feature": "localizer", "equals": True}}]}).ok


def test_a_derived_feature_reason_quotes_its_evidence():
    outcome = check({"feature": "fat_suppressed", "equals": True}, vendor="ge", fat_sat=False)
    assert outcome.text == ("fat_suppressed is false (no fat suppression in ScanOptions, "
                            "inversion time, ImageType or description), needs true")


@pytest.mark.parametrize(("rules", "problem"), [
    ({"roles": {"main": {"require": [{"feature": "planee", "equals": "x"}]}}},
     "test.yaml: roles.main.require[0].feature: unknown feature 'planee'"),
    ({"roles": {"main": {"require": [{"tag": "SeriesDescriptio", "equals": "x"}]}}},
     "test.yaml: roles.main.require[0].tag: unknown DICOM keyword 'SeriesDescriptio'"),
    ({"roles": {"main": {"require": [{"feature": "plane", "equal": "x"}]}}},
     "test.yaml: roles.main.require[0]: needs exactly one test"),
    ({"roles": {"main": {"require": [{"feature": "plane", "equals": "x", "regex": "y"}]}}},
     "test.yaml: roles.main.require[0]: needs exactly one test"),
    ({"roles": {"main": {"require": [{"feature": "slice_count", "range": {"least": 3}}]}}},
     "test.yaml: roles.main.require[0].range: must be a mapping with min and/or max"),
    ({"roles": {"main": {"require": [{"tag": "Modality", "regex": "("}]}}},
     "test.yaml: roles.main.require[0].regex: must be a valid regular expression"),
    ({"roles": {"main": {"require": [{"feature": "plane", "equals": "x"}],
                         "prefer": [{"feature": "slice_count", "order": "most"}]}}},
     "test.yaml: roles.main.prefer[0].order: must be highest or lowest"),
    ({"roles": {}}, "test.yaml: roles: must map each role name"),
    ({"rolez": {}}, "test.yaml: (top level): unknown key 'rolez'"),
])
def test_rule_file_problems_name_the_file_and_the_key(rules, problem):
    with pytest.raises(RuleError) as caught:
        parse_rules(rules, "test.yaml")
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"roles": {"main": {"require": [
        {"feature": "nope", "equals": 1}, {"tag": "Nope", "equals": 1}]}}}))
    with pytest.raises(RuleError) as caught:
        load_rules(path)
    assert len(caught.value.problems) == 2


# --- the bundled knee rule ----------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_knee_rule_chooses_the_sagittal_pd_fs_and_explains_every_other_series(vendor):
    decision = decide(study(*routine_knee(vendor)), knee())
    target = decision.series[-1]
    assert decision.chosen == {"knee": {"main": target.series_uid}}
    reasons = [s.verdicts["knee/main"].reason for s in decision.series]
    assert reasons[0].startswith("localizer is true (slices in several planes")
    assert reasons[1] == "weighting is T1 (TE 12 ms, TR 600 ms), needs PD"
    assert reasons[2].startswith("fat_suppressed is false")
    assert reasons[3] == "plane is coronal, needs sagittal"
    assert reasons[4] == "plane is axial, needs sagittal"
    assert reasons[5] == "original is false (MPR: ImageType DERIVED\\SECONDARY\\MPR), needs true"
    assert reasons[6] == "chosen: meets every condition"


def test_enhanced_mr_study_is_selected_too():
    decision = decide(study(sag_pd_fs(vendor="philips", enhanced=True, plane="coronal"),
                            sag_pd_fs(vendor="philips", enhanced=True)), knee())
    assert decision.chosen["knee"]["main"] == decision.series[1].series_uid


def test_no_pd_fs_sagittal_means_no_match_with_reasons():
    specs = routine_knee("siemens")[:-1]
    decision = decide(study(*specs), knee())
    assert decision.chosen == {"knee": {"main": None}}
    assert not decision.matched("knee")
    assert decision.reason("knee") == "role main: none of the 6 series meets its conditions"
    assert all(not s.verdicts["knee/main"].matched for s in decision.series)


def test_a_rescan_is_preferred_over_the_first_acquisition():
    first = sag_pd_fs(acquisition_time="101500", series_number=3)
    again = sag_pd_fs(acquisition_time="104500", series_number=9)
    decision = decide(study(first, again), knee())
    rescan = decision.series[1]
    assert decision.chosen["knee"]["main"] == rescan.series_uid
    assert decision.series[0].verdicts["knee/main"].reason == (
        "meets every condition, but series 9 is preferred by acquired_at (highest: "
        "2026-01-15T10:45:00 over 2026-01-15T10:15:00)")
    assert rescan.verdicts["knee/main"].reason.startswith(
        "chosen: meets every condition, preferred over 1 other match by acquired_at")


def test_equal_times_fall_back_to_thinner_slices_then_more_slices():
    thick = sag_pd_fs(thickness=3.5, spacing=4.0)
    thin = sag_pd_fs(thickness=2.5, spacing=3.0)
    decision = decide(study(thick, thin), knee())
    assert decision.chosen["knee"]["main"] == decision.series[1].series_uid
    fewer, more = sag_pd_fs(slices=18), sag_pd_fs(slices=26)
    decision = decide(study(fewer, more), knee())
    assert decision.chosen["knee"]["main"] == decision.series[1].series_uid


@pytest.mark.parametrize(("changes", "reason"), [
    ({"skip": (9,)}, "geometry_consistent is false (missing slice: gap of 7.00 mm after slice 9 "
                     "of 19 (spacing 3.50 mm)), needs true"),
    ({"shift": {k: 1.0 for k in range(12, 20)}},
     "geometry_consistent is false (non-uniform spacing: gap 4.50 mm at slice 12 of 20 "
     "(spacing 3.50 mm)), needs true"),
    ({"slices": 12}, "slice_count is 12, needs at least 15"),
])
def test_broken_geometry_is_rejected_with_that_reason(changes, reason):
    decision = decide(study(sag_pd_fs(**changes)), knee())
    assert decision.chosen["knee"]["main"] is None
    assert decision.series[0].verdicts["knee/main"].reason == reason


def test_select_json_shape_is_exactly_the_documented_one():
    decision = decide(study(*routine_knee("ge")), knee())
    shape = decision.as_dict()
    assert set(shape) == {"study_uid", "series", "chosen"}
    for entry in shape["series"]:
        assert set(entry) == {"series_uid", "description", "features", "verdicts"}
        assert set(entry["verdicts"]) == {"knee/main"}
        assert set(entry["verdicts"]["knee/main"]) == {"matched", "reason"}
        assert {"plane", "weighting", "fat_suppressed", "localizer", "original", "slice_count",
                "geometry_consistent", "basis"} <= set(entry["features"])
    assert shape["chosen"] == {"knee": {"main": shape["series"][-1]["series_uid"]}}
