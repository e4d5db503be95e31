"""The geometry of one image series in patient coordinates (DICOM LPS, millimetres).

Shared by the anatomy renderer (which samples the knee at each pixel) and the study writer
(which writes ImagePositionPatient, ImageOrientationPatient, PixelSpacing and friends), so
the pixels and the header always describe the same points.

DICOM conventions, kept here so no one has to re-derive them:

* ``row_dir`` is the first triplet of ImageOrientationPatient: the direction of increasing
  column index (along a row); ``col_dir`` is the second: increasing row index.
* PixelSpacing is ``[spacing between rows, spacing between columns]``.
* The centre of pixel (row r, column c) of slice k lies at
  ``position(k) + c * column_spacing * row_dir + r * row_spacing * col_dir``.
* Slices step by ``spacing_between_slices`` along ``normal = row_dir x col_dir``; the gap
  between slabs is ``spacing_between_slices - slice_thickness``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SliceGeometry:
    """Where every pixel of a stack of parallel slices lies in patient space."""

    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    first_position: tuple[float, float, float]
    rows: int
    columns: int
    slices: int
    row_spacing: float
    column_spacing: float
    slice_thickness: float
    spacing_between_slices: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient."""
        return [float(v) for v in (*self.row_dir, *self.col_dir)]

    @property
    def pixel_spacing(self) -> list[float]:
        """PixelSpacing: row spacing, then column spacing."""
        return [float(self.row_spacing), float(self.column_spacing)]

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (centre of its first pixel)."""
        return np.asarray(self.first_position) + k * self.spacing_between_slices * self.normal

    def slice_points(self, k: int, offset: float = 0.0) -> np.ndarray:
        """Patient coordinates of every pixel centre of slice ``k``, shifted ``offset`` mm
        along the normal (to sample through the slice thickness): shape (rows, columns, 3)."""
        r = np.arange(self.rows, dtype=np.float64)[:, None, None]
        c = np.arange(self.columns, dtype=np.float64)[None, :, None]
        origin = self.position(k) + offset * self.normal
        return (origin
                + c * self.column_spacing * np.asarray(self.row_dir)
                + r * self.row_spacing * np.asarray(self.col_dir))

    @classmethod
    def centred(cls, centre, row_dir, col_dir, rows: int, columns: int, slices: int,
                field_of_view: tuple[float, float], slice_thickness: float,
                spacing_between_slices: float) -> SliceGeometry:
        """A stack whose middle lies at ``centre``; ``field_of_view`` is (height, width) mm."""
        row_dir = np.asarray(row_dir, float) / np.linalg.norm(row_dir)
        col_dir = np.asarray(col_dir, float) / np.linalg.norm(col_dir)
        normal = np.cross(row_dir, col_dir)
        row_spacing = field_of_view[0] / rows
        column_spacing = field_of_view[1] / columns
        first = (np.asarray(centre, float)
                 - (columns - 1) / 2 * column_spacing * row_dir
                 - (rows - 1) / 2 * row_spacing * col_dir
                 - (slices - 1) / 2 * spacing_between_slices * normal)
        return cls(tuple(row_dir), tuple(col_dir), tuple(first), rows, columns, slices,
                   row_spacing, column_spacing, slice_thickness, spacing_between_slices)
