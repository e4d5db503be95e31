"""The synthetic knee's anatomy and its MR rendering: determinism, the ACL states, tissue
contrast, sides, noise level and the pixel format."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage

from aiworker.phantom import anatomy, render
from aiworker.phantom.anatomy import LABEL_VALUES as LABEL
from aiworker.phantom.geometry import SliceGeometry

SPACING = 0.8  # coarser than the default, to keep the tests quick
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def sagittal_through_acl(volume: anatomy.KneeVolume, slices: int = 3,
                         size: int = 192) -> SliceGeometry:
    """A 150 mm sagittal stack centred between the ACL's footprints."""
    middle = (volume.landmarks["acl_tibial"] + volume.landmarks["acl_femoral"]) / 2
    return SliceGeometry.centred(middle, *SAGITTAL, size, size, slices, (150.0, 150.0), 3.0,
                                 3.3)


@pytest.fixture(scope="module")
def intact() -> anatomy.KneeVolume:
    return anatomy.build_volume(anatomy.make_case(4, acl="intact", side="R"), SPACING)


@pytest.fixture(scope="module")
def torn() -> anatomy.KneeVolume:
    return anatomy.build_volume(anatomy.make_case(4, acl="torn", side="R"), SPACING)


def test_a_seed_gives_the_same_volume_and_pixels_and_another_seed_differs(intact):
    again = anatomy.build_volume(anatomy.make_case(4, acl="intact", side="R"), SPACING)
    assert np.array_equal(again.tissue, intact.tissue)
    assert np.array_equal(again.origin, intact.origin)
    geometry = sagittal_through_acl(intact)
    first = render.render_series(intact, geometry, "PD_FS", 25.0, np.random.default_rng(9))
    second = render.render_series(again, geometry, "PD_FS", 25.0, np.random.default_rng(9))
    assert np.array_equal(first, second)

    other = anatomy.build_volume(anatomy.make_case(5, acl="intact", side="R"), SPACING)
    assert anatomy.make_case(5).facts() != anatomy.make_case(4).facts()
    assert (other.tissue.shape != intact.tissue.shape
            or not np.array_equal(other.tissue, intact.tissue))
    third = render.render_series(intact, geometry, "PD_FS", 25.0, np.random.default_rng(10))
    assert not np.array_equal(first, third)


def test_random_acl_is_balanced_over_seeds_and_forcing_keeps_the_anatomy():
    torn = [anatomy.make_case(seed).acl_torn for seed in range(40)]
    assert sum(torn) == 20
    assert 0 < sum(torn[0::2]) < 20  # not simply the parity of the seed
    assert anatomy.make_case(6, acl="torn").acl_torn
    assert not anatomy.make_case(6, acl="intact").acl_torn
    forced = anatomy.make_case(6, acl="torn", side="L").facts()
    drawn = anatomy.make_case(6).facts()
    assert forced["side"] == "L"
    assert forced["scale"] == drawn["scale"] and forced["flexion_deg"] == drawn["flexion_deg"]
    with pytest.raises(ValueError, match="acl"):
        anatomy.make_case(1, acl="partial")


def test_facts_are_json_and_name_the_case():
    facts = json.loads(json.dumps(anatomy.make_case(7, acl="torn").facts()))
    assert facts["acl_torn"] is True and facts["side"] in ("R", "L")
    assert {"seed", "bone_bruise", "scale", "flexion_deg", "tear_at", "gap_mm"} <= set(facts)
    assert "gap_mm" not in anatomy.make_case(7, acl="intact").facts()


def test_sagittal_labels_through_the_notch_show_an_intact_acl(intact):
    labels = render.label_series(intact, sagittal_through_acl(intact))
    assert (labels == LABEL["acl"]).sum() > 50
    for structure in ("femur", "tibia", "patella", "pcl", "femoral_cartilage",
                      "tibial_cartilage", "hoffa_fat_pad", "patellar_tendon"):
        assert (labels == LABEL[structure]).any(), structure


