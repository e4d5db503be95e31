"""The Enhanced MR Image Storage variant: a whole series as one multi-frame instance.

Scanners of the newer generation (Siemens XA, Philips 5.x) write a series as a single
Enhanced MR object: what varies per frame (position; orientation, for the 3-plane
localizer; frame times) sits in PerFrameFunctionalGroupsSequence, the rest once in
SharedFunctionalGroupsSequence, and the MR technique moves from classic attributes
(ScanningSequence, ScanOptions) to coded ones (MR Pulse Sequence module, MR Modifier
macro). Each stack of parallel slices is one StackID with InStackPositionNumber along its
normal, and the dimension index is (StackID, InStackPositionNumber).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedMRImageStorage, generate_uid

from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.protocol import SeriesPlan
from aiworker.phantom.vendors import LOCALIZER, Scanner, SequenceHeader

# Classic-only attributes of the shared set that the Enhanced MR IOD does not have.
_CLASSIC_ONLY = ("ImageComments", "AcquisitionDate", "AcquisitionTime",
                 "WindowCenter", "WindowWidth")
_CONTRAST = {LOCALIZER: "PROTON_DENSITY", "PD_FS": "PROTON_DENSITY", "PD": "PROTON_DENSITY",
             "T1": "T1", "T2_FS": "T2", "STIR": "STIR"}
_FAT_SUPPRESSED = ("PD_FS", "T2_FS")
_KNEE = ("72696002", "SCT", "Knee")  # SNOMED CT, from DICOM CID 4031


def enhanced_instance(shared: dict[str, Any], header: SequenceHeader, series: SeriesPlan,
                      stacks: list[SliceGeometry], sop_uid: str, scanner: Scanner,
                      acquired: datetime, side: str) -> Dataset:
    """The Enhanced MR Image Storage data set (without Pixel Data) of one series of the
    knee on ``side`` (R or L), acquired from ``acquired``."""
    ds = Dataset()
    for keyword, value in shared.items():
        if keyword not in _CLASSIC_ONLY:
            setattr(ds, keyword, value)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.ImageType = _frame_type(series)
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = _dt(acquired)
    ds.AcquisitionDuration = series.duration_s
    ds.NumberOfFrames = sum(g.slices for g in stacks)
    ds.PresentationLUTShape = "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = Sequence()
    _image_description(ds, series)
    _enhanced_equipment_and_mr(ds, scanner)
    if not series.derived:  # a reformat keeps no acquisition technique (PS3.3 C.8.13.4)
        _pulse_sequence(ds, header, series)
    _dimensions(ds, sop_uid)
    ds.SharedFunctionalGroupsSequence = Sequence(
        [_shared_groups(shared, header, series, stacks, scanner, side)])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        _frame_groups(series, stacks, acquired))
    return ds


def _dt(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S.") + f"{when.microsecond:06d}"


def _frame_type(series: SeriesPlan) -> list[str]:
    flavor = "LOCALIZER" if series.kind == LOCALIZER else "VOLUME"
    if series.derived:
        return ["DERIVED", "PRIMARY", flavor, "RESAMPLED"]
    return ["ORIGINAL", "PRIMARY", flavor, "NONE"]


def _image_description(ds: Dataset, series: SeriesPlan) -> None:
    """The Common CT/MR and MR Image Description attributes (image level and per frame)."""
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = _CONTRAST[series.kind]


def _enhanced_equipment_and_mr(ds: Dataset, scanner: Scanner) -> None:
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.MagneticFieldStrength = scanner.field_strength


def _pulse_sequence(ds: Dataset, header: SequenceHeader, series: SeriesPlan) -> None:
    """The MR Pulse Sequence module: the technique as coded values."""
    gradient = series.kind == LOCALIZER
    ds.PulseSequenceName = header.sequence_name or series.kind
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "GRADIENT" if gradient else "SPIN"
    if not gradient:
        ds.MultipleSpinEcho = "YES"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT" if series.kind in _FAT_SUPPRESSED else "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE" if gradient else "PARTIAL"
    ds.NumberOfKSpaceTrajectories = 1


def _dimensions(ds: Dataset, sop_uid: str) -> None:
    """Frames are indexed by (StackID, InStackPositionNumber)."""
    organization = generate_uid(entropy_srcs=["aiworker-phantom-dimension", sop_uid])
    item = Dataset()
    item.DimensionOrganizationUID = organization
    ds.DimensionOrganizationSequence = Sequence([item])
    ds.DimensionOrganizationType = "3D"
    indices = []
    for pointer, label in ((0x00209056, "Stack ID"), (0x00209057, "In-Stack Position Number")):
        index = Dataset()
        index.DimensionOrganizationUID = organization
        index.DimensionIndexPointer = pointer
        index.FunctionalGroupPointer = 0x00209111  # FrameContentSequence
        index.DimensionDescriptionLabel = label
        indices.append(index)
    ds.DimensionIndexSequence = Sequence(indices)


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _shared_groups(shared: dict[str, Any], header: SequenceHeader, series: SeriesPlan,
                   stacks: list[SliceGeometry], scanner: Scanner, side: str) -> Dataset:
    """Functional groups every frame shares."""
    first = stacks[0]
    groups = Dataset()
    groups.PixelMeasuresSequence = Sequence([_item(
        PixelSpacing=[round(v, 6) for v in first.pixel_spacing],
        SliceThickness=series.thickness, SpacingBetweenSlices=series.spacing)])
    if len(stacks) == 1:
        groups.PlaneOrientationSequence = Sequence([_orientation(first)])
    groups.FrameAnatomySequence = Sequence([_item(
        AnatomicRegionSequence=Sequence([_code(*_KNEE)]), FrameLaterality=side)])
    groups.PixelValueTransformationSequence = Sequence([_item(
        RescaleIntercept=0, RescaleSlope=1, RescaleType="US")])
    groups.FrameVOILUTSequence = Sequence([_item(
        WindowCenter=shared["WindowCenter"], WindowWidth=shared["WindowWidth"])])
    groups.MRImageFrameTypeSequence = Sequence([_item(
        FrameType=_frame_type(series), PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
        ComplexImageComponent="MAGNITUDE", AcquisitionContrast=_CONTRAST[series.kind])])
    if not series.derived:
        _technique_groups(groups, header, series, scanner)
    return groups


def _technique_groups(groups: Dataset, header: SequenceHeader, series: SeriesPlan,
                      scanner: Scanner) -> None:
    """The MR technique macros required for ORIGINAL frames."""
    inversion = series.inversion_time is not None
    groups.MRTimingAndRelatedParametersSequence = Sequence([_item(
        RepetitionTime=series.repetition_time, FlipAngle=header.flip_angle,
        EchoTrainLength=header.echo_train_length, RFEchoTrainLength=header.echo_train_length,
        GradientEchoTrainLength=0,
        SpecificAbsorptionRateSequence=Sequence([_item(
            SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.8)]),
        OperatingModeSequence=Sequence([
            _item(OperatingModeType=mode, OperatingMode="IEC_NORMAL")
            for mode in ("STATIC FIELD", "RF", "GRADIENT")]))])
    groups.MRFOVGeometrySequence = Sequence([_item(
        InPlanePhaseEncodingDirection="COLUMN", MRAcquisitionFrequencyEncodingSteps=series.columns,
        MRAcquisitionPhaseEncodingStepsInPlane=series.rows, PercentSampling=100.0,
        PercentPhaseFieldOfView=round(100.0 * series.rows / series.columns, 4))])
    groups.MREchoSequence = Sequence([_item(EffectiveEchoTime=series.echo_time)])
    modifier = _item(
        InversionRecovery="YES" if inversion else "NO", FlowCompensation="NONE",
        T2Preparation="NO", SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE",
        PartialFourier="NO", ParallelAcquisition="NO")
    if inversion:
        modifier.InversionTimes = [series.inversion_time]
    if series.kind == LOCALIZER:
        modifier.Spoiling = "RF_AND_GRADIENT"
    groups.MRModifierSequence = Sequence([modifier])
    groups.MRImagingModifierSequence = Sequence([_item(
        MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
        TransmitterFrequency=round(42.577478 * scanner.field_strength, 6),
        PixelBandwidth=250.0)])
    groups.MRReceiveCoilSequence = Sequence([_item(
        ReceiveCoilName=scanner.receive_coil, ReceiveCoilManufacturerName=scanner.manufacturer,
        ReceiveCoilType="MULTICOIL", QuadratureReceiveCoil="NO",
        MultiCoilDefinitionSequence=Sequence([_item(
            MultiCoilElementName="KNEE", MultiCoilElementUsed="YES")]))])
    groups.MRTransmitCoilSequence = Sequence([_item(
        TransmitCoilName="Body", TransmitCoilManufacturerName=scanner.manufacturer,
        TransmitCoilType="BODY")])
    groups.MRAveragesSequence = Sequence([_item(NumberOfAverages=1.0)])


def _orientation(geometry: SliceGeometry) -> Dataset:
    return _item(ImageOrientationPatient=[round(v, 6) for v in geometry.orientation])


def _frame_groups(series: SeriesPlan, stacks: list[SliceGeometry],
                  acquired: datetime) -> list[Dataset]:
    """Per frame: frame content (stack, position in stack, times) and plane position (and
    orientation, when the frames do not share one)."""
    frames = []
    per_frame_s = series.duration_s / sum(g.slices for g in stacks)
    for stack_index, geometry in enumerate(stacks, start=1):
        for k in range(geometry.slices):
            start = acquired + timedelta(seconds=per_frame_s * (len(frames)))
            content = _item(
                StackID=str(stack_index), InStackPositionNumber=k + 1,
                DimensionIndexValues=[stack_index, k + 1], FrameAcquisitionNumber=1,
                FrameAcquisitionDateTime=_dt(start), FrameReferenceDateTime=_dt(start),
                FrameAcquisitionDuration=round(per_frame_s * 1000.0, 3))
            frame = Dataset()
            frame.FrameContentSequence = Sequence([content])
            frame.PlanePositionSequence = Sequence([_item(
                ImagePositionPatient=[round(float(v), 6) for v in geometry.position(k)])])
            if len(stacks) > 1:
                frame.PlaneOrientationSequence = Sequence([_orientation(geometry)])
            frames.append(frame)
    return frames
