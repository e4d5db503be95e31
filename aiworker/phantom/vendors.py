"""How Siemens, GE and Philips scanners describe a knee series in the DICOM header.

A series selector that works on real studies must read what scanners actually write, not
what a textbook would. The conventions modelled here, per vendor:

* **Siemens** (syngo MR): SeriesDescription = ProtocolName = the protocol's name
  (``pd_tse_fs_sag``, ``t2_tirm_cor``; ``tra`` for axial); SequenceName ``*tse2d1_<ETL>``,
  ``*tir2d1_<ETL>`` (TIRM = STIR), ``*fl2d1`` for the localizer; fat saturation is ``FS``
  in ScanOptions; ImageType ``ORIGINAL\\PRIMARY\\M\\ND\\NORM``; no ImagesInAcquisition;
  series numbered 1, 2, 3, ...; Laterality at series level.
* **GE** (Signa): SeriesDescription like ``Sag PD FS``; ProtocolName is the exam's protocol
  (the same for every series); SequenceName ``fse-xl``; ScanOptions a mix of DICOM terms and
  GE's own ``*_GEMS`` flags. ``FS`` is fat saturation; ``SAT_GEMS`` is *spatial*
  saturation bands and appears on series without fat suppression too (the classic trap
  for a selector matching substrings); ``IR_GEMS`` marks inversion recovery. ImageType
  ``ORIGINAL\\PRIMARY\\OTHER`` (``LOCALIZER`` for the 3-plane localizer); writes
  ImagesInAcquisition; ImageLaterality.
* **Philips** (Ingenia/Achieva): SeriesDescription = ProtocolName like ``PD_SPAIR SAG``
  (SPAIR: spectral fat suppression, ``FS`` in ScanOptions); ImageType names the
  reconstruction (``M_SE``, ``M_IR``, ``M_FFE``); series numbered 101, 201, 301, ... with
  AcquisitionNumber 1, 2, 3, ...; writes ImagesInAcquisition; Laterality at series level.

STIR is inversion recovery with a short inversion time (~150 ms) on every vendor: ``IR`` in
ScanningSequence and an InversionTime. Descriptions may also be generic or empty (see
:func:`describe`), so only ScanOptions, ScanningSequence and the timing say what a series
really is.
"""

from __future__ import annotations

from dataclasses import dataclass

# The kinds of acquisition a knee protocol uses: the localizer and the render sequences.
LOCALIZER = "LOC"
KINDS = (LOCALIZER, "PD_FS", "PD", "T1", "T2_FS", "STIR")

GENERIC_DESCRIPTIONS = ("MR KNEE", "KNEE", "knee routine", "Routine")


@dataclass(frozen=True)
class Scanner:
    """One scanner model as it names itself."""

    manufacturer: str
    model: str
    field_strength: float  # tesla
    software: tuple[str, ...]
    receive_coil: str


@dataclass(frozen=True)
class SequenceHeader:
    """The header fields one vendor writes for one kind of acquisition in one plane."""

    series_description: str
    protocol_name: str
    sequence_name: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    image_type: tuple[str, ...]
    flip_angle: float
    echo_train_length: int


@dataclass(frozen=True)
class Vendor:
    """A vendor's header conventions for the knee protocol."""

    key: str
    scanners: tuple[Scanner, ...]
    writes_images_in_acquisition: bool
    series_number_step: int  # Philips numbers series 101, 201, ...; others 1, 2, ...
    series_number_offset: int
    counts_acquisitions: bool  # Philips: AcquisitionNumber 1, 2, ... through the exam
    laterality_keyword: str  # Laterality (series level) or ImageLaterality (image level)
    # per kind: (description pattern, sequence name, scanning sequence, variant, options,
    # image type, flip angle, echo train length); "{plane}" is the vendor's plane word
    sequences: dict[str, tuple]
    planes: dict[str, str]
    exam_protocol: str | None  # GE: one ProtocolName for the whole exam

    def series_number(self, order: int) -> int:
        """SeriesNumber of the ``order``-th acquisition (1-based)."""
        return order * self.series_number_step + self.series_number_offset

    def acquisition_number(self, order: int) -> int:
        return order if self.counts_acquisitions else 1

    def header(self, kind: str, plane: str) -> SequenceHeader:
        """The vendor's fields for acquisition ``kind`` (one of :data:`KINDS`) in ``plane``
        (sagittal, coronal, axial, or three-plane for the localizer)."""
        pattern, name, scanning, variant, options, image_type, flip, etl = self.sequences[kind]
        description = pattern.format(plane=self.planes.get(plane, ""))
        return SequenceHeader(
            series_description=description,
            protocol_name=self.exam_protocol or description,
            sequence_name=name,
            scanning_sequence=scanning,
            sequence_variant=variant,
            scan_options=options,
            image_type=image_type,
            flip_angle=flip,
            echo_train_length=etl,
        )