def test_an_intact_acl_is_one_band_and_a_torn_one_two_stumps_with_fluid_between(intact, torn):
    def components(volume):
        """Pieces of ACL holding over 2 % of its voxels (voxelisation leaves crumbs)."""
        pieces, count = ndimage.label(volume.labels == LABEL["acl"])
        sizes = np.bincount(pieces.ravel())[1:]
        return int((sizes > 0.02 * sizes.sum()).sum())

    assert components(intact) == 1
    assert components(torn) == 2

    def labels_along_acl(volume):
        tibial, femoral = volume.landmarks["acl_tibial"], volume.landmarks["acl_femoral"]
        t = np.linspace(0.1, 0.9, 200)[:, None]
        return volume.label_at(tibial + t * (femoral - tibial))

    assert set(labels_along_acl(intact)) == {LABEL["acl"]}
    along_torn = labels_along_acl(torn)
    acl_at = np.flatnonzero(along_torn == LABEL["acl"])
    assert acl_at.size and acl_at[0] < 40 and acl_at[-1] > 160  # both stumps reach the axis
    assert torn.label_at(torn.landmarks["acl_tear"]) == LABEL["joint_fluid"]


def test_the_tear_is_bright_on_sagittal_pd_fs(intact, torn):
    def mean_around_tear(volume):
        geometry = sagittal_through_acl(volume, slices=1, size=256)
        pixels = render.render_series(volume, geometry, "PD_FS", 25.0,
                                      np.random.default_rng(1))[0].astype(float)
        row, column = _pixel_of(geometry, torn.landmarks["acl_tear"])
        return pixels[row - 3:row + 4, column - 3:column + 4].mean()

    assert mean_around_tear(torn) > 2.0 * mean_around_tear(intact)


def test_fluid_and_fat_contrast_follows_the_sequence(intact):
    geometry = sagittal_through_acl(intact)
    labels = render.label_series(intact, geometry)
    means = {}
    for sequence in ("PD_FS", "STIR", "T1", "PD"):
        pixels = render.render_series(intact, geometry, sequence, 30.0,
                                      np.random.default_rng(2)).astype(float)
        means[sequence] = {name: pixels[labels == LABEL[name]].mean()
                           for name in ("joint_fluid", "subcutaneous_fat", "femur", "acl")}
    for sequence in ("PD_FS", "STIR"):
        assert means[sequence]["joint_fluid"] > 2.0 * means[sequence]["subcutaneous_fat"]
        assert means[sequence]["joint_fluid"] > 2.0 * means[sequence]["femur"]
    assert means["T1"]["subcutaneous_fat"] > 2.0 * means["T1"]["joint_fluid"]
    assert means["T1"]["femur"] > 2.0 * means["PD_FS"]["femur"]  # fatty marrow
    for sequence in means:
        assert means[sequence]["acl"] < 0.5 * max(means[sequence].values())


def test_bone_bruise_is_bright_on_stir():
    case = next(case for case in map(lambda s: anatomy.make_case(s, acl="torn"), range(50))
                if case.bone_bruise)
    volume = anatomy.build_volume(case, 1.0)
    assert (volume.labels == LABEL["bone_marrow_edema"]).any()
    geometry = SliceGeometry.centred(volume.centre, *CORONAL, 160, 160, 12, (150.0, 150.0), 3.0,
                                     3.5)
    labels = render.label_series(volume, geometry)
    pixels = render.render_series(volume, geometry, "STIR", 30.0, np.random.default_rng(3))
    assert (pixels[labels == LABEL["bone_marrow_edema"]].mean()
            > 3.0 * pixels[labels == LABEL["femur"]].mean())


@pytest.mark.parametrize("side", ["R", "L"])
def test_the_lateral_side_is_patient_right_for_a_right_knee(side):
    volume = anatomy.build_volume(anatomy.make_case(8, side=side), 1.0)

    def mean_x(name):
        k, j, i = np.nonzero(volume.labels == LABEL[name])
        return (volume.origin + volume.spacing * np.column_stack([i, j, k]) @ volume.axes.T)[
            :, 0].mean()

    lateral = -1.0 if side == "R" else 1.0
    assert (mean_x("lateral_meniscus") - mean_x("medial_meniscus")) * lateral > 20.0
    assert (mean_x("fibula") - volume.centre[0]) * lateral > 15.0


