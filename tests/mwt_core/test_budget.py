"""The kernel budget's parts: the validation slice (data.bundle.split_validation), the accuracy
guard's margin (training.guard_margin) and the Lagrange multiplier (training.KernelBudget)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mwt_core.compose import class_subset
from mwt_core.config import BUDGET_RELAX_STEP, TrainConfig
from mwt_core.data.bundle import DatasetBundle, InputSpec, split_validation
from mwt_core.data.datasets import DatasetError, load_dataset
from mwt_core.training import KernelBudget, guard_margin, steps_per_epoch, train

# Images per class; the last class has a single image.
SIZES = (100, 60, 39, 1)


def _bundle() -> DatasetBundle:
    """Each training image carries its own index in its pixels, so slices can be traced back."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(SIZES)])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    labels = labels[order]
    ids = torch.arange(len(labels))
    x = torch.stack([ids // 256, ids % 256], 1).to(torch.uint8).view(-1, 1, 1, 2)
    test_x = torch.full((8, 1, 1, 2), 255, dtype=torch.uint8)
    return DatasetBundle(name="ids", train_x=x, train_y=labels, test_x=test_x,
                         test_y=torch.zeros(8, dtype=torch.int64),
                         class_names=[str(c) for c in range(len(SIZES))],
                         spec=InputSpec(channels=1, size=2, mean=(0.5,), std=(0.5,)))


def _ids(x: torch.Tensor) -> set[int]:
    flat = x.view(-1, 2).long()
    return set((flat[:, 0] * 256 + flat[:, 1]).tolist())


def test_validation_slice_is_stratified_disjoint_and_fixed_by_the_seed() -> None:
    data = _bundle()
    fit, val = split_validation(data, 0.1, seed=0)
    assert val is not None
    # round(fraction * class size) per class; the class of one image gives none
    counts = torch.bincount(val.train_y, minlength=len(SIZES)).tolist()
    assert counts == [round(0.1 * n) if n > 1 else 0 for n in SIZES] == [10, 6, 4, 0]
    # the slice is the validation bundle's test split; the real test split is in neither
    assert torch.equal(val.test_x, val.train_x) and torch.equal(val.test_y, val.train_y)
    assert torch.equal(fit.test_x, data.test_x)
    fit_ids, val_ids = _ids(fit.train_x), _ids(val.train_x)
    assert not fit_ids & val_ids and fit_ids | val_ids == set(range(sum(SIZES)))
    # labels travel with their images
    labels = dict(zip(_ids(data.train_x), data.train_y.tolist(), strict=True))
    for part in (fit, val):
        ids = (part.train_x.view(-1, 2).long() * torch.tensor([256, 1])).sum(1).tolist()
        assert [labels[i] for i in ids] == part.train_y.tolist()
    # the same seed gives the same slice on every call; another seed another slice
    again = split_validation(data, 0.1, seed=0)[1]
    assert again is not None and _ids(again.train_x) == val_ids
    other = split_validation(data, 0.1, seed=1)[1]
    assert other is not None and _ids(other.train_x) != val_ids


def test_a_class_of_one_image_stays_in_training() -> None:
    fit, val = split_validation(_bundle(), 0.9, seed=0)
    assert val is not None
    assert (val.train_y == 3).sum() == 0 and (fit.train_y == 3).sum() == 1
    # every other class keeps at least one image to train on
    assert all((fit.train_y == c).sum() >= 1 for c in range(len(SIZES)))


def test_fraction_zero_or_too_small_gives_no_slice() -> None:
    data = _bundle()
    fit, val = split_validation(data, 0.0, seed=0)
    assert fit is data and val is None
    fit, val = split_validation(data, 0.001, seed=0)  # rounds to no image in any class
    assert val is None and torch.equal(fit.train_y, data.train_y)
    for bad in (-0.1, 1.0):
        with pytest.raises(DatasetError, match="validation fraction"):
            split_validation(data, bad, seed=0)


def test_guard_margin_is_the_guard_or_the_noise_of_a_small_slice() -> None:
    # a large slice: the guard's points
    assert guard_margin(1.0, 0.9, 10**7) == pytest.approx(0.01)
    assert guard_margin(5.0, 0.9, 10**7) == pytest.approx(0.05)
    # a small slice: two standard errors of a difference of two accuracies, the accuracy
    # smoothed by one image right and one wrong (9 of 10 right reads as 10 of 12)
    assert guard_margin(1.0, 0.9, 10) == pytest.approx(2 * math.sqrt(2 * (10 / 12) * (2 / 12) / 10))
    # the noise shrinks with the slice
    assert guard_margin(0.0, 0.9, 100) > guard_margin(0.0, 0.9, 1000) > 0
    # a perfect best on a small slice leaves more than one image's worth of room: one miss
    # among 58 images is not read as modularity costing accuracy
    assert guard_margin(1.0, 1.0, 58) > 1.5 / 58
    assert guard_margin(0.0, 0.5, 0) > 0  # no images: no division by zero


def test_an_epoch_drops_a_trailing_batch_smaller_than_half_a_batch() -> None:
    # a remainder of a few images would be a batch-norm batch of a few images: left out
    # (the order is reshuffled every epoch, so not the same images)
    assert steps_per_epoch(515, 128) == 4
    assert steps_per_epoch(512, 128) == 4
    # half a batch or more is a batch of its own
    assert steps_per_epoch(576, 128) == 5
    # a set smaller than one batch is one step, however small
    assert steps_per_epoch(40, 128) == 1
    assert steps_per_epoch(100, 128) == 1


def test_multiplier_grows_while_over_budget_and_never_goes_negative() -> None:
    budget = KernelBudget(0.3, rate=10.0, total_steps=10, device=torch.device("cpu"))
    assert budget.active and budget.step == pytest.approx(1.0)
    seen = []
    for _ in range(3):
        budget.update(torch.tensor(0.8))  # more kernels on than the budget
        seen.append(float(budget.multiplier))
    assert seen == pytest.approx([0.5, 1.0, 1.5])
    for _ in range(5):
        budget.update(torch.tensor(0.0))  # fewer: it shrinks, down to 0 and no further
        assert float(budget.multiplier) >= 0
    assert float(budget.multiplier) == 0.0
    # the penalty is the multiplier times the mean mask value, and carries a gradient
    budget.update(torch.tensor(0.8))
    mask = torch.full((2, 4), 0.5, requires_grad=True)
    penalty = budget.penalty([mask])
    assert float(penalty.detach()) == pytest.approx(0.5 * 0.5)
    penalty.backward()
    assert mask.grad is not None and torch.all(mask.grad > 0)


@pytest.mark.parametrize("target", [None, 1.0])
def test_no_budget_is_inactive(target: float | None) -> None:
    budget = KernelBudget(target, rate=10.0, total_steps=10, device=torch.device("cpu"))
    assert not budget.active
    budget.update(torch.tensor(0.9))
    assert float(budget.multiplier) == 0.0
    assert float(budget.penalty([torch.ones(2, 3)])) == 0.0


def test_relax_raises_the_target_by_the_relax_step_up_to_one() -> None:
    budget = KernelBudget(0.3, rate=1.0, total_steps=1, device=torch.device("cpu"))
    budget.relax()
    assert budget.target == pytest.approx(0.3 + BUDGET_RELAX_STEP) and budget.relaxed == 1
    budget.relax()
    assert budget.target == pytest.approx(0.3 + 2 * BUDGET_RELAX_STEP) and budget.relaxed == 2
    for _ in range(int(1 / BUDGET_RELAX_STEP) + 2):
        budget.relax()
    assert budget.target == 1.0 and not budget.binding  # loosened all the way: no budget left
    report = budget.report(0.42)
    assert report["target_krr"] == 0.3 and report["final_target"] == 1.0
    assert report["kernel_rate"] == 0.42 and report["relaxed"] == budget.relaxed
    # a checkpoint's budget state resumes as it was
    other = KernelBudget(0.3, rate=1.0, total_steps=1, device=torch.device("cpu"))
    other.load(budget.state())
    assert other.state() == budget.state()


def test_training_reports_validation_accuracy_and_the_budget_at_epoch_ends() -> None:
    data = load_dataset("synthetic", num_train=96, num_test=24, num_classes=3, seed=5)
    cfg = TrainConfig(width=0.125, epochs=1, batch_size=32, device="cpu", augment=False,
                      target_krr=0.5, val_fraction=0.25)
    reports = []
    result = train(cfg, data, progress=reports.append, progress_every=1)
    ends = [r for r in reports if r.test_acc is not None]
    assert len(ends) == 1 and ends[0].val_acc is not None and 0 <= ends[0].val_acc <= 1
    assert all(r.val_acc is None for r in reports if r.test_acc is None)  # epoch ends only
    assert all(r.kernel_budget == 0.5 for r in reports)
    assert result.history[0]["val_acc"] == ends[0].val_acc and result.val_acc is not None
    assert result.budget is not None and result.budget["target_krr"] == 0.5
    # no slice and no budget: nothing to report
    plain = train(TrainConfig(width=0.125, epochs=1, batch_size=32, device="cpu", augment=False,
                              target_krr=None, val_fraction=0.0), data)
    assert plain.val_acc is None and plain.history[0]["val_acc"] is None
    assert plain.history[0]["kernel_budget"] is None and plain.budget is not None
    assert plain.budget["target_krr"] is None


def test_the_target_falls_from_every_kernel_to_the_budget_over_the_warm_up() -> None:
    budget = KernelBudget(0.3, rate=1.0, total_steps=100, device=torch.device("cpu"), warmup=0.5)
    seen = []
    for _ in range(100):
        seen.append(budget.target)
        budget.update(torch.tensor(1.0))  # every kernel on: the multiplier only grows
    assert seen[0] == 1.0 and seen[25] == pytest.approx(0.65) and seen[50:] == [pytest.approx(0.3)] * 50
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False))
    assert float(budget.multiplier) > 0


@pytest.mark.slow
def test_a_set_whose_size_leaves_a_few_images_over_still_learns() -> None:
    """Five digits classes cut to 515 training images (4 batches of 128 and 3 over): trained
    with a last batch of 3 images, batch norm's statistics of that batch threw the standard
    network back every epoch and it ended near chance; without it, it learns the classes."""
    data = class_subset(load_dataset("digits", min_input_size=32), [5, 6, 7, 8, 9])
    data = replace(data, train_x=data.train_x[:515], train_y=data.train_y[:515])
    cfg = TrainConfig(arch="simcnn", width=0.25, epochs=30, modular=False, val_fraction=0.0,
                      seed=0, device="cpu")
    assert steps_per_epoch(len(data.train_y), cfg.batch_size) * cfg.batch_size < len(data.train_y)
    assert train(cfg, data).test_acc > 0.9
