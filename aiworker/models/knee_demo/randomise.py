"""Domain-randomised training samples for knee-demo, after SynthSeg (Billot et al., Medical
Image Analysis 2023): images synthesised from the phantom's label maps with every appearance
parameter drawn at random, so the network learns the knee's shapes, not one scanner's
contrast, resolution or coverage.

One anatomy (:func:`aiworker.phantom.anatomy.make_case` with the widened
:data:`~aiworker.phantom.anatomy.WIDE_RANGES`: flexion 0-45 degrees, effusion up to 12 mm,
knees 0.8-1.2 times the average size) is drawn on the tissue grid once and imaged several
times, each time with

* a contrast: the real PD FS tissue table (a share :attr:`Randomisation.real_share` of the
  samples) or a random one, every tissue of every label its own mean signal drawn
  uniformly (a Gaussian mixture per label once the Rician noise is added);
* a random sagittal prescription: obliquity up to +-30 degrees, slice thickness 1.5-5 mm,
  slice spacing up to 5 mm, 12-44 slices placed off the knee's centre (partial coverage),
  in-plane pixels 0.3-1.5 mm, and a random SNR down to 3 (the renderer's own bias field
  and Rician noise);
* once preprocessed as the manifest says, an elastic warp (a SimpleITK B-spline transform,
  image and labels together), MONAI's ``RandBiasFieldd`` and ``RandAdjustContrastd``
  (gamma), then the manifest's normalization again, as the engine would apply it.

Everything is drawn from the seed, so a seed gives the same samples on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from aiworker.infer.manifest_sections import Input
from aiworker.infer.preprocess import model_input, normalize, resample
from aiworker.models.knee_demo.data import MODEL_LABEL, Sample
from aiworker.phantom import anatomy, render
from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.protocol import oblique
from aiworker.phantom.truth import series_image

# every tissue value the anatomy paints: labels, bone cortices, a torn ACL's stump
TISSUES = (*anatomy.LABELS, *anatomy.CORTEX.values(), anatomy.ACL_STUMP)


@dataclass(frozen=True)
class Randomisation:
    """The ranges one sample's appearance and geometry are drawn from."""

    real_share: float = 0.35  # share of samples with the real PD FS contrast
    snr: tuple[float, float] = (3.0, 40.0)
    thickness_mm: tuple[float, float] = (1.5, 5.0)
    max_spacing_mm: float = 5.0
    slices: tuple[int, int] = (12, 44)
    off_centre_mm: float = 25.0  # the stack's centre moves up to this far along its normal
    in_plane_shift_mm: float = 15.0
    pixel_mm: tuple[float, float] = (0.3, 1.5)
    field_of_view_mm: tuple[float, float] = (130.0, 170.0)
    oblique_deg: float = 30.0
    elastic: float = 0.5  # probability of an elastic deformation
    bias: float = 0.5  # probability of MONAI's extra bias field
    gamma: float = 0.5  # probability of a gamma change
    ranges: anatomy.CaseRanges = anatomy.WIDE_RANGES


TRAINING = Randomisation()
REAL_PD_FS = Randomisation(real_share=1.0, elastic=0.0, bias=0.0, gamma=0.0)


def random_table(rng: np.random.Generator) -> np.ndarray:
    """A contrast no scanner makes: each tissue's relative signal uniform in 0..1 (air
    darker, 0..0.15), the brightest scaled to 1 as the renderer's SNR expects."""
    table = np.zeros(256, np.float32)
    table[list(TISSUES)] = rng.uniform(0.0, 1.0, len(TISSUES))
    table[0] = rng.uniform(0.0, 0.15)
    return table / table.max()


def random_geometry(centre: np.ndarray, rng: np.random.Generator,
                    settings: Randomisation) -> SliceGeometry:
    """A sagittal stack with random obliquity, thickness, spacing, slice count, coverage
    and pixel size, about ``centre`` (patient mm) moved off it."""
    tilt = settings.oblique_deg
    row_dir, col_dir = oblique("sagittal", (float(rng.uniform(-tilt, tilt)),
                                            float(rng.uniform(-tilt / 2, tilt / 2))))
    thickness = float(rng.uniform(*settings.thickness_mm))
    spacing = float(min(thickness * rng.uniform(1.0, 1.25), settings.max_spacing_mm))
    slices = int(rng.integers(settings.slices[0], settings.slices[1] + 1))
    fov = float(rng.uniform(*settings.field_of_view_mm))
    matrix = int(round(fov / rng.uniform(*settings.pixel_mm)))
    normal = np.cross(row_dir, col_dir)
    shift = (normal * rng.uniform(-1.0, 1.0) * settings.off_centre_mm
             + (row_dir * rng.uniform(-1, 1) + col_dir * rng.uniform(-1, 1))
             * settings.in_plane_shift_mm)
    return SliceGeometry.centred(np.asarray(centre) + shift, row_dir, col_dir, matrix, matrix,
                                 slices, (fov, fov), thickness, spacing)


