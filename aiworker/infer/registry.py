"""The model registry: find model folders, resolve ``name`` or ``name@version``, load one.

A model is a folder holding ``model.yaml`` (see :mod:`aiworker.infer.manifest`) and its
weights. The registry looks in two places, one folder level deep:

- the bundled models, ``aiworker/models/<folder>/model.yaml`` in the package;
- the site's ``models_dir``, ``<models_dir>/<folder>/model.yaml``.

A site model with the same ``name@version`` as a bundled one replaces it. A bare ``name``
resolves to the highest version present (versions compare by their numeric parts first).

Each format's own files are checked when the registry is made, beside the manifest
(:mod:`aiworker.infer.bundle`, :mod:`aiworker.infer.nnunet`), and fill what the manifest
leaves to them (labels, channels). :func:`load_model` returns a ``torch.nn.Module`` in eval
mode on the given device, from TorchScript, a state dict plus a MONAI network class, or a
MONAI bundle; an nnU-Net model is loaded by its predictor
(:class:`aiworker.infer.nnunet.NnunetModel`). Anything that stops a model from loading
raises :class:`ModelError` (``kind == "model"``).
"""

from __future__ import annotations

import functools
import importlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiworker.infer import bundle, nnunet
from aiworker.infer.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ModelError,
    load_manifest,
)
from aiworker.infer.manifest_sections import Bundle, Network

if TYPE_CHECKING:  # torch is imported where a model is loaded: the node's own process
    import torch  # checks manifests without it

BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"
FORMATS = {"monai_bundle": bundle, "nnunet_v2": nnunet}  # formats with files of their own


@dataclass(frozen=True)
class ModelSpec:
    """A model found by the registry: its checked manifest and the folder it lives in."""

    manifest: Manifest
    folder: Path

    @property
    def weights(self) -> Path:
        """The weights file (or, for a MONAI bundle, the bundle folder)."""
        return self.folder / self.manifest.weights_path


def model_id(spec: ModelSpec) -> str:
    """``name@version``: how jobs, job keys and results name the model."""
    return f"{spec.manifest.name}@{spec.manifest.version}"


class Registry:
    """The models available to this node, read once when the registry is made.

    Every manifest is checked up front; invalid ones raise one :class:`ManifestError`
    listing every problem of every manifest, so a bad model stops the node at start.
    """

    def __init__(self, models_dir: Path | None = None, bundled_dir: Path = BUNDLED_MODELS):
        if models_dir is not None and not models_dir.is_dir():
            raise ModelError(f"{models_dir}: models_dir is not a folder")
        specs: dict[str, ModelSpec] = {}
        problems: list[str] = []
        for root in (bundled_dir, models_dir):
            found: dict[str, ModelSpec] = {}
            for spec in _scan(root, problems):
                if model_id(spec) in found:
                    problems.append(f"{spec.folder / MANIFEST_NAME}: name, version: "
                                    f"{model_id(spec)} is also in {found[model_id(spec)].folder}")
                found[model_id(spec)] = spec
            specs |= found
        if problems:
            raise ManifestError(problems)
        self._specs = specs

    def ids(self) -> list[str]:
        """Every ``name@version`` available, sorted."""
        return sorted(self._specs)

    def get(self, ref: str) -> ModelSpec:
        """The model ``ref`` names: ``name@version`` exactly, or ``name``'s highest version."""
        name, _, version = ref.partition("@")
        if version:
            spec = self._specs.get(ref)
        else:
            versions = [s for s in self._specs.values() if s.manifest.name == name]
            spec = max(versions, key=lambda s: _version_key(s.manifest.version), default=None)
        if spec is None:
            available = ", ".join(self.ids()) or "none installed"
            raise ModelError(f"model {ref!r} not found (available: {available})")
        return spec


def _scan(root: Path | None, problems: list[str]) -> list[ModelSpec]:
    """The models in ``root``'s sub-folders; manifest problems are added to ``problems``."""
    if root is None or not root.is_dir():
        return []
    specs = []
    for path in sorted(root.glob(f"*/{MANIFEST_NAME}")):
        try:
            manifest = load_manifest(path, functools.partial(_complete, folder=path.parent))
        except ManifestError as exc:
            problems.extend(exc.problems)
            continue
        found = FORMATS[manifest.format].check(manifest, path.parent) \
            if manifest.format in FORMATS else []
        problems.extend(found)
        if not found:
            specs.append(ModelSpec(manifest, path.parent))
    return specs


