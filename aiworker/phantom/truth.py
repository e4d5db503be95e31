"""The ground truth written beside each synthetic study.

* ``labels.nii.gz``: the label of every pixel of the sagittal PD FS series (the series the
  bundled model reads), as ``render.label_series`` computes it, in that series' own
  geometry. Voxel (i, j, k) is column i, row j of slice k (instance k + 1); the image's
  origin, spacing and direction are set so that SimpleITK's physical point of a voxel is the
  DICOM pixel centre in patient coordinates (LPS, mm): origin = ImagePositionPatient of the
  first slice, spacing = (column spacing, row spacing, SpacingBetweenSlices), direction
  columns = row direction, column direction, slice normal.
* ``labels.json``: label value -> structure name.
* ``facts.json``: the case (``anatomy.KneeCase.facts()``: ACL torn or not, side, ...), the
  scanner and header conventions used, and every series: UID, number, role, sequence,
  plane, fat suppression, descriptions, re-scan, which one the labels belong to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from aiworker.phantom import anatomy, render
from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.vendors import LOCALIZER

if TYPE_CHECKING:
    from aiworker.phantom.study import WrittenSeries, WrittenStudy

TRUTH_ROLE = "sag_pd_fs"
FAT_SUPPRESSED = ("PD_FS", "T2_FS", "STIR")


@dataclass(frozen=True)
class TruthFiles:
    """Paths of one case's ground-truth files."""

    labels: Path
    label_table: Path
    facts: Path


def truth_series(study: WrittenStudy) -> WrittenSeries:
    """The series the labels describe: the first sagittal PD FS, else the first series that
    is not the localizer."""
    candidates = [s for s in study.series if s.plan.kind != LOCALIZER and not s.plan.derived]
    if not candidates:
        raise ValueError("a study of localizers only has no series to label")
    return next((s for s in candidates if s.plan.role == TRUTH_ROLE), candidates[0])


def label_image(labels: np.ndarray, geometry: SliceGeometry) -> sitk.Image:
    """``labels`` (slices, rows, columns) as a uint8 SimpleITK image in ``geometry``."""
    return series_image(labels.astype(np.uint8, copy=False), geometry)


def series_image(pixels: np.ndarray, geometry: SliceGeometry) -> sitk.Image:
    """``pixels`` (slices, rows, columns) as a SimpleITK image in ``geometry``, with the
    geometry a DICOM reader derives from the series' headers."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(pixels))
    image.SetOrigin([float(v) for v in geometry.position(0)])
    image.SetSpacing([geometry.column_spacing, geometry.row_spacing,
                      geometry.spacing_between_slices])
    direction = np.column_stack([geometry.row_dir, geometry.col_dir, geometry.normal])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def write_truth(folder: Path, study: WrittenStudy, volume: Any) -> TruthFiles:
    """Write the three ground-truth files of ``study`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = truth_series(study)
    [geometry] = target.stacks
    files = TruthFiles(folder / "labels.nii.gz", folder / "labels.json", folder / "facts.json")
    sitk.WriteImage(label_image(render.label_series(volume, geometry), geometry),
                    str(files.labels), useCompression=True)
    table = {str(value): name for value, name in sorted(anatomy.LABELS.items())}
    files.label_table.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    facts = study_facts(study, target)
    files.facts.write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    return files


def study_facts(study: WrittenStudy, target: WrittenSeries) -> dict[str, Any]:
    """The JSON-serialisable facts of a written study."""
    plan, options = study.plan, study.options
    first_number = {s.plan.role: s.number for s in reversed(study.series)}
    return {
        "seed": options.seed,
        "case": study.case.facts(),
        "study_uid": study.study_uid,
        "vendor": plan.vendor.key,
        "manufacturer": plan.scanner.manufacturer,
        "model": plan.scanner.model,
        "field_strength": plan.scanner.field_strength,
        "descriptions": plan.descriptions,
        "transfer_syntax": options.transfer_syntax,
        "enhanced": options.enhanced,
        "ground_truth": {
            "labels": "labels.nii.gz",
            "label_table": "labels.json",
            "series_uid": target.uid,
            "series_number": target.number,
        },
        "series": [_series_facts(s, study.root, first_number) for s in study.series],
    }


def _series_facts(series: WrittenSeries, root: Path, first_number: dict[str, int]
                  ) -> dict[str, Any]:
    plan = series.plan
    return {
        "series_uid": series.uid,
        "series_number": series.number,
        "role": plan.role,
        "sequence": plan.kind,
        "plane": plan.plane,
        "fat_suppressed": plan.kind in FAT_SUPPRESSED,
        "series_description": series.description,
        "protocol_name": series.protocol_name,
        "rescan_of": first_number[plan.rescan_of] if plan.rescan_of else None,
        "derived": plan.derived,
        "oblique_degrees": list(plan.rotation),
        "rows": plan.rows,
        "columns": plan.columns,
        "images": plan.images,
        "folder": str(series.files[0].parent.relative_to(root)),
    }
