"""The DICOM Structured Report of a job: a TID 1500 Measurement Report (highdicom).

:func:`build_sr` writes what a job measured as one Comprehensive 3D SR in the source study:

* procedure reported SCT 241641004 "MRI of knee" (Magnetic resonance imaging of knee);
  observer context: the model as a device observer (name ``name version``, model name =
  the model's name, manufacturer ``aiworker``, a device UID derived from the model alone);
  language English (highdicom's default item);
* one TID 1411 Volumetric ROI group per structure of ``findings["volumes_ml"]``, in the
  manifest's label order: a tracking identifier (the structure's name, and a UID derived
  from the source series, the model and the name), the algorithm (model name and version),
  the referenced SEG segment (the Segmentation's SOP instance and the number of the segment
  whose label is the structure's name) with the source series as Source Series for
  Segmentation, finding category and type = the label's SNOMED CT codes, and the
  measurement Volume (SCT 118565006) in UCUM ``ml``;
* the group of a classification head's region (the ACL for knee-demo) also carries the
  head's result: a qualitative evaluation, the finding (see :data:`FINDING_CODES`) with
  value Present (SCT 52101004) when the decision is the positive class, else Absent
  (SCT 272519000; both from DICOM CID 241 "Present-Absent Only"), and the probability of
  the positive class as a measurement DCM 122157 "Probability" with unit UCUM ``1``
  (DCM 111047 "Probability of cancer" would say the wrong thing; 122157 is DICOM's generic
  probability concept). The finding code is the head's ``finding`` in the manifest, else
  :data:`FINDING_CODES` by the head's name; a head with neither is left out;
* a head that reads the network instead of a segmented region (a classification-only
  model, e.g. an MRNet-style ACL classifier) has a TID 1501 Measurement and Qualitative
  Evaluation group of its own: tracking identifier the head's name, finding type the
  finding code, the qualitative evaluation and the Probability as above; it references no
  segment (there is none) and its evidence is the source series;
* a structure or finding the quality gate (:mod:`aiworker.infer.gate`) found not
  assessable (every one, when the whole result is not) makes no claim: its group has no
  Volume and no Probability, and a qualitative evaluation with the value
  :data:`UNDETERMINED`, SCT 373068000 "Undetermined", the third value of DICOM CID 240
  "Present-Absent" (PS3.16; the superset of CID 241 that holds Present and Absent): the
  head's finding (the ACL tear) is neither present nor absent, and for a structure without
  a head its type (e.g. SCT 71341001 Femur) is. When the gate withholds the SEG
  (``gate.send_seg_when_not_assessable`` false), the groups are TID 1501 Measurement and
  Qualitative Evaluation groups that reference no segment, and the SEG is no evidence;
* series description :data:`SERIES_DESCRIPTION`, series number ``SERIES_NUMBER_BASE +
  source series number`` unless the caller gives one, SOP Instance and Series Instance UIDs
  from :func:`aiworker.results.uids.result_uid`, so building again gives the same object;
  patient and study from :class:`~aiworker.results.patient.PatientStudy` (copied by
  highdicom from a sanitized copy of the first source, in UTF-8); flags: complete, preliminary,
  unverified (an AI result no radiologist has read);
* every source instance and the SEG are listed as evidence (Current Requested Procedure
  Evidence Sequence).

Codes checked against pydicom's DICOM concept dictionaries (Volume, Present, Absent,
Undetermined and CID 240's members, Probability) and, for the SNOMED CT concepts DICOM does
not list, against published value sets and finding models (241641004 "Magnetic resonance
imaging of knee (procedure)"; 239725005 "Rupture of anterior cruciate ligament").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, generate_uid

import aiworker
from aiworker.infer import gate
from aiworker.infer.manifest import Manifest
from aiworker.infer.manifest_sections import ClassificationHead, Label
from aiworker.infer.manifest_sections import Code as ManifestCode
from aiworker.results.patient import PatientStudy, read_patient_study, sanitized_source
from aiworker.results.uids import result_uid

SERIES_DESCRIPTION = "AI knee measurements (not for diagnostic use)"
SERIES_NUMBER_BASE = 9100
# What hd.sr.Comprehensive3DSR writes (it takes no transfer syntax; tests check both)
SOP_CLASS = Comprehensive3DSRStorage
TRANSFER_SYNTAX = ExplicitVRLittleEndian
MANUFACTURER = "aiworker"
PROCEDURE = Code("241641004", "SCT", "MRI of knee")
VOLUME = codes.SCT.Volume  # 118565006
MILLILITRE = Code("ml", "UCUM", "milliliter")
PROBABILITY = codes.DCM.Probability  # 122157
NO_UNITS = codes.UCUM.NoUnits  # "1"
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
UNDETERMINED = codes.SCT.Undetermined  # 373068000, CID 240 Present-Absent
FINDING_CODES: dict[str, Code] = {
    "acl": Code("239725005", "SCT", "Rupture of anterior cruciate ligament"),
}


class SRError(Exception):
    """The findings, the manifest and the SEG do not fit together; the message says why."""


def build_sr(source_datasets: Sequence[Dataset], seg_dataset: Dataset | None,
             findings: Mapping[str, Any], manifest: Manifest, model_id: str, *,
             series_number: int | None = None, patient: PatientStudy | None = None
             ) -> Dataset:
    """The Measurement Report of ``findings`` (a job's ``findings.json``) made by the model
    ``model_id`` (``name@version``) described by ``manifest``, on the series of
    ``source_datasets`` and segmented in ``seg_dataset`` (None: the SEG the gate withholds,
    so no group references a segment); ``patient`` (default: read from the first source)
    is the patient and study it carries."""
    if not source_datasets:
        raise SRError("no source instances: the report needs the series it measured")
    patient = patient or read_patient_study(source_datasets[0])
    source_datasets = [sanitized_source(ds, patient) for ds in source_datasets]
    source = source_datasets[0]
    series_uid = str(source.SeriesInstanceUID)
    _check_series(findings, seg_dataset, series_uid)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(manifest, model_id),
        procedure_reported=PROCEDURE,
        imaging_measurements=_groups(seg_dataset, findings, manifest, model_id, series_uid))
    if series_number is None:
        series_number = SERIES_NUMBER_BASE + int(source.get("SeriesNumber") or 0)
    return hd.sr.Comprehensive3DSR(
        evidence=[*source_datasets, *([seg_dataset] if seg_dataset is not None else [])],
        content=report,
        series_instance_uid=result_uid(series_uid, model_id, "sr", "series"),
        series_number=series_number,
        sop_instance_uid=result_uid(series_uid, model_id, "sr", "sop"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=manifest.name,
        software_versions=[f"aiworker {aiworker.__version__}",
                           f"{manifest.name} {manifest.version}"])


def _check_series(findings: Mapping[str, Any], seg: Dataset | None, series_uid: str) -> None:
    """Raise unless the findings and the SEG are both of the source series."""
    if findings.get("series_uid", series_uid) != series_uid:
        raise SRError(f"the findings are of series {findings['series_uid']}, "
                      f"the source instances of series {series_uid}")
    if seg is None:
        return
    segmented = {str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])}
    if series_uid not in segmented:
        raise SRError(f"the SEG {seg.SOPInstanceUID} does not reference series {series_uid}")


def _observation_context(manifest: Manifest, model_id: str) -> hd.sr.ObservationContext:
    """The model as the report's device observer."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["aiworker-device", model_id]),
        name=f"{manifest.name} {manifest.version}",
        manufacturer_name=MANUFACTURER,
        model_name=manifest.name)
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


