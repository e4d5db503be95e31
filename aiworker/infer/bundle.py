"""Format ``monai_bundle``: a MONAI bundle laid out as the MONAI Model Zoo ships them.

::

    <bundle>/configs/inference.json (or .yaml/.yml)  the network (network_def, else network)
    <bundle>/configs/metadata.json                   network_data_format: the labels
    <bundle>/models/model.pt                         a state dict, or a checkpoint dict
    <bundle>/models/model.ts                         or TorchScript
    <bundle>/scripts/                                the bundle's own code (optional)

The network is built by MONAI's ``ConfigParser`` with the bundle's folder on ``sys.path``
(so a ``_target_`` of ``scripts.net.KneeNet`` resolves); the bundle's modules are
forgotten afterwards, so the next bundle's ``scripts`` is its own. ``models/model.pt`` may
be a plain state dict or a checkpoint saved by MONAI's ``CheckpointSaver`` or ignite's
``ModelCheckpoint`` (``{"model": state, "optimizer": ..., "epoch": ...}``): the model's
state is taken from the key the manifest names (``bundle.checkpoint_key``), else the key of
the network in the config's ``CheckpointLoader`` ``load_dict``, else ``model``; a file that
holds no such key is the state itself, as MONAI's ``CheckpointLoader`` reads it.

Where the manifest lists no labels, they come from ``metadata.json``'s segmentation output
(``channel_def``), coded by :mod:`aiworker.infer.labels`. Preprocessing is the manifest's
``input`` section, not the bundle's transforms.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiworker.infer.labels import coded_labels, missing_labels
from aiworker.infer.manifest import MANIFEST_NAME, Manifest, ModelError
from aiworker.infer.manifest_sections import Bundle

if TYPE_CHECKING:
    import torch

CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
WEIGHTS = ("model.pt", "model.ts")
NETWORK_KEYS = ("network_def", "network")
DEFAULT_CHECKPOINT_KEY = "model"  # what the zoo's train configs save the network under


def metadata_labels(bundle: Path) -> dict[int, str] | None:
    """Label value -> name of the bundle's segmentation output in ``configs/metadata.json``
    (``network_data_format.outputs.*.channel_def``, background left out); None without one."""
    try:
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text("utf-8"))
        outputs = metadata["network_data_format"]["outputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for output in outputs.values() if isinstance(outputs, dict) else []:
        channels = output.get("channel_def") if isinstance(output, dict) else None
        if isinstance(channels, dict) and output.get("format", "segmentation") == "segmentation":
            return {int(value): str(name) for value, name in channels.items()
                    if str(value).isdigit() and int(value) != 0}
    return None


def complete(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``raw`` with ``outputs.segmentation.labels`` from the bundle's ``metadata.json``
    where the manifest lists none (labels DICOM cannot code are left for :func:`check`)."""
    weights = raw.get("weights") or "."
    outputs = raw.get("outputs") if isinstance(raw.get("outputs"), dict) else {}
    segmentation = outputs.get("segmentation") or {}
    if not isinstance(weights, str) or not isinstance(segmentation, dict) \
            or "labels" in segmentation or outputs.get("classification"):
        return raw
    names = metadata_labels(folder / weights)
    labels = coded_labels(names, "metadata.json")[0] if names else []
    if not labels:
        return raw
    return dict(raw) | {"outputs": outputs | {"segmentation": segmentation | {"labels": labels}}}


def check(manifest: Manifest, folder: Path) -> list[str]:
    """One line per problem of the bundle folder: its config, its weights, and labels of
    ``metadata.json`` the manifest does not describe."""
    bundle, where = folder / manifest.weights_path, folder / MANIFEST_NAME
    if not bundle.is_dir():
        return [f"{where}: weights: the bundle folder {bundle} is missing"]
    problems = []
    if not any((bundle / "models" / name).is_file() for name in WEIGHTS):
        problems.append(f"{bundle / 'models'}: holds neither {' nor '.join(WEIGHTS)}")
    needs_config = (bundle / "models" / WEIGHTS[0]).is_file()  # TorchScript needs none
    if needs_config and config_path(bundle, manifest.bundle or Bundle()) is None:
        wanted = (manifest.bundle and manifest.bundle.config) or " / ".join(CONFIGS)
        problems.append(f"{bundle / 'configs'}: holds no {wanted}")
    names = metadata_labels(bundle)
    segmentation = manifest.outputs.segmentation
    if names and segmentation:
        given = {label.value for label in segmentation.labels}
        missing = {value: name for value, name in names.items() if value not in given}
        problems += missing_labels(missing, bundle / "configs" / "metadata.json", where)
    return problems


