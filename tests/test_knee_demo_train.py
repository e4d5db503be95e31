"""knee-demo's training loop (issue 14): patches keep image and labels aligned, the pool is
refreshed in a fixed order with the settings asked for, a seed repeats a run, the best
weights are the ones kept, and the ACL head's logistic fit separates what it can. Small
synthetic volumes stand in for phantom samples, so a run takes seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import DynUNet

from aiworker.infer.manifest_sections import Input
from aiworker.models.knee_demo import batches, data, randomise, train
from aiworker.models.knee_demo.labels import ACL, CLASSES

SHAPE = (100, 100, 34)  # a little larger than one training patch


def _labelled_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels in slabs along x plus a random block; the image is labels / CLASSES, so any
    patch's image tells which labels it holds."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for value in range(1, CLASSES):
        labels[value * 8:value * 8 + 6] = value
    x, y = rng.integers(0, 60, 2)
    labels[x:x + 30, y:y + 30, 5:25] = rng.integers(1, CLASSES)
    return (labels / CLASSES).astype(np.float32)[None], labels


class FixedPool:
    """The pool ``train`` reads: padded samples, and refresh() counted."""

    def __init__(self, count: int):
        self.padded = [_labelled_volume(seed) for seed in range(count)]
        self.refreshed = 0

    def refresh(self) -> None:
        self.refreshed += 1


def test_patches_keep_image_and_labels_aligned_and_favour_structures():
    pool = FixedPool(3)
    images, labels = batches.patch_batch(pool.padded, 40, np.random.default_rng(0))
    assert images.shape == (40, 1, *batches.PATCH) and labels.shape == (40, 1, *batches.PATCH)
    for image, label in zip(images.numpy(), labels.numpy(), strict=True):
        # the intensity change is a positive scale and a shift: the image stays a rising
        # function of the label, mirror or not
        order = np.argsort(label.ravel(), kind="stable")
        assert np.all(np.diff(image.ravel()[order]) >= -1e-6)
    centred = sum(int((label > 0).mean() > 0.2) for label in labels.numpy())
    assert centred >= 20  # two thirds of the patches are centred on a structure


def test_a_seed_repeats_the_run_and_the_best_weights_are_returned(tmp_path: Path):
    torch.set_num_threads(2)
    validation = [data.Sample(0, *_labelled_volume(9), spacing=(1.0, 1.0, 3.0), torn=False)]
    schedule = train.Schedule(iterations=2, refresh_every=1, validate_every=1)
    runs = []
    for name in ("a", "b"):
        pool = FixedPool(2)
        (tmp_path / name).mkdir()
        network = train.train(pool, schedule, seed=3, out=tmp_path / name,
                              validation=validation)
        assert pool.refreshed == 2
        assert (tmp_path / name / "checkpoint.pt").is_file()
        best = torch.load(tmp_path / name / "best.pt")
        kept = network.state_dict()
        assert all(torch.equal(best[key], kept[key]) for key in best)
        runs.append(best)
    assert all(torch.allclose(runs[0][key], runs[1][key]) for key in runs[0])


def test_fine_tuning_starts_from_the_given_weights(tmp_path: Path):
    torch.manual_seed(11)
    start = DynUNet(**train.network_args())
    train.save_weights(start, tmp_path / "init.pt")
    schedule = train.Schedule(iterations=1, lr=1e-12, refresh_every=10, validate_every=1,
                              init=tmp_path / "init.pt")
    validation = [data.Sample(0, *_labelled_volume(4), spacing=(1.0, 1.0, 3.0), torn=True)]
    network = train.train(FixedPool(1), schedule, seed=0, out=tmp_path, validation=validation)
    initial = torch.load(tmp_path / "init.pt")
    after = network.state_dict()
    assert all(torch.allclose(initial[key].float(), after[key].float(), atol=1e-6)
               for key in initial)


def test_the_pool_refreshes_oldest_first_with_the_settings_asked_for():
    spec = Input.model_validate(train.input_spec())
    quick = randomise.Randomisation(real_share=1.0, elastic=0.0, bias=0.0, gamma=0.0,
                                    pixel_mm=(1.4, 1.5), slices=(12, 14))
    old = [data.Sample(seed=n, array=np.zeros((1, 4, 4, 4), np.float32),
                       labels=np.zeros((4, 4, 4), np.uint8), spacing=(1.0, 1.0, 3.0),
                       torn=False) for n in range(3)]
    pool = batches.Pool(old, spec, next_seed=data.TRAIN_SEEDS[0], per_anatomy=2,
                        settings=quick)
    try:
        pool.refresh()
    finally:
        pool.close()
    fresh = randomise.random_samples(data.TRAIN_SEEDS[0], spec, 2, quick)
    for slot, sample in zip((0, 1), fresh, strict=True):
        assert np.array_equal(pool.padded[slot][1][tuple(map(slice, sample.labels.shape))],
                              sample.labels)
    assert not pool.padded[2][1].any() and pool.oldest == 2 and pool.next_seed == \
        data.TRAIN_SEEDS[0] + 2


def test_the_logistic_fit_separates_separable_cases_on_the_right_feature():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    y = (x[:, 1] > 0).astype(float)
    weights = train.logistic_fit(x, y)
    assert abs(weights[2]) > 3 * max(abs(weights[1]), abs(weights[3])) and weights[2] > 0
    p = 1 / (1 + np.exp(-(np.column_stack([np.ones(80), x]) @ weights)))
    assert np.mean((p >= 0.5) == (y == 1)) >= 0.95  # the L2 penalty blurs the edge only


def test_the_acl_weight_scales_the_loss_of_acl_errors_only():
    """A prediction right everywhere but on the ACL costs more with --acl-weight 3 than
    with 1; one right everywhere but on the femur costs about the same."""
    labels = torch.from_numpy(_labelled_volume(0)[1][None, None, :, :8].astype(np.int64))

    def loss(wrong_class: int, acl_weight: float) -> float:
        predicted = labels.clone()
        predicted[labels == wrong_class] = 0
        logits = 20.0 * torch.nn.functional.one_hot(predicted[:, 0], CLASSES)
        logits = logits.permute(0, 4, 1, 2, 3).float()
        return float(train.loss_function(acl_weight)(logits, labels))

    assert loss(ACL, 3.0) > 1.5 * loss(ACL, 1.0)
    femur = 1  # STRUCTURES[1]
    assert abs(loss(femur, 3.0) - loss(femur, 1.0)) < 0.2 * loss(femur, 1.0)


def test_a_bfloat16_autocast_step_moves_the_float32_weights_as_a_float32_step_does(
        tmp_path: Path):
    torch.manual_seed(5)
    train.save_weights(DynUNet(**train.network_args()), tmp_path / "init.pt")
    validation = [data.Sample(0, *_labelled_volume(2), spacing=(1.0, 1.0, 3.0), torn=False)]
    steps = {}
    for amp in ("bfloat16", "none"):
        schedule = train.Schedule(iterations=1, lr=1e-3, refresh_every=10, validate_every=1,
                                  init=tmp_path / "init.pt", amp_dtype=amp)
        (tmp_path / amp).mkdir()
        network = train.train(FixedPool(1), schedule, seed=0, out=tmp_path / amp,
                              validation=validation)
        steps[amp] = network.state_dict()
    initial = torch.load(tmp_path / "init.pt")
    agree = total = 0
    for key, before in initial.items():
        if not before.is_floating_point():
            continue
        assert steps["bfloat16"][key].dtype == torch.float32
        moved = [torch.sign(steps[amp][key] - before) for amp in ("bfloat16", "none")]
        agree += int(((moved[0] == moved[1]) & (moved[1] != 0)).sum())
        total += int((moved[1] != 0).sum())
    assert total > 1000 and agree / total > 0.8  # Adam's first step: +-lr where grads agree
