"""A small nnU-Net v2 model built from a plans file, with random weights, for tests and
bench/nnunet.py: the results folder ``nnUNetv2_train`` would leave (``dataset.json``,
``plans.json``, ``fold_N/checkpoint_final.pth``), in a model folder with a ``model.yaml``.

The network is the one the plans define, built by nnU-Net's own trainer
(``nnUNetTrainer.build_network_architecture``), so the weights fit it as a trained model's
would. Its last layer is scaled up and its classes balanced on a z-scored input, so the
label map holds every label in sizeable parts and no voxel sits on a near-tie between two
classes (where the last bit of a sum would pick the label).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml

LABELS = {"background": 0, "femur": 1, "tibia": 2, "patella": 3}
DATASET = {"channel_names": {"0": "PD_FS"}, "labels": LABELS, "numTraining": 1,
           "file_ending": ".nii.gz"}
ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _resampling(is_seg: bool, order: int) -> dict[str, Any]:
    return {"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": None}


def plans(patch_size: list[int], spacing: list[float],
          features: list[int] | None = None) -> dict[str, Any]:
    """nnU-Net v2 plans with one configuration, ``3d_fullres``: a three-stage PlainConvUNet
    on ``patch_size`` (z, y, x) at ``spacing`` (z, y, x mm), z-score normalization."""
    architecture = copy.deepcopy(ARCHITECTURE)
    if features:
        architecture["arch_kwargs"]["features_per_stage"] = features
    return {
        "dataset_name": "Dataset901_KneeTiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": patch_size,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": patch_size, "median_image_size_in_voxels": patch_size,
            "spacing": spacing, "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": _resampling(False, 3),
            "resampling_fn_seg_kwargs": _resampling(True, 1),
            "resampling_fn_probabilities_kwargs": _resampling(False, 1),
            "architecture": architecture, "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 2400.0, "mean": 600.0, "median": 500.0, "min": 0.0,
            "percentile_00_5": 10.0, "percentile_99_5": 2000.0, "std": 300.0}}}


def write_results(results: Path, plan: dict[str, Any], folds: tuple[int, ...] = (0, 1),
                  dataset: dict[str, Any] | None = None) -> None:
    """An nnU-Net v2 results folder for ``plan``: dataset.json, plans.json and one
    checkpoint_final.pth of random weights per fold (seeded by the fold)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset = dataset or DATASET
    results.mkdir(parents=True)
    (results / "plans.json").write_text(json.dumps(plan, indent=2), encoding="utf-8")
    (results / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    manager = PlansManager(plan)
    configuration = manager.get_configuration("3d_fullres")
    classes = len(dataset["labels"])
    patch = configuration.patch_size
    for fold in folds:
        torch.manual_seed(fold)
        network = nnUNetTrainer.build_network_architecture(
            manager, configuration, len(dataset["channel_names"]), classes,
            enable_deep_supervision=False)
        with torch.no_grad():
            last = network.decoder.seg_layers[-1]
            last.weight *= 50
            last.bias.zero_()
            sample = torch.randn(1, len(dataset["channel_names"]), *patch)
            last.bias -= network.eval()(sample).mean(dim=(0, 2, 3, 4))
        (results / f"fold_{fold}").mkdir()
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres", "fold": fold},
                    "inference_allowed_mirroring_axes": (0, 1, 2)},
                   results / f"fold_{fold}" / "checkpoint_final.pth")


def manifest(**changes: Any) -> dict[str, Any]:
    """The manifest of the test model: results in ``results/``, folds 0 and 1, mirroring,
    channel PD_FS fed by role ``main``; labels left to dataset.json. ``nnunet`` in
    ``changes`` updates that section; other keys replace top-level ones."""
    raw: dict[str, Any] = {
        "name": "knee-nnunet", "version": "1.0.0", "format": "nnunet_v2",
        "nnunet": {"results": "results", "configuration": "3d_fullres", "folds": [0, 1],
                   "checkpoint": "checkpoint_final.pth", "mirroring": True,
                   "channels": {"PD_FS": "main"}},
        "intended_use": "Tests only; random weights; not a medical device."}
    raw["nnunet"] |= changes.pop("nnunet", {})
    return raw | changes


def write_model(folder: Path, plan: dict[str, Any], raw: dict[str, Any] | None = None,
                folds: tuple[int, ...] = (0, 1)) -> Path:
    """A model folder: ``model.yaml`` (``raw``, default :func:`manifest`) and the results
    folder ``results/``; returns the folder."""
    write_results(folder / "results", plan, folds)
    write_manifest(folder, raw or manifest())
    return folder


def write_manifest(folder: Path, raw: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
