"""Train knee-demo from a seed: ``python -m aiworker.models.knee_demo.train`` (or
``aiworker train-demo``).

Recipe (the model card says why):

1. Draw ``--cases`` training studies (seeds from :data:`~.data.TRAIN_SEEDS`) with the phantom
   generator and keep their sagittal PD FS series, preprocessed exactly as the manifest's
   ``input`` section says (the engine's own :func:`~aiworker.infer.preprocess.model_input`).
2. Train a MONAI DynUNet (anisotropic kernels: in-plane only at full resolution, 3-D below)
   with Dice + cross-entropy on random patches, two thirds of them centred on a structure
   drawn uniformly (so the small ACL, PCL and menisci are seen as often as the femur), with
   a left/right flip (a mirrored right knee is a left knee) and small intensity changes.
3. Segment ``--fit-cases`` further studies (seeds from :data:`~.data.FIT_SEEDS`) with the
   trained network through the engine, measure the segmented ACL region and fit the
   ACL-tear logistic model on those measurements.
4. Write ``model.pt`` and ``model.yaml`` into ``--out`` (default: this folder). The
   manifest keeps the ``gate:`` section of the one it replaces (or of the bundled one), so
   retraining does not drop the quality gate; ``python bench/gate.py`` re-derives its ranges
   for the new weights.

Everything random is seeded from ``--seed``; the same command on the same versions of
torch and MONAI reproduces the weights up to floating-point summation order.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.losses import DiceCELoss

from aiworker.infer import findings
from aiworker.infer.manifest import parse_manifest
from aiworker.infer.manifest_sections import Input, RegionClassifier
from aiworker.models.knee_demo import data
from aiworker.models.knee_demo.labels import ACL, CLASSES, PCL, manifest_labels

log = logging.getLogger("knee_demo.train")

HERE = Path(__file__).resolve().parent
NAME, VERSION = "knee-demo", "1.0.0"
PATCH = (96, 96, 32)
KERNELS = [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]
FILTERS = [8, 16, 32, 64, 128]
FEATURES = ["volume_ratio", "components", "largest_fraction", "extent_mm", "gap_mm",
            "mean_intensity"]
INTENDED_USE = ("Demonstration of the aiworker node on synthetic knee phantoms. Not a medical "
                "device: not for diagnostic use, not validated on real patients.")


def network_args() -> dict:
    """The DynUNet arguments, as model.yaml records them."""
    return {"spatial_dims": 3, "in_channels": 1, "out_channels": CLASSES,
            "kernel_size": KERNELS, "strides": STRIDES, "upsample_kernel_size": STRIDES[1:],
            "filters": FILTERS, "res_block": False}


def input_spec() -> dict:
    return {"channels": ["sag_pd_fs"], "orientation": "PIL", "spacing_mm": [1.0, 1.0, 3.0],
            "normalization": {"method": "percentile", "lower": 0.5, "upper": 99.5}}


def inference_spec() -> dict:
    return {"roi_size": [128, 128, 32], "overlap": 0.25, "sw_batch_size": 4,
            "amp_dtype": "bfloat16", "time_limit_s": 300}


def manifest(region: RegionClassifier | None, gate: dict | None = None) -> dict:
    """model.yaml as a mapping (``region`` None: a placeholder head, before fitting;
    ``gate`` the quality gate's section, None for none)."""
    head = {"name": "acl", "classes": ["intact", "torn"], "positive": "torn",
            "threshold": 0.5,
            "region": region.model_dump() if region else
            {"label": ACL, "reference_label": PCL, "features": FEATURES,
             "mean": [0.0] * len(FEATURES), "scale": [1.0] * len(FEATURES),
             "coefficients": [0.0] * len(FEATURES), "intercept": 0.0}}
    return {"name": NAME, "version": VERSION, "format": "state_dict", "weights": "model.pt",
            "network": {"class": "DynUNet", "args": network_args()},
            "input": input_spec(), "inference": inference_spec(),
            "outputs": {"segmentation": {"labels": manifest_labels(),
                                         "largest_component": False},
                        "classification": [head]},
            **({"gate": gate} if gate is not None else {}),
            "intended_use": INTENDED_USE}


def kept_gate(out: Path) -> dict | None:
    """The ``gate:`` section of ``out``'s model.yaml, else of the bundled one (None when
    neither has one)."""
    for path in (out / "model.yaml", HERE / "model.yaml"):
        if path.is_file():
            section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("gate")
            if section is not None:
                return section
    return None


def write_manifest(out: Path, region: RegionClassifier) -> Path:
    """Write ``out``/model.yaml for the fitted ``region``, keeping the quality gate of the
    manifest it replaces (:func:`kept_gate`); refuses a manifest the node would reject."""
    path = out / "model.yaml"
    gate = kept_gate(out)
    text = yaml.safe_dump(manifest(region, gate), sort_keys=False)
    parse_manifest(text, path)
    path.write_text(text, encoding="utf-8")
    if gate is not None:
        log.info("model.yaml keeps the previous quality gate; its ranges were derived for "
                 "the previous weights (python bench/gate.py re-derives them)")
    return path


# --- data -----------------------------------------------------------------------------------


def load_samples(seeds: list[int], workers: int) -> list[data.Sample]:
    spec = Input.model_validate(input_spec())
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(data.make_sample, seeds, [spec] * len(seeds)))


def _padded(sample: data.Sample) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, 0)] + [(0, max(0, p - n)) for p, n in zip(PATCH, sample.labels.shape,
                                                           strict=True)]
    return np.pad(sample.array, pad), np.pad(sample.labels, pad[1:])


