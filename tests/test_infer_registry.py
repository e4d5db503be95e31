"""The model manifest, the registry and the three loaders (TorchScript, state dict, bundle)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from monai.networks.nets import UNet

import aiworker
from aiworker.infer.manifest import ManifestError, ModelError, parse_manifest
from aiworker.infer.registry import BUNDLED_MODELS, Registry, load_model, model_id

torch.set_num_threads(1)

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
             "strides": [2]}

VALID: dict[str, Any] = {
    "name": "knee-test",
    "version": "1.2.0",
    "format": "state_dict",
    "network": {"class": "UNet", "args": UNET_ARGS},
    "input": {
        "channels": ["sag_pd_fs"],
        "orientation": "LPS",
        "spacing_mm": [0.5, 0.5, 3.0],
        "normalization": {"method": "percentile", "lower": 1, "upper": 99},
        "size": [64, 64, 16],
    },
    "inference": {"roi_size": [32, 32, 16], "overlap": 0.25, "sw_batch_size": 2,
                  "amp_dtype": "float16", "time_limit_s": 60},
    "outputs": {
        "segmentation": {"labels": [
            {"value": 1, "name": "Femur", "color": [230, 216, 170],
             "category": {"value": "91723000", "scheme_designator": "SCT",
                          "meaning": "Anatomical structure"},
             "type": {"value": "71341001", "scheme_designator": "SCT", "meaning": "Femur"}},
            {"value": 2, "name": "Tibia", "color": [200, 180, 140],
             "category": {"value": "91723000", "scheme_designator": "SCT",
                          "meaning": "Anatomical structure"},
             "type": {"value": "12611008", "scheme_designator": "SCT", "meaning": "Tibia"}},
        ]},
        "classification": [{"name": "acl", "classes": ["intact", "torn"], "positive": "torn",
                            "threshold": 0.5,
                            "region": {"label": 1, "reference_label": 2,
                                       "features": ["volume_ml", "volume_ratio"],
                                       "mean": [1.0, 0.5], "scale": [0.5, 0.1],
                                       "coefficients": [-1.0, 2.0], "intercept": 0.1}}],
    },
    "intended_use": "Tests only; not a medical device.",
}

HERE = Path("models/knee-test/model.yaml")


def manifest_text(**changes: Any) -> str:
    """VALID as YAML with dotted-key changes applied (value None deletes the key)."""
    raw = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = raw
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return yaml.safe_dump(raw)


def problems(**changes: Any) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(manifest_text(**changes), HERE)
    return caught.value.problems


# ---------------------------------------------------------------- the manifest


def test_valid_manifest_round_trips():
    manifest = parse_manifest(manifest_text(), HERE)
    assert manifest.network is not None and manifest.network.class_name == "UNet"
    assert manifest.input.spacing_mm == [0.5, 0.5, 3.0]
    assert manifest.outputs.segmentation is not None
    assert [label.type.meaning for label in manifest.outputs.segmentation.labels] == \
        ["Femur", "Tibia"]
    assert manifest.outputs.classification[0].positive == "torn"
    assert manifest.weights_path == "model.pt"
    again = parse_manifest(manifest.to_yaml(), HERE)
    assert again == manifest
    assert yaml.safe_load(manifest.to_yaml())["network"]["class"] == "UNet"


def test_missing_name_is_named():
    assert problems(name=None) == [f"{HERE}: name: Field required"]


def test_unknown_format_lists_the_allowed_ones():
    (line,) = problems(format="onnx")
    assert line.startswith(f"{HERE}: format: ")
    assert "'torchscript', 'monai_bundle', 'state_dict' or 'nnunet_v2'" in line and "'onnx'" in line


def test_bad_colour_names_the_component():
    (line,) = problems(outputs__segmentation__labels__1__color=[255, 300, 0])
    assert line.startswith(f"{HERE}: outputs.segmentation.labels.1.color.1: ")
    assert "less than or equal to 255" in line and "300" in line


def test_colour_needs_three_components():
    (line,) = problems(outputs__segmentation__labels__0__color=[255, 0])
    assert line.startswith(f"{HERE}: outputs.segmentation.labels.0.color: ")
    assert "at least 3 items" in line and "[255, 0]" in line


def test_threshold_outside_0_to_1():
    (line,) = problems(outputs__classification__0__threshold=1.5)
    assert line.startswith(f"{HERE}: outputs.classification.0.threshold: ")
    assert "less than or equal to 1" in line and "1.5" in line


def test_label_values_must_be_unique():
    (line,) = problems(outputs__segmentation__labels__1__value=1)
    assert line.startswith(f"{HERE}: outputs.segmentation: ")
    assert "value must be unique; repeated: 1" in line


def test_unknown_key():
    assert problems(inference__tile=[8, 8, 8]) == \
        [f"{HERE}: inference.tile: unknown key (got [8, 8, 8])"]


def test_every_problem_gets_its_own_line():
    lines = problems(name=None, format="onnx", input__orientation="XYZ",
                     outputs__classification__0__positive="maybe")
    keys = sorted(line.split(": ")[1] for line in lines)
    assert keys == ["format", "input.orientation", "name", "outputs.classification.0"]
    assert any("must be as-acquired or three letters" in line for line in lines)
    assert any("positive class 'maybe' is not one of the classes" in line for line in lines)


def test_state_dict_needs_a_network():
    assert problems(network=None) == [
        f"{HERE}: network: format state_dict needs network (a MONAI class and its args)"]
    assert problems(format="torchscript") == [
        f"{HERE}: network: only for format state_dict, not torchscript"]


def test_network_inputs_match_the_roles():
    (line,) = problems(input__channels=["sag_pd_fs", "cor_pd_fs"])
    assert line == (f"{HERE}: network.args.in_channels: is 1 but input.channels "
                    "names 2 role(s) (got 1)")


def test_weights_stay_inside_the_model_folder():
    assert problems(weights="../other/model.pt") == [
        f"{HERE}: weights: must be a path inside the model folder (got '../other/model.pt')"]
    assert problems(weights="/etc/model.pt")[0].startswith(f"{HERE}: weights: ")


def test_orientation_codes():
    for good in ("LPS", "RAS", "PIL", "as-acquired"):
        assert parse_manifest(manifest_text(input__orientation=good), HERE)
    for bad in ("LRS", "LP", "lps"):
        assert problems(input__orientation=bad)[0].startswith(f"{HERE}: input.orientation: ")


# ---------------------------------------------------------------- the registry


def write_model(root: Path, folder: str, **fields: Any) -> Path:
    """A model folder under ``root`` whose manifest is VALID with ``fields`` replaced."""
    raw = copy.deepcopy(VALID) | fields
    path = root / folder
    path.mkdir(parents=True)
    (path / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_registry_finds_site_models_and_resolves_versions(tmp_path):
    site = tmp_path / "site"
    write_model(site, "a", version="1.2.0")
    write_model(site, "b", version="1.10.0")
    write_model(site, "c", name="other", version="0.1")
    registry = Registry(site, bundled_dir=tmp_path / "absent")
    assert registry.ids() == ["knee-test@1.10.0", "knee-test@1.2.0", "other@0.1"]
    assert model_id(registry.get("knee-test")) == "knee-test@1.10.0"
    spec = registry.get("knee-test@1.2.0")
    assert spec.folder == site / "a" and spec.weights == site / "a" / "model.pt"
    assert spec.manifest.input.channels == ["sag_pd_fs"]


def test_unknown_model_lists_the_available_ones(tmp_path):
    write_model(tmp_path, "a")
    registry = Registry(tmp_path, bundled_dir=tmp_path / "absent")
    for ref in ("knee-demo", "knee-test@9.9"):
        with pytest.raises(ModelError, match=r"available: knee-test@1\.2\.0\)") as caught:
            registry.get(ref)
        assert repr(ref) in str(caught.value) and caught.value.kind == "model"


def test_bundled_models_and_site_override(tmp_path):
    bundled = tmp_path / "bundled"
    write_model(bundled, "knee-test", intended_use="bundled")
    write_model(bundled, "older", version="0.9")
    only_bundled = Registry(None, bundled_dir=bundled)
    assert only_bundled.ids() == ["knee-test@0.9", "knee-test@1.2.0"]
    site = tmp_path / "site"
    write_model(site, "mine", intended_use="site")
    both = Registry(site, bundled_dir=bundled)
    assert both.get("knee-test@1.2.0").manifest.intended_use == "site"
    assert both.get("knee-test@0.9").folder == bundled / "older"


def test_bundled_models_live_in_the_package_and_may_be_absent():
    assert BUNDLED_MODELS == Path(aiworker.__file__).resolve().parent / "models"
    registry = Registry(None)
    assert all("@" in model for model in registry.ids())


def test_invalid_manifests_are_all_reported(tmp_path):
    write_model(tmp_path, "one", format="onnx")
    write_model(tmp_path, "two", version="bad version")
    with pytest.raises(ManifestError) as caught:
        Registry(tmp_path, bundled_dir=tmp_path / "absent")
    lines = caught.value.problems
    assert [line.split(": ")[:2] for line in lines] == [
        [str(tmp_path / "one" / "model.yaml"), "format"],
        [str(tmp_path / "two" / "model.yaml"), "version"],
    ]


def test_same_model_twice_in_one_folder(tmp_path):
    write_model(tmp_path, "a")
    write_model(tmp_path, "b")
    with pytest.raises(ManifestError) as caught:
        Registry(tmp_path, bundled_dir=tmp_path / "absent")
    assert caught.value.problems == [f"{tmp_path / 'b' / 'model.yaml'}: name, version: "
                                     f"knee-test@1.2.0 is also in {tmp_path / 'a'}"]


def test_missing_models_dir(tmp_path):
    with pytest.raises(ModelError, match="models_dir is not a folder"):
        Registry(tmp_path / "nowhere")


# ---------------------------------------------------------------- the loaders


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return UNet(**UNET_ARGS).eval()


def same_output(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    assert not loaded.training
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))


def spec_for(folder: Path, files: Any = None, **fields: Any):
    """The spec of a model written in ``folder``; ``files(folder)``, when given, writes its
    files before the registry (which checks a bundle's files) reads it."""
    write_model(folder.parent, folder.name, **fields)
    if files is not None:
        files(folder)
    return Registry(folder.parent, bundled_dir=folder / "absent").get(VALID["name"])


def test_torchscript_loader(tmp_path):
    original = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1).eval()
    folder = tmp_path / "ts"
    spec = spec_for(folder, format="torchscript", network=None, weights="net.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(original), str(folder / "net.ts"))
        loaded = load_model(spec, "cpu")
    same_output(original, loaded)


def test_state_dict_loader_with_a_monai_class(tmp_path):
    original = tiny_unet()
    folder = tmp_path / "sd"
    spec = spec_for(folder, network={"class": "monai.networks.nets.UNet", "args": UNET_ARGS})
    torch.save(original.state_dict(), folder / "model.pt")
    same_output(original, load_model(spec, torch.device("cpu")))


def test_state_dict_of_the_wrong_shape(tmp_path):
    folder = tmp_path / "sd"
    spec = spec_for(folder)
    wider = UNet(**(UNET_ARGS | {"channels": [4, 16]}))
    torch.save(wider.state_dict(), folder / "model.pt")
    with pytest.raises(ModelError, match="do not fit the network") as caught:
        load_model(spec)
    assert "size mismatch" in str(caught.value) and caught.value.kind == "model"


def test_state_dict_with_an_unknown_or_foreign_class(tmp_path):
    folder = tmp_path / "sd"
    spec = spec_for(folder, network={"class": "NoSuchNet", "args": {}})
    torch.save({}, folder / "model.pt")
    with pytest.raises(ModelError, match="no network class 'NoSuchNet'"):
        load_model(spec)
    folder = tmp_path / "other" / "foreign"
    spec = spec_for(folder, network={"class": "os.system", "args": {}})
    torch.save({}, folder / "model.pt")
    with pytest.raises(ModelError, match="not a MONAI class"):
        load_model(spec)


def test_missing_weights(tmp_path):
    spec = spec_for(tmp_path / "sd")
    with pytest.raises(ModelError, match=r"weights file .*model\.pt is missing"):
        load_model(spec)


def write_bundle(bundle: Path, original: torch.nn.Module) -> None:
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    network_def = {"_target_": "UNet", **UNET_ARGS}
    config = {"bundle_root": ".", "network_def": network_def,
              "network": "$@network_def.to(@device)"}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save(original.state_dict(), bundle / "models" / "model.pt")


def test_monai_bundle_loader(tmp_path):
    original = tiny_unet()
    folder = tmp_path / "bundle-model"
    spec = spec_for(folder, lambda f: write_bundle(f / "bundle", original),
                    format="monai_bundle", network=None, weights="bundle")
    same_output(original, load_model(spec, "cpu"))


def test_monai_bundle_with_torchscript(tmp_path):
    original = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1).eval()
    folder = tmp_path / "bundle-model"

    def files(folder: Path) -> None:
        (folder / "models").mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(original), str(folder / "models" / "model.ts"))

    spec = spec_for(folder, files, format="monai_bundle", network=None)
    same_output(original, load_model(spec, "cpu"))


def test_monai_bundle_without_weights(tmp_path):
    folder = tmp_path / "bundle-model"
    with pytest.raises(ManifestError) as caught:  # when the registry reads it: at start
        spec_for(folder, format="monai_bundle", network=None)
    assert caught.value.problems == [f"{folder / 'models'}: holds neither model.pt nor model.ts"]
