"""The DICOM Segmentation of a job: the model's labels as a highdicom ``Segmentation``.

:func:`build_seg` turns the label volume of a job (``(slices, rows, columns)`` uint8 on the
slices of the loaded source series) into one Segmentation object in the source study:

* one segment per label the manifest lists, numbered 1, 2, ... in manifest order (the
  label *values* need not be consecutive), with the manifest's name, SNOMED CT category and
  type codes, anatomic region (when the manifest gives one, as for cartilage), its RGB
  colour as the recommended display CIELab value, its name as tracking id and a tracking
  UID derived like the object's UIDs;
* the frame of source slice k is derived from ``loaded.sop_instance_uids[k]`` (and, for
  Enhanced MR, ``loaded.frame_numbers[k]``): highdicom takes each frame's plane position
  and source image reference from the source image at the same index, so classic source
  datasets are put in the loaded order (whatever order the caller gives them in) and the
  labels stay in that order; the labels of one Enhanced MR instance are put in its frame
  order (labels spanning several multi-frame instances raise :class:`SegError`);
* BINARY (default) stores one bit plane per segment and slice and omits the empty frames,
  so a structure the model did not find is still listed as a segment but has no frames
  (allowed by the standard); a job with no label at all keeps its empty frames, since a
  Segmentation needs at least one frame. LABELMAP (Label Map Segmentation Storage, new in
  2024) stores one frame per slice holding the segment numbers; the dicom3tools release in
  Debian (2022) does not know that IOD, so only BINARY objects are checked with dciodvfy;
* the algorithm (model name and version, family Artificial Intelligence), the equipment
  (manufacturer ``aiworker``, model name = the model's name, software versions = the
  aiworker and model versions, device serial number = ``name@version``) both as the
  object's own equipment and as a Contributing Equipment item (Processing Equipment);
* series description :data:`SERIES_DESCRIPTION` and series number
  ``SERIES_NUMBER_BASE + source series number`` (or :data:`SERIES_NUMBER_BASE` when the
  source has none) unless the caller gives one; SOP Instance and Series Instance UIDs from
  :func:`aiworker.results.uids.result_uid`, so building again gives the same object;
* patient and study from :class:`~aiworker.results.patient.PatientStudy` (the source's,
  cleaned: highdicom copies them from sanitized copies of the sources, in UTF-8), Frame of
  Reference copied from the source by highdicom; the source's
  laterality (series ``Laterality``, ``ImageLaterality`` or an Enhanced MR instance's
  ``FrameLaterality``) as every segment's property
  type modifier (SCT Right or Left), the Segmentation IOD's place for it: the object has
  no Image Laterality, and dciodvfy rejects a series ``Laterality`` in a Segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian, SegmentationStorage

import aiworker
from aiworker.infer.manifest import Manifest
from aiworker.infer.manifest_sections import Code, Label
from aiworker.infer.volume import LoadedSeries
from aiworker.results.patient import PatientStudy, read_patient_study, sanitized_source
from aiworker.results.uids import result_uid

SERIES_DESCRIPTION = "AI knee segmentation (not for diagnostic use)"
SERIES_NUMBER_BASE = 9000
MANUFACTURER = "aiworker"
KINDS = ("binary", "labelmap")
# The SOP class of each kind (the node sends BINARY), and the transfer syntax written
SOP_CLASSES = {"binary": SegmentationStorage,
               "labelmap": UID("1.2.840.10008.5.1.4.1.1.66.7")}  # pydicom 3.0 lacks its name
TRANSFER_SYNTAX = ExplicitVRLittleEndian
SIDES = {"R": ("24028007", "SCT", "Right"), "L": ("7771000", "SCT", "Left")}


class SegError(Exception):
    """The labels or the source cannot make a Segmentation; the message says why."""


def build_seg(source_datasets: Sequence[Dataset], loaded: LoadedSeries, labels: np.ndarray,
              manifest: Manifest, model_id: str, *, kind: str = "binary",
              series_number: int | None = None, patient: PatientStudy | None = None
              ) -> Dataset:
    """The Segmentation of ``labels`` (``(slices, rows, columns)``, slice k on
    ``loaded``'s slice k) made by the model ``model_id`` (``name@version``) described by
    ``manifest``; ``kind`` is ``binary`` or ``labelmap``; ``patient`` (default: read from
    the first source) is the patient and study it carries."""
    if kind not in KINDS:
        raise SegError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if manifest.outputs.segmentation is None:
        raise SegError(f"model {model_id} outputs no segmentation")
    if labels.shape[0] != loaded.slices:
        raise SegError(f"labels have {labels.shape[0]} slices, the series {loaded.slices}")
    entries = manifest.outputs.segmentation.labels
    if source_datasets and patient is None:
        patient = read_patient_study(source_datasets[0])
    source_datasets = [sanitized_source(ds, patient) for ds in source_datasets]
    sources, frames = _sources_and_frames(source_datasets, loaded, labels)
    pixels = _segment_numbers(frames, entries)
    first = sources[0]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=kind.upper(),
        segment_descriptions=_segments(entries, manifest, loaded.series_uid, model_id,
                                       _laterality(first)),
        series_instance_uid=result_uid(loaded.series_uid, model_id, "seg", "series"),
        series_number=_series_number(first, series_number),
        sop_instance_uid=result_uid(loaded.series_uid, model_id, "seg", "sop"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.name,
        software_versions=_software_versions(manifest),
        device_serial_number=model_id,
        series_description=SERIES_DESCRIPTION,
        content_label="AI_KNEE_SEG",
        content_description=f"{manifest.name} {manifest.version} segmentation",
        omit_empty_frames=bool(pixels.any()),
        contributing_equipment=[_equipment(manifest)],
        transfer_syntax_uid=TRANSFER_SYNTAX,
    )


def _sources_and_frames(source_datasets: Sequence[Dataset], loaded: LoadedSeries,
                        labels: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """The source images in the order highdicom pairs with the label frames, and the label
    frames in that order: classic MR in loaded slice order; an Enhanced MR instance with
    the frames put back in its frame order."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    missing = [uid for uid in dict.fromkeys(loaded.sop_instance_uids) if uid not in by_uid]
    if missing:
        raise SegError(f"{len(missing)} source instance(s) of the labels not given, "
                       f"e.g. {missing[0]}")
    if loaded.frame_numbers is None:
        return [by_uid[uid] for uid in loaded.sop_instance_uids], labels
    uids = set(loaded.sop_instance_uids)
    if len(uids) != 1:
        raise SegError(f"labels span {len(uids)} multi-frame instances; one is supported")
    source = by_uid[loaded.sop_instance_uids[0]]
    if int(source.NumberOfFrames) != loaded.slices:
        raise SegError(f"instance has {source.NumberOfFrames} frames, the labels "
                       f"{loaded.slices} slices")
    frames = np.empty_like(labels)
    frames[np.asarray(loaded.frame_numbers) - 1] = labels
    return [source], frames


def _segment_numbers(labels: np.ndarray, entries: Sequence[Label]) -> np.ndarray:
    """``labels`` with each manifest value replaced by its segment number (its 1-based
    position in the manifest) and every other value by 0."""
    lookup = np.zeros(256, dtype=np.uint8)
    for number, entry in enumerate(entries, start=1):
        lookup[entry.value] = number
    return lookup[labels.astype(np.uint8, copy=False)]


def _segments(entries: Sequence[Label], manifest: Manifest, series_uid: str, model_id: str,
              laterality: hd.sr.CodedConcept | None) -> list[hd.seg.SegmentDescription]:
    """One segment description per manifest label, in manifest order, each with a tracking
    UID as deterministic as the object's and the side as its property type modifier."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manifest.name, family=codes.cid7162.ArtificialIntelligence,
        version=manifest.version)
    segments = [hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=entry.name,
        segmented_property_category=_concept(entry.category),
        segmented_property_type=_concept(entry.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_id=entry.name,
        tracking_uid=result_uid(series_uid, model_id, "seg", f"segment-{entry.value}"),
        anatomic_regions=[_concept(entry.anatomic_region)] if entry.anatomic_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*entry.color),
    ) for number, entry in enumerate(entries, start=1)]
    if laterality is not None:
        for segment in segments:
            segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence \
                = [laterality]
    return segments


def _concept(code: Code) -> hd.sr.CodedConcept:
    """A manifest code as a highdicom coded concept."""
    return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def _software_versions(manifest: Manifest) -> list[str]:
    """The aiworker version and the model's, as Software Versions values."""
    return [f"aiworker {aiworker.__version__}", f"{manifest.name} {manifest.version}"]


def _equipment(manifest: Manifest) -> hd.ContributingEquipment:
    """The node and model as the equipment that processed the source images."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=manifest.name, software_versions=_software_versions(manifest),
        contribution_description="AI segmentation; not for diagnostic use")


def _series_number(source: Dataset, given: int | None) -> int:
    """``given``, else :data:`SERIES_NUMBER_BASE` plus the source's series number."""
    if given is not None:
        return given
    number = source.get("SeriesNumber")
    return SERIES_NUMBER_BASE + (int(number) if number not in (None, "") else 0)


def _laterality(source: Dataset) -> hd.sr.CodedConcept | None:
    """The side (SCT Right or Left) from the source's series Laterality, ImageLaterality or
    (Enhanced MR) the Frame Laterality of its first frame, else None."""
    values = [source.get("Laterality"), source.get("ImageLaterality"), _frame_laterality(source)]
    side = next((SIDES[str(v)] for v in values if str(v or "") in SIDES), None)
    return hd.sr.CodedConcept(*side) if side else None


def _frame_laterality(source: Dataset) -> str | None:
    """FrameLaterality of a multi-frame image's first frame (shared or per-frame groups)."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        anatomy = (source.get(groups) or [Dataset()])[0].get("FrameAnatomySequence")
        if anatomy:
            return anatomy[0].get("FrameLaterality")
    return None
