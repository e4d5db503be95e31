"""The preview of a job: one picture of the segmentation for the dashboard, and the same
picture as a DICOM Secondary Capture for viewers that cannot show a Segmentation.

The picture is the most informative source slice (the one through the most ACL, see
:func:`preview_slice`) in grey, windowed to its 1st-99th percentile, with each label of the
model's manifest on it in the label's colour (:data:`OPACITY` blend and a one-pixel outline),
scaled so that a millimetre is as long across as down (:func:`display_size`), with a legend
of the labels on that slice beside it (:func:`legend_entries`) and a title line above saying
what it is. It carries no patient data; the Secondary Capture carries the job's cleaned
patient and study (:class:`~aiworker.results.patient.PatientStudy`, in UTF-8) like any
other result of the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ImplicitVRLittleEndian, SecondaryCaptureImageStorage

import aiworker
from aiworker.infer.manifest import Manifest
from aiworker.infer.manifest_sections import Label
from aiworker.infer.volume import LoadedSeries
from aiworker.results.patient import PatientStudy, read_patient_study, sanitized_source
from aiworker.results.uids import result_uid

TITLE = "AI preview - not for diagnostic use"
SERIES_DESCRIPTION = "AI knee preview (not for diagnostic use)"
SERIES_NUMBER_BASE = 9200
SOP_CLASS = SecondaryCaptureImageStorage
TRANSFER_SYNTAX = ImplicitVRLittleEndian  # highdicom's default for an SC made from a source
MANUFACTURER = "aiworker"
OPACITY = 0.45
DISPLAY_SIZE = 512  # pixels along the longer side of the image part
TITLE_HEIGHT = 28
LEGEND_WIDTH = 200
ROW_HEIGHT = 22
MARGIN = 8
SWATCH = 14
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +/- x, y, z of the patient (LPS)


class PreviewError(Exception):
    """The labels or the manifest cannot make a preview; the message says why."""


def preview_slice(labels: np.ndarray, acl_value: int | None) -> int:
    """The slice of ``labels`` (``(slices, rows, columns)``) with the most ``acl_value``
    voxels; without any, the one with the most labelled voxels; without any, the middle."""
    for mask in ((labels == acl_value) if acl_value is not None else None, labels > 0):
        if mask is not None and mask.any():
            return int(np.argmax(mask.sum(axis=(1, 2))))
    return labels.shape[0] // 2


def acl_label(manifest: Manifest) -> int | None:
    """The manifest's label value for the ACL (SCT 895007, else a label named ACL)."""
    for label in _labels(manifest):
        if label.type.value == "895007" or label.name.upper() == "ACL":
            return label.value
    return None


def legend_entries(labels_slice: np.ndarray, manifest: Manifest) -> list[Label]:
    """The manifest's labels present on one slice of labels, in manifest order."""
    present = set(np.unique(labels_slice).tolist())
    return [label for label in _labels(manifest) if label.value in present]


def display_size(loaded: LoadedSeries) -> tuple[int, int]:
    """(width, height) of the image part of the preview: the slice scaled so that its
    longer physical side is :data:`DISPLAY_SIZE` pixels and its pixels are square."""
    columns, rows = loaded.image.GetSize()[:2]
    column_spacing, row_spacing = loaded.image.GetSpacing()[:2]
    width_mm, height_mm = columns * column_spacing, rows * row_spacing
    scale = DISPLAY_SIZE / max(width_mm, height_mm)
    return max(1, round(width_mm * scale)), max(1, round(height_mm * scale))


def render_preview(loaded: LoadedSeries, labels: np.ndarray, manifest: Manifest, *,
                   slice_index: int | None = None) -> Image.Image:
    """The RGB preview of ``labels`` (``(slices, rows, columns)`` on ``loaded``'s slices) on
    slice ``slice_index`` (default :func:`preview_slice` of the ACL)."""
    if labels.shape != loaded.array().shape:
        raise PreviewError(f"labels have shape {labels.shape}, the series "
                           f"{loaded.array().shape}")
    k = preview_slice(labels, acl_label(manifest)) if slice_index is None else slice_index
    if not 0 <= k < labels.shape[0]:
        raise PreviewError(f"slice {k} is not in the series' {labels.shape[0]} slices")
    size = display_size(loaded)
    grey = _grey(loaded.array()[k]).resize(size, Image.Resampling.BILINEAR)
    label_plane = np.asarray(Image.fromarray(labels[k].astype(np.uint8))
                             .resize(size, Image.Resampling.NEAREST))
    entries = legend_entries(labels[k], manifest)
    picture = _overlay(np.asarray(grey), label_plane, entries)
    return _compose(picture, entries, f"{TITLE}   slice {k + 1}/{labels.shape[0]}")


def slice_source(source_datasets: Sequence[Dataset], loaded: LoadedSeries,
                 k: int) -> tuple[Dataset, int | None]:
    """The dataset slice ``k`` of ``loaded`` came from and its 1-based frame there (None for
    a single-frame instance): what :func:`build_secondary_capture` references."""
    uid = loaded.sop_instance_uids[k]
    source = next((ds for ds in source_datasets if ds.SOPInstanceUID == uid), None)
    if source is None:
        raise PreviewError(f"no source dataset for slice {k}")
    return source, None if loaded.frame_numbers is None else loaded.frame_numbers[k]