def _complete(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``raw`` with what its format's own files say where the manifest is silent."""
    module = FORMATS.get(raw.get("format")) if isinstance(raw.get("format"), str) else None
    return module.complete(raw, folder) if module else raw


def _version_key(version: str) -> tuple:
    """Sort key: numeric parts compare as numbers and rank above text parts."""
    return tuple((1, int(part), "") if part.isdigit() else (0, 0, part)
                 for part in re.split(r"[.+-]", version))


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model's network with its weights, in eval mode on ``device``."""
    import torch

    loaders = {"torchscript": _load_torchscript, "state_dict": _load_state_dict,
               "monai_bundle": _load_bundle}
    if spec.manifest.format not in loaders:
        raise ModelError(f"{model_id(spec)}: format {spec.manifest.format} runs through its "
                         "own predictor, not as a torch.nn.Module")
    network = loaders[spec.manifest.format](spec)
    return network.to(torch.device(device)).eval()


def _load_torchscript(spec: ModelSpec) -> torch.nn.Module:
    return jit_load(_existing(spec.weights, model_id(spec)), model_id(spec))


def _load_state_dict(spec: ModelSpec) -> torch.nn.Module:
    assert spec.manifest.network is not None  # the manifest guarantees it for state_dict
    network = _build_network(spec.manifest.network, model_id(spec))
    load_state(network, _existing(spec.weights, model_id(spec)), model_id(spec))
    return network


def _load_bundle(spec: ModelSpec) -> torch.nn.Module:
    return bundle.load_bundle(spec.weights, spec.manifest.bundle or Bundle(), model_id(spec))


def _build_network(network: Network, mid: str) -> torch.nn.Module:
    """Instantiate the MONAI class the manifest names with its args."""
    cls = _network_class(network.class_name, mid)
    try:
        return cls(**network.args)
    except Exception as exc:  # a network's constructor validates its args in its own way
        raise ModelError(f"{mid}: cannot build {network.class_name} with args "
                         f"{network.args}: {exc}") from exc


def _network_class(name: str, mid: str) -> type[torch.nn.Module]:
    """A class from ``monai.networks.nets`` by short name, or a dotted path inside monai."""
    import torch

    module_name, _, attr = name.rpartition(".")
    if not module_name:
        module_name = "monai.networks.nets"
    if module_name.split(".")[0] != "monai":
        raise ModelError(f"{mid}: network class {name!r} is not a MONAI class "
                         "(use a name in monai.networks.nets or a dotted path in monai)")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"{mid}: no network class {name!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelError(f"{mid}: {name!r} is not a torch.nn.Module class")
    return cls


def load_state(network: torch.nn.Module, path: Path, mid: str, key: str | None = None
               ) -> None:
    """Load a state dict saved with ``torch.save`` into ``network``, strictly; with ``key``,
    a checkpoint dict holding the state under ``key`` (a file without that key is the state
    itself, as MONAI's CheckpointLoader reads it)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling fails in many ways
        raise ModelError(f"{mid}: cannot read weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"{mid}: {path} holds a {type(state).__name__}, not a state dict")
    if key is not None and key in state:
        state = state[key]
        if not isinstance(state, dict):
            raise ModelError(f"{mid}: {path}'s {key!r} is a {type(state).__name__}, "
                             "not a state dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{mid}: weights {path} do not fit the network "
                         f"(shape or key mismatch): {exc}") from exc


def jit_load(path: Path, mid: str) -> torch.nn.Module:
    """Load TorchScript; torch's deprecation notice for the format is not repeated in our
    log, since TorchScript is a format the manifest promises to read."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated",
                                    DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch.jit raises RuntimeError or ValueError for bad files
        raise ModelError(f"{mid}: cannot load TorchScript {path}: {exc}") from exc


def _existing(path: Path, mid: str) -> Path:
    if not path.is_file():
        raise ModelError(f"{mid}: weights file {path} is missing")
    return path