class _HeadResult(NamedTuple):
    """A classification head's result, as the group of its region reports it."""

    finding: Code
    present: bool | None  # None: not assessable
    probability: float


def _groups(seg: Dataset | None, findings: Mapping[str, Any], manifest: Manifest,
            model_id: str, series_uid: str) -> list[Any]:
    """One measurement group per structure of ``findings["volumes_ml"]``, in label order."""
    volumes: Mapping[str, float] = findings.get("volumes_ml", {})
    labels = manifest.outputs.segmentation.labels if manifest.outputs.segmentation else []
    unknown = sorted(set(volumes) - {label.name for label in labels})
    if unknown:
        raise SRError(f"structures not in the manifest of {model_id}: {', '.join(unknown)}")
    classified = findings.get("classification", {})
    results = _head_results(manifest, classified)
    algorithm = hd.sr.AlgorithmIdentification(name=manifest.name, version=manifest.version)
    groups = [_group(label, None if gate.structure_reasons(dict(findings), label.name)
                     else volumes[label.name],
                     _referenced_segment(seg, label, series_uid) if seg is not None else None,
                     result_uid(series_uid, model_id, "sr", f"tracking {label.name}"),
                     algorithm, results.get(label.value))
              for label in labels if label.name in volumes]
    for head in manifest.outputs.classification:
        result = _head_result(head, classified)
        if head.region is None and result is not None:
            groups.append(_network_group(head.name, result, algorithm, result_uid(
                series_uid, model_id, "sr", f"tracking head {head.name}")))
    return groups


