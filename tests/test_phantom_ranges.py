"""The phantom's widened ranges (issue 14): the defaults draw what they always drew, the wide
ranges keep each seed's side, tear and position, a knee flexed 45 degrees is still a whole
knee, and a custom tissue table renders like the sequence it copies."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from aiworker.phantom import anatomy, render
from aiworker.phantom.anatomy import LABEL_VALUES as LABEL
from aiworker.phantom.geometry import SliceGeometry

SPACING = 1.0  # coarse, to keep the tests quick


def test_the_default_ranges_draw_the_facts_they_drew_before_the_ranges_existed():
    # values of the generator before CaseRanges (commit 63616f9), seed 4 and 17
    four, seventeen = anatomy.make_case(4).facts(), anatomy.make_case(17).facts()
    assert (four["flexion_deg"], four["effusion_mm"], four["scale"]) == (7.244, 0.312, 0.899)
    assert four["centre"] == [67.054, -5.156, -4.357] and four["side"] == "L"
    assert (seventeen["flexion_deg"], seventeen["effusion_mm"]) == (4.297, 3.376)


def test_wide_ranges_keep_side_tear_and_position_and_widen_flexion_and_effusion():
    seeds = range(40)
    default = [anatomy.make_case(s) for s in seeds]
    wide = [anatomy.make_case(s, ranges=anatomy.WIDE_RANGES) for s in seeds]
    for a, b in zip(default, wide, strict=True):
        assert (a.side, a.acl_torn, a.centre, a.tear_at) == (b.side, b.acl_torn, b.centre,
                                                             b.tear_at)
    flexion = [c.flexion_deg for c in wide]
    assert max(flexion) > 35.0 and min(flexion) >= 0.0
    assert max(flexion) <= anatomy.MAX_FLEXION_DEG
    assert max(c.effusion_mm for c in wide) > 8.0
    assert max(c.flexion_deg for c in default) <= 12.0


def test_flexion_beyond_what_the_anatomy_allows_is_refused():
    with pytest.raises(ValueError, match="flexion"):
        anatomy.make_case(1, ranges=anatomy.CaseRanges(flexion_deg=(0.0, 60.0)))


def _parts(mask: np.ndarray) -> int:
    pieces, count = ndimage.label(mask)
    sizes = np.bincount(pieces.ravel())[1:]
    return int((sizes > 0.02 * sizes.sum()).sum())


def test_a_knee_flexed_45_degrees_keeps_every_structure_and_one_intact_acl():
    case = anatomy.make_case(6, acl="intact", side="R")
    straight = anatomy.build_volume(case, SPACING)
    flexed = anatomy.build_volume(anatomy.make_case(6, acl="intact", side="R", ranges=(
        anatomy.CaseRanges(flexion_deg=(45.0, 45.0)))), SPACING)
    assert flexed.case.flexion_deg == 45.0
    for name in ("femur", "tibia", "patella", "femoral_cartilage", "tibial_cartilage",
                 "medial_meniscus", "lateral_meniscus", "acl", "pcl"):
        ratio = (flexed.labels == LABEL[name]).sum() / (straight.labels == LABEL[name]).sum()
        assert 0.5 < ratio < 2.0, (name, ratio)
    assert _parts(flexed.labels == LABEL["acl"]) == 1
    # flexion turns the femur: its footprint of the ACL moves, the tibial one stays
    assert np.allclose(flexed.landmarks["acl_tibial"], straight.landmarks["acl_tibial"])
    moved = np.linalg.norm(flexed.landmarks["acl_femoral"] - straight.landmarks["acl_femoral"])
    assert moved > 5.0


def test_a_custom_table_renders_like_the_sequence_it_copies_and_must_hold_256_signals():
    volume = anatomy.build_volume(anatomy.make_case(3), SPACING)
    geometry = SliceGeometry.centred(volume.centre, (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), 96, 96,
                                     4, (150.0, 150.0), 3.0, 3.3)
    sequence = render.render_series(volume, geometry, "T1", 30.0, np.random.default_rng(2))
    copied = render.render_series(volume, geometry, "PD_FS", 30.0, np.random.default_rng(2),
                                  table=render.tissue_signal("T1"))
    assert np.array_equal(sequence, copied)
    inverted = render.render_series(volume, geometry, "PD_FS", 30.0, np.random.default_rng(2),
                                    table=1.0 - render.tissue_signal("T1"))
    labels = render.label_series(volume, geometry)
    femur = labels == LABEL["femur"]
    assert sequence[femur].mean() > 2 * inverted[femur].mean()  # marrow bright, then dark
    with pytest.raises(ValueError, match="256"):
        render.render_series(volume, geometry, "T1", 30.0, np.random.default_rng(2),
                             table=np.ones(10, np.float32))
