"""Derived series features from headers alone: plane, weighting, fat suppression, localizer,
derivation and slice geometry, across vendor conventions and Enhanced MR."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.selection import VENDORS, rotation, sag_pd_fs, series
from hypothesis import given, settings
from hypothesis import strategies as st

from aiworker.select.features import FeatureSettings, compute_features
from aiworker.select.geometry import plane_of


def features(**changes):
    return compute_features(series(sag_pd_fs(**changes)))


# --- plane --------------------------------------------------------------------------------


@pytest.mark.parametrize("plane", ["sagittal", "coronal", "axial"])
def test_cardinal_planes(plane):
    found = features(plane=plane)
    assert found.plane == plane
    assert found.obliquity_deg == 0.0


def test_oblique_sagittal_keeps_its_plane_and_reports_the_angle():
    found = features(rotation=rotation((0, 0, 1), 15))
    assert found.plane == "sagittal"
    assert found.obliquity_deg == pytest.approx(15, abs=0.1)
    assert "tilted 15° from true sagittal" in found.basis["plane"]


def test_beyond_the_configured_angle_a_series_is_oblique():
    tilted = series(sag_pd_fs(rotation=rotation((0, 0, 1), 35)))
    assert compute_features(tilted).plane == "oblique"
    assert compute_features(tilted, FeatureSettings(oblique_above_deg=40)).plane == "sagittal"


CARDINAL_NORMALS = {"sagittal": (1, 0, 0), "coronal": (0, 1, 0), "axial": (0, 0, 1)}


@settings(max_examples=300, deadline=None)
@given(plane=st.sampled_from(sorted(CARDINAL_NORMALS)),
       tilt=st.floats(-20, 20, allow_nan=False),
       tilt_axis=st.floats(0, 360, allow_nan=False),
       in_plane=st.floats(-180, 180, allow_nan=False))
def test_plane_detection_within_20_degrees_of_each_cardinal_plane(plane, tilt, tilt_axis,
                                                                  in_plane):
    """Any in-plane rotation, then a tilt of up to ±20° about any axis lying in the plane:
    still that plane, and the obliquity is the tilt."""
    normal = np.asarray(CARDINAL_NORMALS[plane], float)
    row, col = {"sagittal": (1, 2), "coronal": (0, 2), "axial": (0, 1)}[plane]
    row, col = np.eye(3)[row], np.eye(3)[col]
    spin = np.asarray(rotation(tuple(normal), in_plane))
    axis = np.asarray(rotation(tuple(normal), tilt_axis)) @ row  # some direction in the plane
    turn = np.asarray(rotation(tuple(axis), tilt)) @ spin
    found = plane_of([*(turn @ row), *(turn @ col)], oblique_above_deg=30)
    assert found.plane == plane
    assert found.obliquity_deg == pytest.approx(abs(tilt), abs=1e-6)


def test_tri_planar_localizer_is_mixed_and_a_localizer_without_any_name():
    found = features(orientations=("sagittal", "coronal", "axial"), slices=9)
    assert found.plane == "mixed"
    assert found.localizer
    assert "several planes" in found.basis["localizer"]
    assert not found.geometry_consistent


# --- weighting ----------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("te", "tr", "weighting"), [
    (33, 3000, "PD"), (12, 600, "T1"), (85, 4200, "T2"), (20, 2500, "PD")])
def test_weighting_from_timing_with_an_empty_description(vendor, te, tr, weighting):
    assert features(vendor=vendor, te=te, tr=tr, description="").weighting == weighting


def test_timing_wins_over_a_misleading_description():
    found = features(te=90, tr=4000, description="PD FS SAG")
    assert found.weighting == "T2"
    assert found.basis["weighting"] == "TE 90 ms, TR 4000 ms"


def test_ambiguous_timing_is_settled_by_the_description_or_left_unknown():
    assert features(te=55, tr=3000, description="").weighting == "unknown"
    hinted = features(te=55, tr=3000, description="sag pd fs")
    assert hinted.weighting == "PD"
    assert "description says PD" in hinted.basis["weighting"]


def test_without_timing_the_description_is_the_only_hint():
    assert features(te=None, tr=None, description="T1 SAG").weighting == "T1"
    assert features(te=None, tr=None, description="").weighting == "unknown"


def test_short_ti_inversion_recovery_is_stir_and_fat_suppressed():
    found = features(inversion=True, ti=160, te=40, tr=4500, fat_sat=False)
    assert found.weighting == "STIR"
    assert found.fat_suppressed
    assert "STIR" in found.fat_suppression


def test_gradient_echo_is_never_pd():
    assert features(gradient=True, te=18, tr=600, flip=30).weighting == "T2*"
    assert features(gradient=True, te=4, tr=12, flip=25).weighting == "T1"


# --- fat suppression ----------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_scan_options_fs_is_fat_suppression_for_every_vendor(vendor):
    assert features(vendor=vendor).fat_suppression == "ScanOptions FS"
    assert not features(vendor=vendor, fat_sat=False).fat_suppressed


def test_ge_spatial_saturation_and_readout_terms_are_not_fat_suppression():
    found = features(vendor="ge", fat_sat=False)  # FAST_GEMS SAT_GEMS ... FSA_GEMS, no FS
    assert "SAT_GEMS" in found_options(vendor="ge", fat_sat=False)
    assert not found.fat_suppressed


def found_options(**changes):
    return [str(v) for v in series(sag_pd_fs(**changes)).first.ScanOptions]


def test_fast_spin_echo_in_a_description_is_not_fat_suppression():
    assert not features(fat_sat=False, description="PD FSE SAG").fat_suppressed


@pytest.mark.parametrize("description", ["PDW_SPAIR SAG", "sag pd spir", "PD FATSAT SAG",
                                         "SAG PDFS", "pd fat sat sag", "mDIXON W sag"])
def test_philips_style_descriptions_name_fat_suppression(description):
    found = features(vendor="philips", fat_sat=False, description=description)
    assert found.fat_suppressed, description
    assert found.fat_suppression.startswith("description says")


def test_a_negated_keyword_is_not_fat_suppression():
    assert not features(fat_sat=False, description="PD SAG NO FS").fat_suppressed


def test_dixon_water_image_type_is_fat_suppressed():
    found = features(fat_sat=False, image_type=("DERIVED", "PRIMARY", "DIXON", "WATER"))
    assert found.fat_suppressed
    assert not found.original


# --- localizer and derivation -------------------------------------------------------------


def test_localizer_by_image_type():
    found = features(vendor="ge", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert found.localizer
    assert found.basis["localizer"] == "ImageType LOCALIZER"


@pytest.mark.parametrize("description", ["localizer", "AAHead_Scout", "3-plane loc", "Survey"])
def test_localizer_by_name(description):
    assert features(description=description).localizer


def test_mpr_and_secondary_capture_are_not_original():
    mpr = features(image_type=("DERIVED", "SECONDARY", "MPR"))
    assert (mpr.original, mpr.derivation) == (False, "MPR")
    capture = features(extra={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"})
    assert capture.derivation == "secondary capture"
    assert features(description="SAG PD MIP").derivation == "MIP"
    assert features().original


# --- geometry -----------------------------------------------------------------------------


def test_consistent_stack_measures():
    found = features(slices=24, spacing=3.3, thickness=3.0, rows=320, columns=288,
                     pixel_spacing=0.4)
    assert found.geometry_consistent
    assert (found.slice_count, found.stacks, found.rows, found.columns) == (24, 1, 320, 288)
    assert found.slice_spacing == pytest.approx(3.3)
    assert found.pixel_spacing == [0.4, 0.4]
    assert found.basis["geometry_consistent"] == "24 parallel slices, 3.30 mm apart"


def test_missing_slice_is_reported_as_such():
    found = features(skip=(7,))
    assert not found.geometry_consistent
    assert found.slice_count == 19
    assert found.basis["geometry_consistent"].startswith("missing slice: gap of 7.00 mm after "
                                                         "slice 7 of 19")


def test_non_uniform_spacing_names_the_gap_and_the_slice():
    found = features(shift={i: 1.2 for i in range(10, 20)})
    assert not found.geometry_consistent
    assert found.basis["geometry_consistent"] == ("non-uniform spacing: gap 4.70 mm at slice 10 "
                                                  "of 20 (spacing 3.50 mm)")


def test_small_rounding_differences_are_tolerated():
    assert features(shift={5: 0.05, 12: -0.1}).geometry_consistent


def test_duplicate_positions_are_rejected_but_echoes_are_stacks():
    duplicate = features(repeat_positions=True)
    assert not duplicate.geometry_consistent
    assert duplicate.basis["geometry_consistent"].startswith("duplicate slices: 2 images")
    echoes = features(echoes=2)
    assert echoes.geometry_consistent
    assert (echoes.slice_count, echoes.stacks) == (20, 2)
    assert echoes.basis["geometry_consistent"].endswith("2 echoes")


def test_slices_that_are_not_parallel():
    s = series(sag_pd_fs())
    tilted = np.asarray(rotation((0, 0, 1), 5)) @ np.asarray(s.instances[3].ImageOrientationPatient
                                                            ).reshape(2, 3).T
    s.instances[3].ImageOrientationPatient = [float(v) for v in tilted.T.reshape(6)]
    found = compute_features(s)
    assert not found.geometry_consistent
    assert found.basis["geometry_consistent"].startswith("slices not parallel")


def test_image_size_must_not_vary():
    s = series(sag_pd_fs())
    s.instances[2].Rows = 128
    assert compute_features(s).basis["geometry_consistent"].startswith("image size varies")


# --- Enhanced MR and header details ------------------------------------------------------


def test_enhanced_mr_multiframe_reads_its_functional_groups():
    found = features(vendor="philips", enhanced=True, slices=18, te=30, tr=2800)
    assert found.multiframe
    assert (found.plane, found.weighting, found.fat_suppressed) == ("sagittal", "PD", True)
    assert found.fat_suppression == "SpectrallySelectedSuppression FAT"
    assert found.slice_count == 18 and found.geometry_consistent
    assert found.pixel_spacing == [0.5, 0.5] and found.slice_thickness == 3.0


def test_enhanced_mr_missing_frame_is_found():
    found = features(vendor="philips", enhanced=True, skip=(4,))
    assert found.basis["geometry_consistent"].startswith("missing slice")


def test_acquisition_datetime_with_a_utc_offset():
    found = features(extra={"AcquisitionDateTime": "20260115103015.250000+0100"})
    assert found.acquired_at == "2026-01-15T10:30:15.250000"
    assert features(acquisition_time="101500").acquired_at == "2026-01-15T10:15:00"