def write_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as a PNG file at ``path`` (its folder created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def build_secondary_capture(source_dataset: Dataset, image: Image.Image, model_id: str,
                            series_uid: str, *, series_number: int | None = None,
                            source_frame: int | None = None,
                            patient: PatientStudy | None = None) -> Dataset:
    """The preview ``image`` as an RGB Secondary Capture in the study of ``source_dataset``
    (the instance of the previewed slice; ``source_frame`` its 1-based frame if it is
    multi-frame), made by ``model_id`` (``name@version``) from the series ``series_uid``;
    ``patient`` (default: read from the source) is the patient and study it carries."""
    patient = patient or read_patient_study(source_dataset)
    source_dataset = sanitized_source(source_dataset, patient)
    pixels = np.asarray(image.convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source_dataset,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid(series_uid, model_id, "sc", "series"),
        series_number=_series_number(source_dataset, series_number),
        sop_instance_uid=result_uid(series_uid, model_id, "sc", "sop"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=_patient_orientation(source_dataset),
        laterality=_laterality(source_dataset),
        contributing_equipment=[_equipment(model_id)],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=model_id.split("@")[0],
        software_versions=[f"aiworker {aiworker.__version__}", model_id],
        transfer_syntax_uid=TRANSFER_SYNTAX,
    )
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "Segmentation overlay on a source slice; not for diagnostic use"
    sc.SourceImageSequence = [_source_reference(source_dataset, source_frame)]
    return patient.to_dataset(sc)  # highdicom's SC takes only the type 2 patient and study


def _labels(manifest: Manifest) -> list[Label]:
    """The manifest's segmentation labels (none for a classification-only model: its
    preview is the middle slice without an overlay)."""
    if manifest.outputs.segmentation is None:
        return []
    return manifest.outputs.segmentation.labels


def _grey(plane: np.ndarray) -> Image.Image:
    """One slice windowed to its 1st-99th percentile as an 8-bit grey image."""
    low, high = np.percentile(plane, [1, 99])
    scaled = (plane.astype(np.float64) - low) / max(float(high - low), 1e-6)
    return Image.fromarray((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), mode="L")


def _overlay(grey: np.ndarray, label_plane: np.ndarray, entries: list[Label]) -> np.ndarray:
    """The grey plane as RGB with each entry's pixels blended to its colour at
    :data:`OPACITY` and its inner edge in the full colour."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
    for label in entries:
        mask = label_plane == label.value
        colour = np.asarray(label.color, dtype=np.float64)
        rgb[mask] = (1 - OPACITY) * rgb[mask] + OPACITY * colour
        rgb[mask & ~_eroded(mask)] = colour
    return rgb.round().astype(np.uint8)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` without its pixels that touch (4-neighbourhood) a pixel outside it or the
    border."""
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


def _compose(picture: np.ndarray, entries: list[Label], title: str) -> Image.Image:
    """The picture with the title line above it and the legend to its right."""
    height, width = picture.shape[:2]
    legend_height = 2 * MARGIN + ROW_HEIGHT * len(entries)
    canvas = Image.new("RGB", (width + LEGEND_WIDTH, TITLE_HEIGHT + max(height, legend_height)),
                       BACKGROUND)
    canvas.paste(Image.fromarray(picture, mode="RGB"), (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    draw.text((MARGIN, (TITLE_HEIGHT - 14) // 2), title, fill=TEXT, font=font)
    for row, label in enumerate(entries):
        x, y = width + MARGIN, TITLE_HEIGHT + MARGIN + row * ROW_HEIGHT
        draw.rectangle((x, y, x + SWATCH, y + SWATCH), fill=tuple(label.color), outline=TEXT)
        draw.text((x + SWATCH + 6, y), label.name, fill=TEXT, font=font)
    return canvas


def _series_number(source: Dataset, given: int | None) -> int:
    """``given``, else :data:`SERIES_NUMBER_BASE` plus the source's series number."""
    if given is not None:
        return given
    number = source.get("SeriesNumber")
    return SERIES_NUMBER_BASE + (int(number) if number not in (None, "") else 0)


def _patient_orientation(source: Dataset) -> tuple[str, str]:
    """The patient directions along the rows and down the columns of the source image
    (its dominant axis each; the preview keeps the source's row and column directions)."""
    cosines = _orientation(source)
    return _letter(cosines[:3]), _letter(cosines[3:])


def _orientation(source: Dataset) -> list[float]:
    """ImageOrientationPatient of a single-frame image or of a multi-frame image's first
    frame (shared or per-frame groups)."""
    if "ImageOrientationPatient" in source:
        return [float(v) for v in source.ImageOrientationPatient]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        item = (source.get(groups) or [Dataset()])[0]
        if "PlaneOrientationSequence" in item:
            return [float(v) for v in item.PlaneOrientationSequence[0].ImageOrientationPatient]
    raise PreviewError("the source image has no Image Orientation (Patient)")


def _letter(direction: list[float]) -> str:
    """The patient direction letter (L, R, P, A, H, F) of a direction's dominant axis."""
    axis = int(np.argmax(np.abs(direction)))
    return LETTERS[axis][0 if direction[axis] > 0 else 1]


def _laterality(source: Dataset) -> str | None:
    """The side (R or L) from the source's series Laterality, ImageLaterality or (Enhanced
    MR) the Frame Laterality of its first frame, else None."""
    values = [source.get("Laterality"), source.get("ImageLaterality")]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        anatomy = (source.get(groups) or [Dataset()])[0].get("FrameAnatomySequence")
        values.append(anatomy[0].get("FrameLaterality") if anatomy else None)
    return next((str(v) for v in values if str(v or "") in ("R", "L")), None)


def _equipment(model_id: str) -> hd.ContributingEquipment:
    """The node and model as the equipment that made the preview."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_id.split("@")[0],
        software_versions=[f"aiworker {aiworker.__version__}", model_id],
        contribution_description="AI segmentation preview; not for diagnostic use")


def _source_reference(source: Dataset, frame: int | None) -> Dataset:
    """A Source Image Sequence item naming the previewed source instance (and frame)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item