def patch_batch(samples: list[tuple[np.ndarray, np.ndarray]], batch: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random patches: two thirds centred on a structure drawn uniformly."""
    images, labels = [], []
    for _ in range(batch):
        array, label = samples[int(rng.integers(len(samples)))]
        centre = _centre(label, rng)
        start = [int(min(max(c - p // 2, 0), n - p))
                 for c, p, n in zip(centre, PATCH, label.shape, strict=True)]
        window = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
        image, target = array[(slice(None), *window)], label[window]
        if rng.random() < 0.5:  # left/right mirror: a right knee becomes a left one
            image, target = image[..., ::-1], target[..., ::-1]
        image = image * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
        images.append(np.ascontiguousarray(image, dtype=np.float32))
        labels.append(np.ascontiguousarray(target[None], dtype=np.int64))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def _centre(label: np.ndarray, rng: np.random.Generator) -> list[int]:
    if rng.random() < 2 / 3:
        value = int(rng.integers(1, CLASSES))
        where = np.flatnonzero(label.ravel() == value)
        if len(where):
            return list(np.unravel_index(int(where[rng.integers(len(where))]), label.shape))
    return [int(rng.integers(n)) for n in label.shape]


# --- training -------------------------------------------------------------------------------


def train(samples: list[data.Sample], iterations: int, seed: int, out: Path,
          batch: int = 2) -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = training_device()
    network = DynUNet(**network_args()).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: (1 - i / iterations) ** 0.9)
    loss_of = DiceCELoss(to_onehot_y=True, softmax=True)
    padded = [_padded(sample) for sample in samples]
    network.train()
    started, running = time.monotonic(), []
    for iteration in range(1, iterations + 1):
        images, labels = patch_batch(padded, batch, rng)
        loss = loss_of(network(images.to(device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running.append(float(loss.detach()))
        if iteration % 50 == 0 or iteration == iterations:
            log.info("iteration %d/%d loss %.4f (%.0f s)", iteration, iterations,
                     float(np.mean(running)), time.monotonic() - started)
            running = []
        if iteration % 250 == 0:
            save_weights(network, out / "checkpoint.pt")
    return network.eval()


def training_device() -> torch.device:
    """A CUDA GPU when torch sees one (much faster), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_weights(network: torch.nn.Module, path: Path) -> None:
    """The state dict with every tensor on the CPU, so any machine can load it."""
    torch.save({key: value.detach().cpu() for key, value in network.state_dict().items()},
               path)


def fit_classifier(network: torch.nn.Module, seeds: list[int], workers: int
                   ) -> tuple[RegionClassifier, list[tuple[float, bool]]]:
    """Segment the fitting cases and fit the logistic ACL-tear model on their ACL
    measurements; also returns (probability, torn) of each fitting case."""
    from monai.inferers import sliding_window_inference

    settings = inference_spec()
    device = next(network.parameters()).device
    rows, torn = [], []
    for sample in load_samples(seeds, workers):
        with torch.inference_mode():
            logits = sliding_window_inference(torch.from_numpy(sample.array[None]).to(device),
                                              settings["roi_size"], settings["sw_batch_size"],
                                              network, settings["overlap"], mode="gaussian")
        labels = np.argmax(logits[0].cpu().numpy(), axis=0).astype(np.uint8)
        region = RegionClassifier(label=ACL, reference_label=PCL, features=FEATURES,
                                  mean=[0.0] * len(FEATURES), scale=[1.0] * len(FEATURES),
                                  coefficients=[0.0] * len(FEATURES), intercept=0.0)
        measured = findings.region_features(labels, sample.array[0], sample.spacing, region)
        rows.append([measured[name] for name in FEATURES])
        torn.append(sample.torn)
    x, y = np.array(rows), np.array(torn, dtype=float)
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    weights = logistic_fit((x - mean) / scale, y)
    region = RegionClassifier(label=ACL, reference_label=PCL, features=FEATURES,
                              mean=mean.round(6).tolist(), scale=scale.round(6).tolist(),
                              coefficients=weights[1:].round(6).tolist(),
                              intercept=round(float(weights[0]), 6))
    fitted = [(findings.probability(dict(zip(FEATURES, row, strict=True)), region), bool(t))
              for row, t in zip(rows, torn, strict=True)]
    return region, fitted


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 0.1, steps: int = 50) -> np.ndarray:
    """Intercept and coefficients of an L2-penalized logistic regression (Newton steps)."""
    design = np.column_stack([np.ones(len(x)), x])
    weights = np.zeros(design.shape[1])
    penalty = l2 * np.eye(design.shape[1])
    penalty[0, 0] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(design @ weights, -50, 50)))
        gradient = design.T @ (p - y) + penalty @ weights
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty
        weights -= np.linalg.solve(hessian, gradient)
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=160)
    parser.add_argument("--fit-cases", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # tiny gradients and Adam moments would run ~4x slower
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    train_seeds = [data.TRAIN_SEEDS[0] + 1000 * args.seed + i for i in range(args.cases)]
    samples = load_samples(train_seeds, args.workers)
    log.info("%d training cases ready (%.0f s)", len(samples), time.monotonic() - started)
    network = train(samples, args.iterations, args.seed, args.out)
    save_weights(network, args.out / "model.pt")
    fit_seeds = [data.FIT_SEEDS[0] + i for i in range(args.fit_cases)]
    region, fitted = fit_classifier(network, fit_seeds, args.workers)
    write_manifest(args.out, region)
    (args.out / "checkpoint.pt").unlink(missing_ok=True)
    correct = sum((p >= 0.5) == torn for p, torn in fitted)
    log.info("ACL head on its %d fitting cases: %d correct; total %.1f min", len(fitted),
             correct, (time.monotonic() - started) / 60)


if __name__ == "__main__":
    main()
