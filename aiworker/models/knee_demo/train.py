"""Train knee-demo from a seed: ``python -m aiworker.models.knee_demo.train`` (or
``aiworker train-demo``).

Recipe (the model card says why):

1. Draw a pool of ``--cases`` domain-randomised training samples (SynthSeg-style,
   :mod:`~.randomise`: anatomies from :data:`~.data.TRAIN_SEEDS` with widened flexion,
   effusion and size, each imaged ``--per-anatomy`` times with a random contrast or the
   real PD FS, random obliquity, slice thickness, spacing, count and coverage, pixel size,
   SNR, bias and an elastic warp), preprocessed exactly as the manifest's ``input`` section
   says (the engine's own :func:`~aiworker.infer.preprocess.model_input`). While training,
   one background process draws fresh anatomies and every ``--refresh-every`` iterations
   they replace the pool's oldest samples (in a fixed order, so the run stays reproducible).
2. Train a MONAI DynUNet (anisotropic kernels: in-plane only at full resolution, 3-D below)
   with Dice + cross-entropy (the ACL's term weighted ``--acl-weight``), the forward pass
   autocast to bfloat16 (``--amp-dtype``), on random patches, two thirds of them centred
   on a structure drawn uniformly (so the small ACL, PCL and menisci are seen as often as
   the femur), with a left/right flip (a mirrored right knee is a left knee) and small
   intensity changes.
   ``--init`` starts from earlier weights (fine-tuning) instead of random ones. Every
   ``--validate-every`` iterations the network segments a fixed validation set and the best
   weights so far are kept (``best.pt``), so a run cut off still leaves them;
   ``--max-minutes`` ends the training early with the best weights.
3. Segment ``--fit-cases`` further studies (seeds from :data:`~.data.FIT_SEEDS`: real PD FS
   contrast, widened anatomy and prescriptions) with the trained network, measure the
   segmented ACL region and fit the ACL-tear logistic model on those measurements
   (``--fit-only`` refits it for the weights already in ``--out``).
4. Write ``model.pt`` and ``model.yaml`` into ``--out`` (default: this folder). The
   manifest keeps the ``gate:`` section of the one it replaces (or of the bundled one), so
   retraining does not drop the quality gate; ``python bench/gate.py`` re-derives its ranges
   for the new weights.

The defaults are the one-command recipe of the model card (seed 0: 68.7 minutes on 2 CPU
cores). Everything random is seeded from ``--seed``; the same command on the same versions of
torch and MONAI reproduces the weights up to floating-point summation order (without
``--max-minutes``, which depends on the machine's speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.losses import DiceCELoss

from aiworker.infer import findings
from aiworker.infer.manifest import parse_manifest
from aiworker.infer.manifest_sections import Input, RegionClassifier
from aiworker.models.knee_demo import data, randomise
from aiworker.models.knee_demo.batches import Pool, load_samples, patch_batch
from aiworker.models.knee_demo.labels import ACL, CLASSES, PCL, manifest_labels

log = logging.getLogger("knee_demo.train")

HERE = Path(__file__).resolve().parent
NAME, VERSION = "knee-demo", "2.2.0"
KERNELS = [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]
FILTERS = [8, 16, 32, 64, 128]
FEATURES = ["volume_ratio", "components", "largest_fraction", "extent_mm", "gap_mm",
            "mean_intensity"]
VALIDATION_SEEDS = range(300_000, 300_006)  # best-weights selection only
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


# --- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How long and how to train (the defaults: the model card's one-command recipe)."""

    iterations: int = 4500
    lr: float = 3e-3
    batch: int = 2
    refresh_every: int = 10
    validate_every: int = 500
    max_minutes: float | None = None
    init: Path | None = None
    acl_weight: float = 3.0  # the ACL's weight in the loss, the other classes' being 1
    amp_dtype: str = "bfloat16"  # autocast of the forward pass ("none": float32 throughout)


RECIPE = Schedule()  # the one-command recipe: the command line's defaults


def loss_function(acl_weight: float) -> DiceCELoss:
    """Dice + cross-entropy over the classes, the ACL's term weighted by ``acl_weight``
    (the smallest structure, and the one the tear decision reads)."""
    weight = torch.ones(CLASSES)
    weight[ACL] = acl_weight
    return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)


