"""MONAI bundles as the Model Zoo lays them out, built here: ``configs/inference.json`` (or
``.yaml``) whose network class lives in the bundle's own ``scripts/`` package,
``configs/metadata.json`` with the labels, and ``models/model.pt`` as ``CheckpointSaver``
writes it (``{"model": state, "optimizer": ..., "epoch": ...}``) or ``models/model.ts``;
and one such bundle through a running node, its SEG and SR arriving in a real Orthanc.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from helpers.tools import dciodvfy_errors, needs_dcmtk, wait_until
from test_e2e_orthanc import orthanc_results
from test_infer_e2e import send, wait_for_job

from aiworker.infer.engine import Engine
from aiworker.infer.manifest import ManifestError
from aiworker.infer.registry import Registry, load_model
from aiworker.infer.volume import LoadedSeries
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.store.layout import LABELS_FILE, SEG_FILE, SR_FILE

NET = '''import torch
from monai.networks.nets import UNet


class KneeNet(torch.nn.Module):
    """The zoo bundle's own network: a small UNet with {out} outputs."""

    def __init__(self, features: int = 4):
        super().__init__()
        self.unet = UNet(spatial_dims=3, in_channels=1, out_channels={out},
                         channels=(features, 2 * features), strides=(2,))

    def forward(self, x):
        return self.unet(x)