def config_path(bundle: Path, settings: Bundle) -> Path | None:
    """The bundle's inference config: the one the manifest names, else the first present."""
    names = (settings.config,) if settings.config else CONFIGS
    return next((bundle / "configs" / name for name in names
                 if (bundle / "configs" / name).is_file()), None)


def load_bundle(bundle: Path, settings: Bundle, mid: str) -> torch.nn.Module:
    """The bundle's network with its weights (``models/model.pt`` into the network its
    config builds, else ``models/model.ts``)."""
    from aiworker.infer.registry import jit_load, load_state

    weights = next((bundle / "models" / name for name in WEIGHTS
                    if (bundle / "models" / name).is_file()), None)
    if weights is None:
        raise ModelError(f"{mid}: {bundle / 'models'} holds neither {' nor '.join(WEIGHTS)}")
    if weights.suffix == ".ts":
        return jit_load(weights, mid)
    network, key = bundle_network(bundle, settings, mid)
    load_state(network, weights, mid, key)
    return network


def bundle_network(bundle: Path, settings: Bundle, mid: str) -> tuple[torch.nn.Module, str]:
    """The network the bundle's inference config defines, built by MONAI's ConfigParser
    with the bundle's own code importable, and the checkpoint key of its state."""
    import torch
    from monai.bundle import ConfigParser

    config = config_path(bundle, settings)
    if config is None:
        raise ModelError(f"{mid}: {bundle / 'configs'} holds no "
                         f"{settings.config or ' / '.join(CONFIGS)}")
    parser = ConfigParser()
    parser.read_config(config)
    parser["bundle_root"] = str(bundle)
    keys = (settings.network_key,) if settings.network_key else NETWORK_KEYS
    key = next((k for k in keys if k in parser), None)
    if key is None:
        raise ModelError(f"{mid}: {config} defines no {' nor '.join(keys)}")
    try:
        with bundle_imports(bundle):
            network = parser.get_parsed_content(key)
    except Exception as exc:  # MONAI raises many kinds for a bad config
        raise ModelError(f"{mid}: {config}: cannot build {key}: {exc}") from exc
    if not isinstance(network, torch.nn.Module):
        raise ModelError(f"{mid}: {config}: {key} is a {type(network).__name__}, "
                         "not a torch.nn.Module")
    checkpoint_key = settings.checkpoint_key or loader_key(parser.get(), key) \
        or DEFAULT_CHECKPOINT_KEY
    return network, checkpoint_key


def loader_key(config: Any, network_key: str) -> str | None:
    """The key under which the config's ``CheckpointLoader`` loads the network (its
    ``load_dict`` entry whose value refers to ``network_key``, or its only entry)."""
    if isinstance(config, dict):
        target = str(config.get("_target_", ""))
        load_dict = config.get("load_dict")
        if target.endswith("CheckpointLoader") and isinstance(load_dict, dict) and load_dict:
            refers = [k for k, v in load_dict.items()
                      if isinstance(v, str) and v.lstrip("$@").split(".")[0] in NETWORK_KEYS
                      + (network_key,)]
            return (refers or list(load_dict))[0]
        children: Any = config.values()
    elif isinstance(config, list):
        children = config
    else:
        return None
    return next((key for child in children if (key := loader_key(child, network_key))), None)


@contextlib.contextmanager
def bundle_imports(bundle: Path) -> Iterator[None]:
    """The bundle's folder first on ``sys.path`` while its config is parsed; afterwards its
    modules (those loaded from inside it, and any ``scripts`` package) are forgotten and
    whatever ``scripts`` was loaded before is put back."""
    def ours(name: str) -> bool:
        return name == "scripts" or name.startswith("scripts.")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    root = str(bundle.resolve())
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(root)
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None) or ""
            if ours(name) or file.startswith(root + "/"):
                del sys.modules[name]
        sys.modules.update(saved)