def test_the_knee_fills_a_typical_field_of_view(intact):
    geometry = SliceGeometry.centred(intact.centre, *SAGITTAL, 160, 160, 1, (150.0, 150.0),
                                     3.0, 3.0)
    labels = render.label_series(intact, geometry)[0]
    assert (labels[:32] == LABEL["femur"]).any()  # shaft in the top fifth
    assert (labels[-32:] == LABEL["tibia"]).any()  # shaft in the bottom fifth
    assert 90.0 < intact.extent_mm[0] < 160.0 and 90.0 < intact.extent_mm[1] < 160.0
    assert intact.label_at(intact.centre + (500.0, 0.0, 0.0)) == 0  # air beside the leg
    up = intact.axes[:, 2]  # the leg goes on beyond the grid's top
    assert intact.label_at(intact.centre + 500.0 * up) == intact.label_at(
        intact.centre + 100.0 * up) != 0


def test_background_noise_matches_the_snr(intact):
    geometry = SliceGeometry.centred(intact.centre, *AXIAL, 256, 256, 2, (260.0, 260.0), 4.0,
                                     5.0)
    snr = 20.0
    pixels = render.render_series(intact, geometry, "PD", snr, np.random.default_rng(4))
    air = ndimage.binary_erosion(render.label_series(intact, geometry) == 0,
                                 iterations=6, border_value=1)
    sigma = render.SIGNAL_SCALE / snr
    assert air.sum() > 20000
    assert pixels[air].std() == pytest.approx(np.sqrt(2.0 - np.pi / 2.0) * sigma, rel=0.1)
    assert pixels[air].mean() == pytest.approx(np.sqrt(np.pi / 2.0) * sigma, rel=0.1)


def test_pixels_and_labels_have_the_geometry_shape_and_dicom_range(torn):
    rotated = (0.0, np.cos(0.3), -np.sin(0.3)), (0.0, -np.sin(0.3), -np.cos(0.3))
    geometry = SliceGeometry.centred(torn.centre, *rotated, 200, 240, 5, (150.0, 180.0), 3.0,
                                     4.0)
    pixels = render.render_series(torn, geometry, "T2_FS", 5.0, np.random.default_rng(5))
    labels = render.label_series(torn, geometry)
    assert pixels.shape == labels.shape == (5, 200, 240)
    assert pixels.dtype == np.uint16 and labels.dtype == np.uint8
    assert pixels.max() <= render.MAX_PIXEL and pixels.max() > 1000
    assert set(np.unique(labels)) <= set(anatomy.LABELS)
    with pytest.raises(ValueError, match="sequence"):
        render.render_series(torn, geometry, "FLAIR", 20.0, np.random.default_rng(5))


def test_time_to_draw_a_knee_and_render_a_six_series_study():
    started = time.perf_counter()
    volume = anatomy.build_volume(anatomy.make_case(11))
    built = time.perf_counter()
    rng = np.random.default_rng(0)
    plan = [(SAGITTAL, "PD_FS", 512, 30), (SAGITTAL, "T1", 448, 30), (CORONAL, "PD_FS", 384, 28),
            (CORONAL, "STIR", 384, 28), (AXIAL, "T2_FS", 512, 36)]
    for (row, column), sequence, size, slices in plan:
        geometry = SliceGeometry.centred(volume.centre, row, column, size, size, slices,
                                         (150.0, 150.0), 3.0, 3.3)
        render.render_series(volume, geometry, sequence, 25.0, rng)
    for row, column in (SAGITTAL, CORONAL, AXIAL):  # three-plane localizer
        geometry = SliceGeometry.centred(volume.centre, row, column, 256, 256, 3,
                                         (250.0, 250.0), 8.0, 12.0)
        render.render_series(volume, geometry, "PD", 15.0, rng)
    done = time.perf_counter()
    print(f"\nknee drawn in {built - started:.2f} s ({volume.tissue.size / 1e6:.1f} M voxels"
          f" of {volume.spacing} mm); 6 series rendered in {done - built:.2f} s")


def _pixel_of(geometry: SliceGeometry, point: np.ndarray) -> tuple[int, int]:
    """(row, column) of the pixel nearest ``point``'s projection on slice 0."""
    offset = np.asarray(point) - geometry.position(0)
    column = offset @ np.asarray(geometry.row_dir) / geometry.column_spacing
    row = offset @ np.asarray(geometry.col_dir) / geometry.row_spacing
    return int(round(row)), int(round(column))