def describe(header: SequenceHeader, mode: str, generic: str) -> tuple[str, str]:
    """(SeriesDescription, ProtocolName) as the site leaves them.

    ``mode`` is ``vendor`` (the vendor's names), ``generic`` (the same uninformative
    ``generic`` text on every series, as sites that name series after the exam do) or
    ``empty`` (both blank, as after some anonymisers or exports).
    """
    if mode == "vendor":
        return header.series_description, header.protocol_name
    if mode == "generic":
        return generic, "KNEE"
    if mode == "empty":
        return "", ""
    raise ValueError(f"description mode must be vendor, generic or empty, not {mode!r}")


_ORIGINAL = ("ORIGINAL", "PRIMARY")

SIEMENS = Vendor(
    key="siemens",
    scanners=(
        Scanner("SIEMENS", "Skyra", 3.0, ("syngo MR E11",), "Knee 18"),
        Scanner("SIEMENS", "Aera", 1.5, ("syngo MR E11",), "Knee 15"),
        Scanner("SIEMENS", "Prisma_fit", 3.0, ("syngo MR E11",), "Knee 18"),
    ),
    writes_images_in_acquisition=False,
    series_number_step=1,
    series_number_offset=0,
    counts_acquisitions=False,
    laterality_keyword="Laterality",
    sequences={
        LOCALIZER: ("localizer", "*fl2d1", ("GR",), ("SP", "OSP"), (),
                    (*_ORIGINAL, "M", "NORM", "DIS2D"), 20.0, 1),
        "PD_FS": ("pd_tse_fs_{plane}", "*tse2d1_7", ("SE",), ("SK", "SP", "OSP"), ("PFP", "FS"),
                  (*_ORIGINAL, "M", "ND", "NORM"), 150.0, 7),
        "PD": ("pd_tse_{plane}", "*tse2d1_7", ("SE",), ("SK", "SP", "OSP"), ("PFP",),
               (*_ORIGINAL, "M", "ND", "NORM"), 150.0, 7),
        "T1": ("t1_tse_{plane}", "*tse2d1_3", ("SE",), ("SK", "SP", "OSP"), (),
               (*_ORIGINAL, "M", "ND", "NORM"), 150.0, 3),
        "T2_FS": ("t2_tse_fs_{plane}", "*tse2d1_13", ("SE",), ("SK", "SP", "OSP"), ("FS",),
                  (*_ORIGINAL, "M", "ND", "NORM"), 150.0, 13),
        "STIR": ("t2_tirm_{plane}", "*tir2d1_11", ("SE", "IR"), ("SK", "SP", "MP", "OSP"),
                 ("IR",), (*_ORIGINAL, "M", "ND", "NORM"), 150.0, 11),
    },
    planes={"sagittal": "sag", "coronal": "cor", "axial": "tra"},
    exam_protocol=None,
)

_GE_SOFTWARE = ("27", "LX", "MR Software release:RX27.0_R02_1831.b")
_GE_FSE = ("FAST_GEMS", "EDR_GEMS", "FILTERED_GEMS", "ACC_GEMS")

