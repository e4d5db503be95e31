"""The engine with tiny models: what a run returns, post-processing, and its failures.

The source is a synthetic sagittal series (64 x 64 pixels of 0.8 mm, 16 slices 3.5 mm
apart) holding a bright box and, apart from it, a small bright blob. :class:`Threshold`
labels every voxel above one half, so the right labels are known: the box and the blob.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.infer import Threshold, dice, manifest, series_of, slices_with, write_model
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet

from aiworker.infer import engine as engine_module
from aiworker.infer.engine import Engine, ResourceError, pick_device
from aiworker.infer.manifest import ModelError
from aiworker.infer.volume import LoadedSeries

torch.set_num_threads(1)

SAGITTAL = np.column_stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]])  # rows A->P, columns S->I
SPACING = (0.8, 0.8, 3.5)
SHAPE = (16, 64, 64)  # slices, rows, columns
BOX = (slice(4, 12), slice(10, 50), slice(10, 50))
BLOB = (slice(13, 15), slice(54, 60), slice(54, 60))
TIMINGS = {"preprocess", "model", "postprocess", "resample"}
HEAD = {"name": "box", "classes": ["single", "scattered"], "positive": "scattered",
        "threshold": 0.5,
        "region": {"label": 1, "features": ["volume_ml", "components"], "mean": [0.0, 1.5],
                   "scale": [1.0, 0.1], "coefficients": [0.0, 1.0], "intercept": 0.0}}


def masks() -> tuple[np.ndarray, np.ndarray]:
    box, blob = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    box[BOX], blob[BLOB] = True, True
    return box, blob


@pytest.fixture(scope="module")
def source() -> LoadedSeries:
    box, blob = masks()
    return series_of((box | blob) * 1000.0, SPACING, SAGITTAL, origin=(20.0, -30.0, 40.0))


def threshold_conv() -> torch.nn.Module:
    """The MONAI Convolution block as :class:`Threshold`: 1x1x1, weights (0, 1), bias
    (0.5, 0)."""
    conv = Convolution(3, 1, 2, kernel_size=1, conv_only=True)
    with torch.no_grad():
        conv.conv.weight.copy_(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1))
        conv.conv.bias.copy_(torch.tensor([0.5, 0.0]))
    return conv


def small_window(**changes) -> dict:
    """Inference settings with a 32 x 32 x 8 ROI, so a run takes many batched windows."""
    return {"roi_size": [32, 32, 8], "overlap": 0.25, "sw_batch_size": 3} | changes


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict"])
def test_a_run_labels_the_source_slices_and_counts_volumes_there(tmp_path, source, fmt):
    if fmt == "torchscript":
        spec = write_model(tmp_path, Threshold(), manifest(classification=[HEAD]))
    else:
        raw = manifest("state_dict", classification=[HEAD],
                       network={"class": "monai.networks.blocks.Convolution",
                                "args": {"spatial_dims": 3, "in_channels": 1,
                                         "out_channels": 2, "kernel_size": 1,
                                         "conv_only": True}},
                       inference=small_window())
        spec = write_model(tmp_path, threshold_conv(), raw)

    result = Engine(spec, "cpu").run([source])

    assert result.labels.shape == SHAPE and result.labels.dtype == np.uint8
    assert result.device == "cpu"
    assert set(result.timings) == TIMINGS and all(t >= 0 for t in result.timings.values())
    box, blob = masks()
    femur = result.labels == 1
    assert dice(femur, box | blob) >= 0.95
    assert slices_with(femur) == slices_with(box | blob)
    assert set(np.unique(result.labels)) == {0, 1}
    np.testing.assert_array_equal(result.label_image.GetSize(), source.image.GetSize()[:3])
    assert result.label_image.GetOrigin() == source.image.GetOrigin()
    assert result.label_image.GetDirection() == source.image.GetDirection()

    found = result.findings
    assert found["model"] == "tiny@1.0" and found["series_uid"] == source.series_uid
    voxel_ml = math.prod(SPACING) / 1000
    assert found["volumes_ml"] == {"Femur": round(int(femur.sum()) * voxel_ml, 3)}
    assert found["volumes_ml"]["Femur"] == pytest.approx((box | blob).sum() * voxel_ml, rel=0.05)
    head = found["classification"]["box"]
    assert head["features"]["components"] == 2.0 and head["decision"] == "scattered"
    assert head["features"]["volume_ml"] == pytest.approx(found["volumes_ml"]["Femur"], rel=0.05)


def test_largest_component_removes_a_separate_blob(tmp_path, source):
    raw = manifest(segmentation={"largest_component": True}, classification=[HEAD],
                   inference=small_window())
    result = Engine(write_model(tmp_path, Threshold(), raw), "cpu").run([source])

    box, blob = masks()
    femur = result.labels == 1
    assert not femur[blob].any()
    assert dice(femur, box) >= 0.95 and slices_with(femur) == slices_with(box)
    head = result.findings["classification"]["box"]
    assert head["features"]["components"] == 1.0 and head["decision"] == "single"
    assert result.findings["volumes_ml"]["Femur"] == pytest.approx(
        box.sum() * math.prod(SPACING) / 1000, rel=0.05)


def test_a_unet_from_a_state_dict_gives_labels_of_the_source_shape(tmp_path, source):
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
            "strides": [2]}
    torch.manual_seed(0)
    raw = manifest("state_dict", values=(1, 2), network={"class": "UNet", "args": args},
                   inference=small_window(roi_size=[32, 32, 16]))
    engine = Engine(write_model(tmp_path, UNet(**args), raw), "cpu")

    first, second = engine.run([source]), engine.run([source])

    assert first.labels.shape == SHAPE and set(np.unique(first.labels)) <= {0, 1, 2}
    np.testing.assert_array_equal(first.labels, second.labels)  # loaded once, deterministic
    voxel_ml = math.prod(SPACING) / 1000
    assert first.findings["volumes_ml"] == {
        name: round(int((first.labels == value).sum()) * voxel_ml, 3)
        for value, name in ((1, "Femur"), (2, "Tibia"))}


def test_too_few_output_channels_for_the_labels(tmp_path, source):
    spec = write_model(tmp_path, Threshold(), manifest(values=(1, 3)))
    with pytest.raises(ModelError) as caught:
        Engine(spec, "cpu").run([source])
    assert caught.value.kind == "model"
    assert str(caught.value) == ("tiny@1.0: the network outputs 2 channels but the "
                                 "manifest's labels need 4")


def test_a_network_that_rejects_the_input_shape(tmp_path, source):
    two_channels_in = torch.nn.Conv3d(2, 2, kernel_size=1)
    spec = write_model(tmp_path, two_channels_in, manifest(inference=small_window()))
    with pytest.raises(ModelError) as caught:
        Engine(spec, "cpu").run([source])
    assert caught.value.kind == "model"
    message = str(caught.value)
    assert message.startswith("tiny@1.0: the network rejects an input of shape (1, 1, ")
    assert message.endswith("to have 2 channels, but got 1 channels instead")  # torch's line
    assert "\n" not in message


class NeedsCuda(torch.nn.Module):
    """A network exported with a tensor fixed on the GPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x], dim=1) + torch.zeros(1, device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a node without a GPU")
def test_a_network_that_needs_cuda_on_a_cpu_node_is_a_model_failure(tmp_path, source):
    spec = write_model(tmp_path, NeedsCuda(), manifest(inference=small_window()))
    with pytest.raises(ModelError) as caught:
        Engine(spec, "cpu").run([source])
    assert caught.value.kind == "model" and "rejects an input" in str(caught.value)


class Halves(torch.nn.Module):
    """:class:`Threshold` at half the resolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([torch.full_like(x[:, :1], 0.5), x[:, :1]], dim=1)
        return torch.nn.functional.avg_pool3d(logits, 2)


def test_an_output_of_another_size_than_the_input(tmp_path, source):
    spec = write_model(tmp_path, Halves(), manifest(inference=small_window()))
    with pytest.raises(ModelError, match=r"does not match its input \(1, 1, ") as caught:
        Engine(spec, "cpu").run([source])
    assert caught.value.kind == "model"


def test_out_of_gpu_memory_runs_the_series_on_the_cpu(tmp_path, source, monkeypatch):
    engine = Engine(write_model(tmp_path, Threshold(), manifest()), "cpu")
    expected = engine.run([source]).labels
    engine.device = torch.device("cuda")  # pretend the model lives on a GPU that fails
    real_infer, devices = engine.infer, []

    def infer(array, device=None):
        devices.append(device)
        if device.type == "cuda":
            raise ResourceError("out of GPU memory on cuda:0")
        return real_infer(array, device)

    monkeypatch.setattr(engine, "infer", infer)
    monkeypatch.setattr(engine, "_on_cpu", lambda: engine.network)
    result = engine.run([source])

    assert devices == [torch.device("cuda"), torch.device("cpu")] and result.device == "cpu"
    np.testing.assert_array_equal(result.labels, expected)


def test_a_resource_error_on_the_cpu_is_not_retried(tmp_path, source, monkeypatch):
    engine = Engine(write_model(tmp_path, Threshold(), manifest()), "cpu")

    def infer(array, device=None):
        raise ResourceError("out of memory")

    monkeypatch.setattr(engine, "infer", infer)
    with pytest.raises(ResourceError) as caught:
        engine.run([source])
    assert caught.value.kind == "resource"


def test_pick_device(monkeypatch):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected == pick_device().type
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(engine_module.torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(engine_module.torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