def train(pool: Pool, schedule: Schedule, seed: int, out: Path,
          validation: list[data.Sample]) -> torch.nn.Module:
    """Train the network on ``pool``; returns it with the weights that segmented
    ``validation`` best (also kept in ``out``/best.pt; the latest in checkpoint.pt)."""
    from monai.networks.nets import DynUNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = training_device()
    network = DynUNet(**network_args()).to(device)
    if schedule.init is not None:
        network.load_state_dict(torch.load(schedule.init, map_location=device))
        log.info("starting from the weights in %s", schedule.init)
    iterations = schedule.iterations
    optimizer = torch.optim.AdamW(network.parameters(), lr=schedule.lr, weight_decay=1e-5)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: (1 - i / iterations) ** 0.9)
    loss_of = loss_function(schedule.acl_weight).to(device)
    amp = schedule.amp_dtype != "none"
    dtype = getattr(torch, schedule.amp_dtype) if amp else None
    started, running, best = time.monotonic(), [], -1.0
    for iteration in range(1, iterations + 1):
        network.train()
        images, labels = patch_batch(pool.padded, schedule.batch, rng)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = network(images.to(device))
        loss = loss_of(logits.float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        running.append(float(loss.detach()))
        if iteration % schedule.refresh_every == 0:
            pool.refresh()
        if iteration % 50 == 0 or iteration == iterations:
            log.info("iteration %d/%d loss %.4f (%.0f s)", iteration, iterations,
                     float(np.mean(running)), time.monotonic() - started)
            running = []
        out_of_time = (schedule.max_minutes is not None
                       and time.monotonic() - started > 60 * schedule.max_minutes)
        if iteration % schedule.validate_every == 0 or iteration == iterations or out_of_time:
            save_weights(network, out / "checkpoint.pt")
            score = validation_dice(network, validation)
            log.info("iteration %d: validation mean Dice %.4f (best %.4f)", iteration, score,
                     max(best, score))
            if score > best:
                best = score
                save_weights(network, out / "best.pt")
        if out_of_time:
            log.info("--max-minutes reached at iteration %d: keeping the best weights",
                     iteration)
            break
    network.load_state_dict(torch.load(out / "best.pt", map_location=device))
    return network.eval()


def segment(network: torch.nn.Module, array: np.ndarray) -> np.ndarray:
    """The network's labels for one (1, x, y, z) input, as the engine's sliding window."""
    from monai.inferers import sliding_window_inference

    settings = inference_spec()
    device = next(network.parameters()).device
    network.eval()
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(array[None]).to(device),
                                          settings["roi_size"], settings["sw_batch_size"],
                                          network, settings["overlap"], mode="gaussian")
    return np.argmax(logits[0].cpu().numpy(), axis=0).astype(np.uint8)


def validation_dice(network: torch.nn.Module, samples: list[data.Sample]) -> float:
    """Mean Dice over the structures and ``samples`` (a structure absent from both the
    truth and the result counts 1)."""
    scores = []
    for sample in samples:
        labels = segment(network, sample.array)
        for value in range(1, CLASSES):
            a, b = labels == value, sample.labels == value
            total = int(a.sum()) + int(b.sum())
            scores.append(2.0 * int((a & b).sum()) / total if total else 1.0)
    return float(np.mean(scores))