'''
CHANNELS = {"0": "background", "1": "femur", "2": "patella"}


def inference_config(load_key: str = "model") -> dict[str, Any]:
    """An inference.json as the zoo writes them (imports, device, network_def, network, a
    CheckpointLoader among the evaluator's handlers)."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".", "device": "$torch.device('cpu')",
        "network_def": {"_target_": "scripts.net.KneeNet", "features": 4},
        "network": "$@network_def.to(@device)",
        "handlers": [{"_target_": "CheckpointLoader",
                      "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {load_key: "@network"}, "map_location": "@device"},
                     {"_target_": "StatsHandler", "iteration_log": False}]}


def write_bundle(bundle: Path, out: int = 3, load_key: str = "model",
                 channels: dict[str, str] | None = None, seed: int = 0) -> torch.nn.Module:
    """A zoo bundle whose scripts/net.py defines KneeNet with ``out`` outputs; its weights
    saved as CheckpointSaver saves them (under ``load_key``). Returns the network."""
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "__init__.py").write_text("", encoding="utf-8")
    (bundle / "scripts" / "net.py").write_text(NET.replace("{out}", str(out)), "utf-8")
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference_config(load_key)),
                                                        encoding="utf-8")
    metadata = {"version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1}},
        "outputs": {"pred": {"type": "image", "format": "segmentation",
                             "num_channels": out, "channel_def": channels or CHANNELS}}}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    module_spec = importlib.util.spec_from_file_location(f"zoo_net_{id(bundle)}",
                                                         bundle / "scripts" / "net.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(seed)
    network = module.KneeNet(features=4).eval()
    optimizer = torch.optim.Adam(network.parameters())
    torch.save({load_key: network.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": 7}, bundle / "models" / "model.pt")
    return network


def write_manifest(folder: Path, name: str = "zoo-knee", **changes: Any) -> None:
    raw = {"name": name, "version": "1.0.0", "format": "monai_bundle",
           "input": {"channels": ["main"], "normalization": {"method": "zscore"}},
           "inference": {"roi_size": [16, 16, 8]},
           "intended_use": "Tests only; not a medical device."} | changes
    (folder / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")


def registry(root: Path) -> Registry:
    return Registry(root, bundled_dir=root / "no-bundled-models")


def same_output(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))


def test_a_zoo_bundle_with_its_own_scripts_and_a_checkpoint_saver_file(tmp_path):
    original = write_bundle(tmp_path / "zoo")
    write_manifest(tmp_path / "zoo")
    path_before = list(sys.path)
    spec = registry(tmp_path).get("zoo-knee")
    # the labels come from metadata.json, coded from DICOM's tables
    assert [(label.value, label.name, label.type.value, label.type.meaning)
            for label in spec.manifest.outputs.segmentation.labels] == \
        [(1, "femur", "71341001", "Femur"), (2, "patella", "64234005", "Patella")]
    same_output(original, load_model(spec, "cpu"))
    assert sys.path == path_before and "scripts" not in sys.modules
    assert not [name for name in sys.modules if name.startswith("scripts.")]

    engine = Engine(spec, "cpu")
    array = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    result = engine.run([_series(array)])
    assert set(result.findings["volumes_ml"]) == {"femur", "patella"}
    assert result.labels.shape == array.shape and result.labels.max() <= 2


def test_two_bundles_each_get_their_own_scripts(tmp_path):
    three = write_bundle(tmp_path / "a", out=3, seed=1)
    four = write_bundle(tmp_path / "b", out=4, channels=CHANNELS | {"3": "fibula"}, seed=2)
    write_manifest(tmp_path / "a", "zoo-a")
    write_manifest(tmp_path / "b", "zoo-b")
    models = registry(tmp_path)
    first, second = load_model(models.get("zoo-a")), load_model(models.get("zoo-b"))
    same_output(three, first)
    same_output(four, second)  # b's KneeNet, not a's: a's would not take b's weights
    assert type(first).__module__ == type(second).__module__ == "scripts.net"
    assert type(first) is not type(second)


def test_the_checkpoint_key_comes_from_the_config_or_the_manifest(tmp_path):
    by_config = write_bundle(tmp_path / "loader" / "bundle", load_key="net")
    write_manifest(tmp_path / "loader", "by-config", weights="bundle")
    same_output(by_config, load_model(registry(tmp_path).get("by-config")))

    by_manifest = write_bundle(tmp_path / "named", load_key="ema_model")
    config = inference_config()
    del config["handlers"]  # no CheckpointLoader to read the key from
    (tmp_path / "named" / "configs" / "inference.json").write_text(json.dumps(config))
    write_manifest(tmp_path / "named", "by-manifest", bundle={"checkpoint_key": "ema_model"})
    same_output(by_manifest, load_model(registry(tmp_path).get("by-manifest")))


def test_a_yaml_config_and_a_torchscript_model(tmp_path):
    bundle = tmp_path / "zoo"
    original = write_bundle(bundle)
    config = bundle / "configs" / "inference.json"
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(json.loads(
        config.read_text())), encoding="utf-8")
    config.unlink()
    write_manifest(bundle)
    same_output(original, load_model(registry(tmp_path).get("zoo-knee")))

    (bundle / "models" / "model.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(original), str(bundle / "models" / "model.ts"))
    same_output(original, load_model(registry(tmp_path).get("zoo-knee")))


def test_the_manifest_overrides_metadata_and_a_bad_bundle_fails_at_start(tmp_path):
    write_bundle(tmp_path / "zoo", channels=CHANNELS | {"2": "blob"})
    write_manifest(tmp_path / "zoo")
    with pytest.raises(ManifestError) as caught:
        registry(tmp_path)
    metadata = tmp_path / "zoo" / "configs" / "metadata.json"
    assert caught.value.problems == [
        f"{tmp_path / 'zoo' / 'model.yaml'}: outputs.segmentation.labels: no label for "
        f"{metadata}'s label 2 'blob' (DICOM PS3.16 has no SNOMED CT concept of that name: "
        "give its name, color, category and type)"]

    blob = {"value": 2, "name": "Blob", "color": [9, 9, 9],
            "category": {"value": "91723000", "meaning": "Anatomical structure"},
            "type": {"value": "71341001", "meaning": "Femur"}}
    femur = blob | {"value": 1, "name": "Thigh bone"}
    write_manifest(tmp_path / "zoo", outputs={"segmentation": {"labels": [femur, blob]}})
    spec = registry(tmp_path).get("zoo-knee")
    assert [label.name for label in spec.manifest.outputs.segmentation.labels] == \
        ["Thigh bone", "Blob"]

    (tmp_path / "zoo" / "configs" / "inference.json").unlink()
    (tmp_path / "zoo" / "models" / "model.pt").unlink()
    with pytest.raises(ManifestError) as caught:
        registry(tmp_path)
    assert caught.value.problems == [
        f"{tmp_path / 'zoo' / 'models'}: holds neither model.pt nor model.ts"]


def _series(array: np.ndarray) -> LoadedSeries:
    from helpers.infer import series_of

    return series_of(array, (1.0, 1.0, 3.0), np.eye(3))


@needs_dcmtk
def test_a_zoo_bundle_through_the_node_lands_in_orthanc(node_factory, orthanc_factory,
                                                        tmp_path):
    """No code change for the user: the zoo bundle folder and a manifest in
    ``inference.models_dir``; storescu -> node -> the SEG and SR in a real Orthanc, the SEG
    carrying metadata.json's labels and the label map the node wrote."""
    models = tmp_path / "models"
    write_bundle(models / "zoo-knee")
    write_manifest(models / "zoo-knee")
    orthanc = orthanc_factory({})
    node = node_factory(
        destinations={"pacs": {"kind": "dicom", "host": "127.0.0.1",
                               "port": orthanc.dicom_port, "ae_title": "ORTHANC"}},
        pipelines=[{"name": "knee", "rules": "config/rules/knee.yaml", "model": "zoo-knee",
                    "outputs": ["seg", "sr"], "send_to": ["pacs"]}],
        inference={"models_dir": str(models), "threads": 1}, dispatch={"interval_s": 0.1})
    study = write_study(tmp_path / "knee", StudyOptions(
        seed=18, rescan=False, derived=False, truth=False,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=48, slices=16)))
    send(node, study)
    job = wait_for_job(node, "done", 60)
    objects = wait_until(lambda: orthanc_results(orthanc, study.study_uid), 30,
                         "the SEG and SR in Orthanc")
    seg = objects["SEG"]
    assert [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
            for s in seg.SegmentSequence] == [("femur", "71341001"), ("patella", "64234005")]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(job["result_dir"]) / LABELS_FILE)))
    frames = seg.pixel_array.reshape(-1, *labels.shape[1:])
    voxels = dict.fromkeys((1, 2), 0)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        voxels[item.SegmentIdentificationSequence[0].ReferencedSegmentNumber] += \
            int(frame.astype(bool).sum())
    assert voxels == {value: int((labels == value).sum()) for value in (1, 2)}
    assert all(voxels.values())  # the random network labels some voxels of each
    assert objects["SR"].ContentSequence  # the SR names the bundle's findings
    for name in (SEG_FILE, SR_FILE):
        assert dciodvfy_errors(Path(job["result_dir"]) / name) == [], name