GE = Vendor(
    key="ge",
    scanners=(
        Scanner("GE MEDICAL SYSTEMS", "SIGNA Architect", 3.0, _GE_SOFTWARE, "18ch Knee"),
        Scanner("GE MEDICAL SYSTEMS", "DISCOVERY MR750w", 3.0,
                ("25", "LX", "MR Software release:DV25.0_R02_1549.b"), "16ch Knee"),
        Scanner("GE MEDICAL SYSTEMS", "SIGNA Artist", 1.5, _GE_SOFTWARE, "16ch Knee"),
    ),
    writes_images_in_acquisition=True,
    series_number_step=1,
    series_number_offset=0,
    counts_acquisitions=False,
    laterality_keyword="ImageLaterality",
    sequences={
        LOCALIZER: ("3-Plane Loc", "fgre", ("GR",), ("SS", "SK"), ("FAST_GEMS", "SEQ_GEMS", "PFF"),
                    (*_ORIGINAL, "LOCALIZER"), 30.0, 1),
        "PD_FS": ("{plane} PD FS", "fse-xl", ("SE",), ("SK",), ("SAT_GEMS", *_GE_FSE, "FS"),
                  (*_ORIGINAL, "OTHER"), 111.0, 8),
        "PD": ("{plane} PD", "fse-xl", ("SE",), ("SK",), ("SAT_GEMS", *_GE_FSE),
               (*_ORIGINAL, "OTHER"), 111.0, 8),
        "T1": ("{plane} T1", "fse-xl", ("SE",), ("SK",), ("SAT_GEMS", *_GE_FSE),
               (*_ORIGINAL, "OTHER"), 111.0, 3),
        "T2_FS": ("{plane} T2 FS", "fse-xl", ("SE",), ("SK",), ("SAT_GEMS", *_GE_FSE, "FS"),
                  (*_ORIGINAL, "OTHER"), 111.0, 14),
        "STIR": ("{plane} STIR", "fse-xl", ("SE", "IR"), ("SK", "MP"), (*_GE_FSE, "IR_GEMS"),
                 (*_ORIGINAL, "OTHER"), 111.0, 10),
    },
    planes={"sagittal": "Sag", "coronal": "Cor", "axial": "Ax"},
    exam_protocol="KNEE ROUTINE",
)

_PHILIPS_SE = (*_ORIGINAL, "M_SE", "M", "SE")

PHILIPS = Vendor(
    key="philips",
    scanners=(
        Scanner("Philips Healthcare", "Ingenia", 3.0, ("5.4.1", "5.4.1.1"), "dS Knee 16ch"),
        Scanner("Philips Medical Systems", "Achieva", 1.5, ("5.1.7", "5.1.7.2"), "SENSE-Knee-8"),
        Scanner("Philips Healthcare", "Ingenia Ambition X", 1.5, ("5.7.1", "5.7.1.2"),
                "dS Knee 16ch"),
    ),
    writes_images_in_acquisition=True,
    series_number_step=100,
    series_number_offset=1,
    counts_acquisitions=True,
    laterality_keyword="Laterality",
    sequences={
        LOCALIZER: ("Survey", "FFE", ("GR",), ("SP",), (), (*_ORIGINAL, "M_FFE", "M", "FFE"),
                    20.0, 1),
        "PD_FS": ("PD_SPAIR {plane}", "TSE", ("SE",), ("SK",), ("PFP", "FS"), _PHILIPS_SE,
                  90.0, 9),
        "PD": ("PD_TSE {plane}", "TSE", ("SE",), ("SK",), ("PFP",), _PHILIPS_SE, 90.0, 9),
        "T1": ("T1_TSE {plane}", "TSE", ("SE",), ("SK",), (), _PHILIPS_SE, 90.0, 4),
        "T2_FS": ("T2_SPAIR {plane}", "TSE", ("SE",), ("SK",), ("FS",), _PHILIPS_SE, 90.0, 15),
        "STIR": ("STIR {plane}", "TSE", ("IR",), ("SK", "MP"), ("PFP",),
                 (*_ORIGINAL, "M_IR", "M", "IR"), 90.0, 12),
    },
    planes={"sagittal": "SAG", "coronal": "COR", "axial": "TRA"},
    exam_protocol=None,
)

VENDORS: dict[str, Vendor] = {v.key: v for v in (SIEMENS, GE, PHILIPS)}
