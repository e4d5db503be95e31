"""The conditions knee-demo is evaluated under beyond its reference (issue 14): each one a
way to draw the sagittal series of a phantom study that the training-like default does not.

A condition changes one thing of the study the generator would write for a seed (its
sagittal PD FS, rendered in memory exactly as :func:`~aiworker.phantom.study.write_study`
renders it) and keeps the rest:

* ``snr4-6``: the PD FS at SNR 4-6 (the protocol's 18-30);
* ``slices16``: 16 slices at the drawn spacing, centred: partial coverage of the knee;
* ``flexion30-40``: the knee flexed 30-40 degrees (the generator's default 0-12);
* ``oblique25-28``: the sagittal prescription tilted 25-28 degrees (the default up to 15);
* ``t1``, ``t2fs``, ``pd``, ``stir``: the same prescription acquired as T1, T2 FS, PD without
  fat suppression or STIR (the protocol's SNR for that sequence), presented as the input.

Each condition has its own block of held-out seeds (:data:`~.data.HELD_OUT_SEEDS`, never in
training, fitting or the gate's benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk

from aiworker.models.knee_demo.data import HELD_OUT_SEEDS, MODEL_LABEL
from aiworker.phantom import anatomy, render
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, study_plan
from aiworker.phantom.truth import TRUTH_ROLE, series_image

CONDITIONS = ("snr4-6", "slices16", "flexion30-40", "oblique25-28", "t1", "t2fs", "pd", "stir")
CONTRASTS = {"t1": "T1", "t2fs": "T2_FS", "pd": "PD", "stir": "STIR"}
CONTRAST_SNR = {"T1": (30.0, 45.0), "T2_FS": (15.0, 25.0), "PD": (30.0, 45.0),
                "STIR": (12.0, 20.0)}


@dataclass
class Rendered:
    """One evaluation case: the series as a reader would load it, its truth on the same
    slices (knee-demo label values), and whether the ACL is torn."""

    seed: int
    image: sitk.Image
    labels: np.ndarray  # (slices, rows, columns)
    torn: bool


def condition_seeds(condition: str, cases: int) -> list[int]:
    """``cases`` consecutive held-out seeds of ``condition`` (balanced torn / intact for an
    even count), a block of 1000 per condition after the reference's first 1000."""
    block = 1 + CONDITIONS.index(condition)
    return [HELD_OUT_SEEDS[0] + 1000 * block + i for i in range(cases)]


def render_case(seed: int, condition: str) -> Rendered:
    """The sagittal series of study ``seed`` under ``condition``."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}")
    overrides = Overrides(slices=16) if condition == "slices16" else Overrides()
    options = StudyOptions(seed=seed, derived=False, overrides=overrides)
    plan = next(s for s in study_plan(options).series if s.role == TRUTH_ROLE)
    rng = np.random.default_rng([seed, plan.order, 0xC0DE])
    case = anatomy.make_case(seed)
    if condition == "flexion30-40":
        case = replace(case, flexion_deg=float(rng.uniform(30.0, 40.0)))
    if condition == "oblique25-28":
        sign = 1.0 if rng.random() < 0.5 else -1.0
        plan = replace(plan, rotation=(sign * float(rng.uniform(25.0, 28.0)), plan.rotation[1]))
    sequence = CONTRASTS.get(condition, plan.kind)
    snr = (float(rng.uniform(4.0, 6.0)) if condition == "snr4-6"
           else float(rng.uniform(*CONTRAST_SNR[sequence])) if condition in CONTRASTS
           else plan.snr)
    volume = anatomy.build_volume(case)
    [geometry] = plan.stacks(volume.centre)
    pixels = render.render_series(volume, geometry, sequence, snr, rng)
    labels = MODEL_LABEL[render.label_series(volume, geometry)]
    return Rendered(seed, series_image(pixels.astype(np.float32), geometry), labels,
                    case.acl_torn)
