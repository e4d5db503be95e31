"""Training batches for knee-demo: the pool of domain-randomised samples, refreshed from a
background process, and random patches of it (see :mod:`~.train`'s recipe)."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from aiworker.infer.manifest_sections import Input
from aiworker.models.knee_demo import data, randomise
from aiworker.models.knee_demo.labels import CLASSES

PATCH = (96, 96, 32)


def load_samples(seeds: list[int], spec: Input, workers: int, per_anatomy: int = 1,
                 settings: randomise.Randomisation = randomise.TRAINING
                 ) -> list[data.Sample]:
    """Randomised samples of the anatomies ``seeds``, ``per_anatomy`` each, in seed order."""
    n = len(seeds)
    with ProcessPoolExecutor(workers) as pool:
        return [sample for batch in pool.map(randomise.random_samples, seeds, [spec] * n,
                                             [per_anatomy] * n, [settings] * n)
                for sample in batch]


class Pool:
    """The training samples, refreshed from a background process in a fixed order: fresh
    anatomies replace the oldest samples, so the data never repeats for long (SynthSeg
    draws a new image every step) and the run stays reproducible."""

    def __init__(self, samples: list[data.Sample], spec: Input, next_seed: int,
                 per_anatomy: int, settings: randomise.Randomisation = randomise.TRAINING):
        self.padded = [_padded(sample) for sample in samples]
        self.next_seed, self.per_anatomy, self.oldest = next_seed, per_anatomy, 0
        self.spec, self.settings = spec, settings
        self.executor = ProcessPoolExecutor(1)
        self.pending = self._submit()

    def _submit(self):
        seed, self.next_seed = self.next_seed, self.next_seed + 1
        return self.executor.submit(randomise.random_samples, seed, self.spec,
                                    self.per_anatomy, self.settings)

    def refresh(self) -> None:
        """Swap the next anatomy's samples in for the oldest (waits if not yet drawn)."""
        fresh = self.pending.result()
        self.pending = self._submit()
        for sample in fresh:
            self.padded[self.oldest] = _padded(sample)
            self.oldest = (self.oldest + 1) % len(self.padded)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


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
