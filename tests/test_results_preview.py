"""The preview of a job, built from a phantom study's truth labels (as if the model had
predicted them perfectly): the slice it shows, the PNG read back with Pillow (size, colours
at the ACL and the background, legend) and the Secondary Capture read back with pydicom and
checked with dciodvfy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers.results import model_labels, truth_series_labels
from helpers.tools import dciodvfy_errors
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from aiworker.infer.manifest import Manifest
from aiworker.infer.registry import Registry, model_id
from aiworker.results.preview import (
    DISPLAY_SIZE,
    LEGEND_WIDTH,
    SERIES_DESCRIPTION,
    TITLE_HEIGHT,
    PreviewError,
    acl_label,
    build_secondary_capture,
    display_size,
    legend_entries,
    preview_slice,
    render_preview,
    slice_source,
    write_png,
)
from aiworker.results.uids import result_uid

SEED = 3
ACL = 10
SIDE_OF_SEED = "L"  # the phantom knee of SEED


class Case:
    """One source series with its datasets, its loaded volume, the truth labels (the
    model's labels only) on its slices and the knee-demo model."""

    def __init__(self, root: Path, enhanced: bool):
        files, self.loaded, labels = truth_series_labels(root, SEED, 256, enhanced=enhanced)
        self.datasets = [pydicom.dcmread(path) for path in files]
        self.labels = model_labels(labels)
        spec = Registry().get("knee-demo")
        self.manifest: Manifest = spec.manifest
        self.model_id = model_id(spec)
        self.enhanced = enhanced

    def build_sc(self, image: Image.Image) -> Dataset:
        k = preview_slice(self.labels, ACL)
        source, frame = slice_source(self.datasets, self.loaded, k)
        return build_secondary_capture(source, image, self.model_id, self.loaded.series_uid,
                                       source_frame=frame)

    def display_point(self, row: int, column: int) -> tuple[int, int]:
        """The (x, y) preview pixel at the centre of source pixel (row, column)."""
        width, height = display_size(self.loaded)
        rows, columns = self.labels.shape[1:]
        return (int((column + 0.5) * width / columns),
                TITLE_HEIGHT + int((row + 0.5) * height / rows))


@pytest.fixture(scope="module", params=["classic", "enhanced"])
def case(request, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp(request.param), request.param == "enhanced")


@pytest.fixture(scope="module")
def png(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preview") / "preview.png"
    return write_png(render_preview(case.loaded, case.labels, case.manifest), path)


@pytest.fixture(scope="module")
def sc(case: Case, png: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sc") / "sc.dcm"
    case.build_sc(Image.open(png)).save_as(path, enforce_file_format=True)
    return path


def interior(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` whose whole 5x5 neighbourhood is in ``mask``."""
    padded = np.pad(mask, 2, constant_values=False)
    rows, columns = mask.shape
    out = np.ones_like(mask)
    for dr in range(5):
        for dc in range(5):
            out &= padded[dr:dr + rows, dc:dc + columns]
    return out


def test_the_manifest_acl_is_label_10(case):
    assert acl_label(case.manifest) == ACL
    assert tuple(next(label.color for label in case.manifest.outputs.segmentation.labels
                      if label.value == ACL)) == (255, 40, 40)


def test_the_preview_slice_has_the_most_acl_voxels(case):
    counts = (case.labels == ACL).sum(axis=(1, 2))
    assert counts.max() > 0
    k = preview_slice(case.labels, ACL)
    assert counts[k] == counts.max()


def test_without_acl_the_slice_has_the_most_labels_and_without_labels_the_middle(case):
    no_acl = np.where(case.labels == ACL, 0, case.labels)
    k = preview_slice(no_acl, ACL)
    assert (no_acl[k] > 0).sum() == (no_acl > 0).sum(axis=(1, 2)).max()
    assert preview_slice(no_acl, None) == k
    assert preview_slice(np.zeros_like(case.labels), ACL) == case.labels.shape[0] // 2


def test_the_png_has_the_image_and_the_legend_beside_it(case, png):
    image = Image.open(png)
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.info == {}  # no text chunks, so no patient data beside the pixels
    width, height = display_size(case.loaded)
    assert max(width, height) == DISPLAY_SIZE
    assert image.size == (width + LEGEND_WIDTH, TITLE_HEIGHT + height)


def test_the_acl_is_red_and_the_background_grey(case, png):
    pixels = np.asarray(Image.open(png)).astype(int)
    k = preview_slice(case.labels, ACL)
    acl = np.argwhere(interior(case.labels[k] == ACL))
    background = np.argwhere(interior(case.labels[k] == 0))
    assert len(acl) and len(background)
    for row, column in acl[:: max(1, len(acl) // 10)]:
        x, y = case.display_point(row, column)
        red, green, blue = pixels[y, x]
        assert red > green + 40 and red > blue + 40, (row, column, pixels[y, x])
    for row, column in background[:: max(1, len(background) // 50)]:
        x, y = case.display_point(row, column)
        red, green, blue = pixels[y, x]
        assert red == green == blue, (row, column, pixels[y, x])


def test_the_legend_lists_exactly_the_labels_on_the_slice(case, png):
    k = preview_slice(case.labels, ACL)
    entries = legend_entries(case.labels[k], case.manifest)
    on_slice = set(np.unique(case.labels[k]).tolist()) - {0}
    assert [label.value for label in entries] == sorted(on_slice)
    assert ACL in on_slice and len(on_slice) < 11  # not every label crosses one slice
    pixels = np.asarray(Image.open(png))
    legend = pixels[TITLE_HEIGHT:, display_size(case.loaded)[0]:].reshape(-1, 3)
    swatches = {tuple(colour) for colour in legend.tolist()}
    for label in case.manifest.outputs.segmentation.labels:
        assert (tuple(label.color) in swatches) == (label.value in on_slice), label.name


def test_the_title_is_drawn_and_a_chosen_slice_is_shown(case):
    shown = render_preview(case.loaded, case.labels, case.manifest, slice_index=0)
    title = np.asarray(shown)[:TITLE_HEIGHT]
    assert (title == 255).any()  # white text on black
    with pytest.raises(PreviewError, match="not in the series"):
        render_preview(case.loaded, case.labels, case.manifest, slice_index=99)
    with pytest.raises(PreviewError, match="shape"):
        render_preview(case.loaded, case.labels[1:], case.manifest)


def test_non_square_pixels_keep_their_physical_aspect(case):
    image = sitk.Image(case.loaded.image)
    image.SetSpacing((0.5, 1.0, 3.0))  # columns 0.5 mm apart, rows 1 mm
    stretched = dataclasses.replace(case.loaded, image=image)
    rows, columns = case.labels.shape[1:]
    width, height = display_size(stretched)
    assert max(width, height) == DISPLAY_SIZE
    assert width / height == pytest.approx(columns * 0.5 / (rows * 1.0), rel=0.01)
    preview = render_preview(stretched, case.labels, case.manifest)
    assert preview.size[0] == width + LEGEND_WIDTH


def test_the_secondary_capture_is_in_the_source_study(case, sc, png):
    ds = pydicom.dcmread(sc)
    source = case.datasets[0]
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.Modality == "OT"
    assert ds.Laterality == SIDE_OF_SEED and ds.PatientOrientation == ["P", "F"]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyID", "AccessionNumber", "StudyDate"):
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.SeriesDescription == SERIES_DESCRIPTION
    assert ds.SeriesNumber == 9200 + int(source.SeriesNumber)
    assert ds.SeriesInstanceUID == result_uid(case.loaded.series_uid, case.model_id, "sc",
                                              "series")
    assert ds.SOPInstanceUID == result_uid(case.loaded.series_uid, case.model_id, "sc", "sop")
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.BurnedInAnnotation, ds.ConversionType) == ("YES", "WSD")
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert np.array_equal(ds.pixel_array, np.asarray(Image.open(png)))


def test_the_secondary_capture_references_the_previewed_slice(case, sc):
    ds = pydicom.dcmread(sc)
    k = preview_slice(case.labels, ACL)
    ref = ds.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == case.loaded.sop_instance_uids[k]
    if case.enhanced:
        assert int(ref.ReferencedFrameNumber) == case.loaded.frame_numbers[k]
    else:
        assert "ReferencedFrameNumber" not in ref


def test_the_secondary_capture_uids_are_deterministic(case, png):
    image = Image.open(png)
    first, second = case.build_sc(image), case.build_sc(image)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        second.SOPInstanceUID, second.SeriesInstanceUID)
    numbered = build_secondary_capture(case.datasets[0], image, case.model_id,
                                       case.loaded.series_uid, series_number=77)
    assert numbered.SeriesNumber == 77


def test_the_secondary_capture_passes_dciodvfy(sc):
    assert dciodvfy_errors(sc) == []