def random_samples(seed: int, spec: Input, count: int = 1,
                   settings: Randomisation = TRAINING) -> list[Sample]:
    """``count`` randomised images of the anatomy ``seed``, preprocessed as ``spec`` says."""
    rng = np.random.default_rng([seed, 0x53594E])
    case = anatomy.make_case(seed, ranges=settings.ranges)
    volume = anatomy.build_volume(case)
    return [_sample(seed, volume, spec, settings, rng) for _ in range(count)]


def _sample(seed: int, volume: anatomy.KneeVolume, spec: Input, settings: Randomisation,
            rng: np.random.Generator) -> Sample:
    geometry = random_geometry(volume.centre, rng, settings)
    table = None if rng.random() < settings.real_share else random_table(rng)
    snr = float(math.exp(rng.uniform(*np.log(settings.snr))))
    pixels = render.render_series(volume, geometry, "PD_FS", snr, rng, table=table)
    labels = MODEL_LABEL[render.label_series(volume, geometry)]
    prepared = model_input([series_image(pixels.astype(np.float32), geometry)], spec)
    label_image = resample(series_image(labels, geometry), prepared.reference,
                           sitk.sitkNearestNeighbor)
    label_array = sitk.GetArrayFromImage(label_image).transpose(2, 1, 0).copy()
    array, label_array = augment(prepared.array, label_array, prepared.reference, spec,
                                 settings, rng)
    return Sample(seed, array.astype(np.float32), label_array, prepared.reference.GetSpacing(),
                  volume.case.acl_torn)


def augment(array: np.ndarray, labels: np.ndarray, reference: sitk.Image, spec: Input,
            settings: Randomisation, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """An elastic deformation (image and labels alike), MONAI's bias field and gamma on a
    preprocessed (1, x, y, z) sample, then the manifest's normalization again."""
    from monai.transforms import Compose, RandAdjustContrastd, RandBiasFieldd

    if rng.random() < settings.elastic:
        array, labels = elastic(array, labels, reference, rng)
    transforms = Compose([
        RandBiasFieldd(keys=["image"], coeff_range=(0.1, 0.4), prob=settings.bias),
        RandAdjustContrastd(keys=["image"], gamma=(0.6, 1.7), prob=settings.gamma),
    ])
    transforms.set_random_state(seed=int(rng.integers(2**31)))
    image = np.asarray(transforms({"image": array})["image"], dtype=np.float32)
    return normalize(np.clip(image, 0.0, None), spec.normalization), labels


def elastic(array: np.ndarray, labels: np.ndarray, reference: sitk.Image,
            rng: np.random.Generator, mesh: tuple[int, int, int] = (4, 4, 2),
            sd_mm: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random warp of a (1, x, y, z) sample on ``reference``'s grid: a SimpleITK
    B-spline transform over a coarse ``mesh`` of control points, each moved ``sd_mm``
    (normal), applied to the image (linear) and the labels (nearest neighbour). A dense
    Gaussian field (MONAI's Rand3DElastic) costs ~4 s a sample on this grid; this ~0.1 s."""
    transform = sitk.BSplineTransformInitializer(reference, list(mesh))
    count = len(transform.GetParameters())
    transform.SetParameters(rng.normal(0.0, sd_mm, count).tolist())
    warped = []
    for values, method in ((array[0], sitk.sitkLinear), (labels, sitk.sitkNearestNeighbor)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(values.transpose(2, 1, 0)))
        image.CopyInformation(reference)
        out = sitk.Resample(image, reference, transform, method, 0.0)
        warped.append(sitk.GetArrayFromImage(out).transpose(2, 1, 0))
    return warped[0][None].astype(np.float32), warped[1].astype(np.uint8)
