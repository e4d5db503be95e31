"""Training and evaluation cases for knee-demo, drawn by the phantom generator.

A case is the sagittal PD FS series of one generated study (exactly what the phantom's
``write_study`` would write, rendered in memory without DICOM files) with its ground-truth
labels, and whether its ACL is torn. Seeds pick cases; the seed ranges below keep training,
classifier fitting and evaluation apart (the model card's metrics come from seeds never used
in training).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from aiworker.infer.manifest_sections import Input
from aiworker.infer.preprocess import model_input, resample
from aiworker.models.knee_demo.labels import STRUCTURES
from aiworker.phantom import anatomy, render
from aiworker.phantom.study import StudyOptions, study_plan
from aiworker.phantom.truth import TRUTH_ROLE, series_image

TRAIN_SEEDS = range(100_000, 110_000)  # segmentation training
FIT_SEEDS = range(200_000, 210_000)  # ACL-tear classifier fitting
HELD_OUT_SEEDS = range(900_000, 910_000)  # evaluation only: never in training
MAX_OBLIQUE = 20.0

MODEL_LABEL = np.array([value if value in STRUCTURES else 0 for value in range(256)],
                        dtype=np.uint8)


@dataclass
class Case:
    """One sagittal PD FS series with its truth, in the series' own geometry."""

    seed: int
    image: sitk.Image  # float32 pixel values as a DICOM reader gets them
    labels: sitk.Image  # uint8, knee-demo label values (other tissues are 0)
    torn: bool


@dataclass
class Sample:
    """A case as the network sees it: (1, x, y, z) input and (x, y, z) labels."""

    seed: int
    array: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]
    torn: bool


def make_case(seed: int, max_oblique: float = MAX_OBLIQUE) -> Case:
    """Render the sagittal PD FS of the study ``seed`` and its labels."""
    options = StudyOptions(seed=seed, max_oblique=max_oblique, derived=False)
    plan = study_plan(options)
    series = next(s for s in plan.series if s.role == TRUTH_ROLE and not s.derived)
    case = anatomy.make_case(seed, acl=options.acl, side=options.side)
    volume = anatomy.build_volume(case)
    [geometry] = series.stacks(volume.centre)
    rng = np.random.default_rng([seed, series.order])
    pixels = render.render_series(volume, geometry, series.kind, series.snr, rng)
    labels = MODEL_LABEL[render.label_series(volume, geometry)]
    return Case(seed, series_image(pixels.astype(np.float32), geometry),
                series_image(labels, geometry), case.acl_torn)


def make_sample(seed: int, spec: Input, max_oblique: float = MAX_OBLIQUE) -> Sample:
    """The case ``seed`` preprocessed as the manifest's ``input`` says."""
    case = make_case(seed, max_oblique)
    prepared = model_input([case.image], spec)
    labels = resample(case.labels, prepared.reference, sitk.sitkNearestNeighbor)
    return Sample(seed, prepared.array, sitk.GetArrayFromImage(labels).transpose(2, 1, 0).copy(),
                  prepared.reference.GetSpacing(), case.torn)