def training_device() -> torch.device:
    """A CUDA GPU when torch sees one (much faster), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_weights(network: torch.nn.Module, path: Path) -> None:
    """The state dict with every tensor on the CPU, so any machine can load it."""
    torch.save({key: value.detach().cpu() for key, value in network.state_dict().items()},
               path)


def fit_classifier(network: torch.nn.Module, seeds: list[int], workers: int
                   ) -> tuple[RegionClassifier, list[tuple[float, bool]]]:
    """Segment the fitting cases (real PD FS contrast, widened anatomy and prescriptions:
    :data:`~.randomise.REAL_PD_FS`) and fit the logistic ACL-tear model on their ACL
    measurements; also returns (probability, torn) of each fitting case."""
    rows, torn = [], []
    placeholder = RegionClassifier(label=ACL, reference_label=PCL, features=FEATURES,
                                   mean=[0.0] * len(FEATURES), scale=[1.0] * len(FEATURES),
                                   coefficients=[0.0] * len(FEATURES), intercept=0.0)
    spec = Input.model_validate(input_spec())
    for sample in load_samples(seeds, spec, workers, settings=randomise.REAL_PD_FS):
        labels = segment(network, sample.array)
        measured = findings.region_features(labels, sample.array[0], sample.spacing,
                                            placeholder)
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
    parser.add_argument("--cases", type=int, default=160, help="samples in the pool")
    parser.add_argument("--per-anatomy", type=int, default=2)
    parser.add_argument("--real-share", type=float, default=0.7,
                        help="share of samples with the real PD FS contrast")
    parser.add_argument("--fit-cases", type=int, default=80)
    parser.add_argument("--iterations", type=int, default=RECIPE.iterations)
    parser.add_argument("--lr", type=float, default=RECIPE.lr)
    parser.add_argument("--refresh-every", type=int, default=RECIPE.refresh_every)
    parser.add_argument("--validate-every", type=int, default=RECIPE.validate_every)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--init", type=Path, default=None, help="weights to start from")
    parser.add_argument("--acl-weight", type=float, default=RECIPE.acl_weight,
                        help="the ACL's weight in the loss (the other classes weigh 1)")
    parser.add_argument("--amp-dtype", choices=["bfloat16", "none"], default=RECIPE.amp_dtype,
                        help="autocast of the training forward pass (bfloat16: ~1.6x faster "
                             "a step on a CPU with AVX-512 BF16; the weights stay float32)")
    parser.add_argument("--fit-only", action="store_true",
                        help="refit the ACL head for the weights in --out")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny gradients and Adam moments would run ~4x slower
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fit_only:
        network = load_network(args.out / "model.pt")
    else:
        network = train_network(args)
        save_weights(network, args.out / "model.pt")
    fit_seeds = [data.FIT_SEEDS[0] + i for i in range(args.fit_cases)]
    region, fitted = fit_classifier(network, fit_seeds, args.workers)
    write_manifest(args.out, region)
    correct = sum((p >= 0.5) == torn for p, torn in fitted)
    log.info("ACL head on its %d fitting cases: %d correct; total %.1f min", len(fitted),
             correct, (time.monotonic() - started) / 60)


def train_network(args: argparse.Namespace) -> torch.nn.Module:
    """Step 1 and 2 of the recipe: the pool, its refreshing, the training."""
    started = time.monotonic()
    anatomies = -(-args.cases // args.per_anatomy)
    first = data.TRAIN_SEEDS[0] + 1000 * args.seed
    spec = Input.model_validate(input_spec())
    settings = dataclasses.replace(randomise.TRAINING, real_share=args.real_share)
    samples = load_samples(list(range(first, first + anatomies)), spec, args.workers,
                           args.per_anatomy, settings)
    validation = (load_samples(list(VALIDATION_SEEDS[:3]), spec, args.workers)
                  + load_samples(list(VALIDATION_SEEDS[3:]), spec, args.workers,
                                 settings=randomise.REAL_PD_FS))
    log.info("%d training samples ready (%.0f s)", len(samples), time.monotonic() - started)
    pool = Pool(samples, spec, first + anatomies, args.per_anatomy, settings)
    schedule = Schedule(iterations=args.iterations, lr=args.lr,
                        refresh_every=args.refresh_every, validate_every=args.validate_every,
                        max_minutes=args.max_minutes, init=args.init,
                        acl_weight=args.acl_weight, amp_dtype=args.amp_dtype)
    try:
        return train(pool, schedule, args.seed, args.out, validation)
    finally:
        pool.close()


def load_network(path: Path) -> torch.nn.Module:
    from monai.networks.nets import DynUNet

    network = DynUNet(**network_args()).to(training_device())
    network.load_state_dict(torch.load(path, map_location=training_device()))
    return network.eval()


if __name__ == "__main__":
    main()