def _head_results(manifest: Manifest, classified: Mapping[str, Any]) -> dict[int, _HeadResult]:
    """Label value of the region -> the result of each region head that has one and a
    finding code."""
    found = {}
    for head in manifest.outputs.classification:
        result = _head_result(head, classified)
        if head.region is not None and result is not None:
            found[head.region.label] = result
    return found


def _head_result(head: ClassificationHead, classified: Mapping[str, Any]
                 ) -> _HeadResult | None:
    """The head's result, or None without one or without a finding code."""
    finding = _code(head.finding) if head.finding else FINDING_CODES.get(head.name)
    if head.name not in classified or finding is None:
        return None
    decision = classified[head.name]["decision"]
    return _HeadResult(finding=finding,
                       present=None if decision == gate.NOT_ASSESSABLE
                       else decision == head.positive,
                       probability=float(classified[head.name]["probability"]))


def _network_group(name: str, result: _HeadResult, algorithm: hd.sr.AlgorithmIdentification,
                   tracking_uid: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of a head that reads the network: its finding and probability,
    or Undetermined when it is not assessable."""
    measurements = None
    value = UNDETERMINED if result.present is None else PRESENT if result.present else ABSENT
    if result.present is not None:
        measurements = [hd.sr.Measurement(name=PROBABILITY, value=result.probability,
                                          unit=NO_UNITS)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=name),
        finding_type=result.finding, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=result.finding,
                                                             value=value)])


def _referenced_segment(seg: Dataset, label: Label, series_uid: str) -> hd.sr.ReferencedSegment:
    """The segment of ``seg`` labelled with the structure's name, segmented on the source
    series."""
    numbers = {str(item.SegmentLabel): int(item.SegmentNumber)
               for item in seg.get("SegmentSequence", [])}
    if label.name not in numbers:
        raise SRError(f"the SEG {seg.SOPInstanceUID} has no segment {label.name!r}")
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
        segment_number=numbers[label.name],
        source_series=hd.sr.SourceSeriesForSegmentation(series_uid))


def _group(label: Label, volume_ml: float | None, segment: hd.sr.ReferencedSegment | None,
           tracking_uid: str, algorithm: hd.sr.AlgorithmIdentification,
           result: _HeadResult | None) -> Any:
    """The TID 1411 group of one structure (TID 1501 without a ``segment``): its volume
    and, for a head's region, the head's finding and probability; a structure that is not
    assessable (``volume_ml`` None) and a head's finding that is not state Undetermined."""
    measurements = [] if volume_ml is None else [
        hd.sr.Measurement(name=VOLUME, value=float(volume_ml), unit=MILLILITRE)]
    evaluations = []
    if volume_ml is None and result is None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=_code(label.type),
                                                       value=UNDETERMINED))
    if result is not None and (result.present is None or volume_ml is None):
        evaluations.append(hd.sr.QualitativeEvaluation(name=result.finding,
                                                       value=UNDETERMINED))
    elif result is not None:
        measurements.append(hd.sr.Measurement(name=PROBABILITY, value=result.probability,
                                              unit=NO_UNITS))
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=result.finding, value=PRESENT if result.present else ABSENT))
    common = {"tracking_identifier": hd.sr.TrackingIdentifier(uid=tracking_uid,
                                                              identifier=label.name),
              "finding_category": _code(label.category), "finding_type": _code(label.type),
              "algorithm_id": algorithm, "measurements": measurements or None,
              "qualitative_evaluations": evaluations or None}
    if segment is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=segment, **common)


def _code(code: ManifestCode) -> Code:
    """A manifest code as a pydicom code."""
    return Code(code.value, code.scheme_designator, code.meaning)
