"""Modularization (DESIGN §1.3) and its metrics (§1.4), checked two ways.

1. On an activity matrix designed by hand (``collect_activity`` is replaced), whose
   module masks, KRR, cohesion and coupling were worked out on paper below: every
   expected value is distinct and strictly inside (0, 1), so a metric that returns a
   constant, compares the wrong pairs or forgets to restrict to the kept kernels fails.
2. On a model MwT-trained on real digits, against a plain-Python brute force written
   from the DESIGN text (exact fractions for the threshold, per-pair loops for the
   Jaccard means), to 1e-6 (the code computes in float32).
"""

from fractions import Fraction

import pytest
import torch

import mwt_core.modularize as mz
from mwt_core.data.datasets import DatasetBundle, InputSpec
from mwt_core.models import create_model
from mwt_core.modularize import Modularization, _pairwise_jaccard, modularize, module_masks

TAU_STEP = Fraction(1, 20)  # DESIGN §1.3: tau is lowered in steps of 0.05


def test_module_masks_threshold_and_fallback():
    freq = torch.tensor([[0.95, 0.5, 0.9], [0.3, 0.2, 0.1], [0.52, 0.50, 0.49]])
    keep = module_masks(freq, 0.9)
    assert keep[0].tolist() == [True, False, True]
    # Class 1 keeps nothing at 0.9: tau drops in 0.05 steps until 0.3 keeps kernel 0.
    assert keep[1].tolist() == [True, False, False]
    # Class 2: 0.85, 0.80, ... 0.50 is the first tau keeping something; it keeps every
    # kernel at >= 0.50 (not only the most frequent one), and not the 0.49 one.
    assert keep[2].tolist() == [True, True, False]


def test_jaccard():
    a = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    jac = _pairwise_jaccard(a, b)
    assert jac[0, 0] == pytest.approx(0.5)
    assert jac[1, 1] == 1.0  # two empty masks are identical
    assert jac[0, 1] == 0.0


# ------------------------------------------------------------------ brute force (DESIGN text)


def _jaccard(a: int, b: int) -> float:
    """Jaccard index of two kernel sets held as bit sets; two empty sets are identical."""
    union = (a | b).bit_count()
    return (a & b).bit_count() / union if union else 1.0


def _bits(flags) -> int:
    return sum(1 << i for i, f in enumerate(flags) if f)


def _mean_pairwise(sets: list[int]) -> float:
    """Mean Jaccard over ordered pairs i != j (the same as over unordered pairs)."""
    vals = [_jaccard(a, b) for i, a in enumerate(sets) for j, b in enumerate(sets) if i != j]
    return sum(vals) / len(vals)


def _brute_force(activity: list[torch.Tensor], labels: torch.Tensor, num_classes: int, tau: float):
    """Modularization and metrics by the letter of DESIGN §1.3/§1.4, with Python loops."""
    labels = labels.tolist()
    samples = [[i for i, y in enumerate(labels) if y == c] for c in range(num_classes)]
    # masks[c][l]: list of bools over layer l's kernels.
    masks: list[list[list[bool]]] = [[] for _ in range(num_classes)]
    for act in activity:
        rows = act.tolist()
        for c in range(num_classes):
            n = len(samples[c])
            counts = [sum(rows[i][k] for i in samples[c]) for k in range(act.shape[1])]
            t = Fraction(str(tau))
            keep = [Fraction(n_k, n) >= t for n_k in counts]
            while not any(keep) and t > 0:
                t = max(Fraction(0), t - TAU_STEP)
                keep = [Fraction(n_k, n) >= t for n_k in counts]
            masks[c].append(keep)
    flat = [[k for layer in masks[c] for k in layer] for c in range(num_classes)]
    total = len(flat[0])
    krr = [sum(f) / total for f in flat]
    act_rows = torch.cat(activity, 1).tolist()
    per_class_cohesion = []
    for c in range(num_classes):
        kept = [k for k in range(total) if flat[c][k]]
        sets = [_bits(act_rows[i][k] for k in kept) for i in samples[c]]
        per_class_cohesion.append(_mean_pairwise(sets) if len(sets) >= 2 else 1.0)
    layer_coupling = [_mean_pairwise([_bits(masks[c][l]) for c in range(num_classes)])
                      for l in range(len(activity))]
    return {
        "class_masks": masks, "krr": krr, "model_krr": sum(krr) / num_classes,
        "per_class_cohesion": per_class_cohesion,
        "cohesion": sum(per_class_cohesion) / num_classes,
        "coupling": _mean_pairwise([_bits(f) for f in flat]),
        "layer_coupling": layer_coupling,
    }


def _as_lists(result: Modularization) -> list[list[list[bool]]]:
    return [[m.tolist() for m in layers] for layers in result.class_masks]


def _assert_matches(result: Modularization, expected: dict, abs_tol: float) -> None:
    assert _as_lists(result) == expected["class_masks"]
    assert result.krr == pytest.approx(expected["krr"], abs=abs_tol)
    assert result.model_krr == pytest.approx(expected["model_krr"], abs=abs_tol)
    assert result.per_class_cohesion == pytest.approx(expected["per_class_cohesion"], abs=abs_tol)
    assert result.cohesion == pytest.approx(expected["cohesion"], abs=abs_tol)
    assert result.coupling == pytest.approx(expected["coupling"], abs=abs_tol)
    assert result.layer_coupling() == pytest.approx(expected["layer_coupling"], abs=abs_tol)


# ------------------------------------------------------------------ 1. designed activity

# Three classes of four samples, two masked layers of 4 and 3 kernels. One row per
# sample: (label, layer-0 activity, layer-1 activity). With tau = 0.75:
#   class 0: layer-0 freq [1, .75, .5, 0] -> keeps {0, 1}; layer-1 freq [1, .5, 0] -> {0}
#   class 1: layer-0 freq [0, 1, 1, .25] -> keeps {1, 2}; layer-1 freq [1, .5, .75] -> {0, 2}
#   class 2: layer-0 freq [.5, 0, .25, .5] keeps nothing at 0.75; tau drops 0.70, 0.65 ...
#            to 0.50 for this class and layer only -> {0, 3} (not kernel 2 at .25, and class
#            0's kernel 2 at .5 stays dropped); layer-1 freq [0, 1, 1] -> {1, 2}
DESIGNED = [
    (0, [1, 1, 1, 0], [1, 1, 0]),
    (0, [1, 1, 0, 0], [1, 0, 0]),
    (0, [1, 1, 1, 0], [1, 1, 0]),
    (0, [1, 0, 0, 0], [1, 0, 0]),
    (1, [0, 1, 1, 1], [1, 1, 1]),
    (1, [0, 1, 1, 0], [1, 1, 1]),
    (1, [0, 1, 1, 0], [1, 0, 1]),
    (1, [0, 1, 1, 0], [1, 0, 0]),
    (2, [1, 0, 0, 0], [0, 1, 1]),
    (2, [0, 0, 0, 1], [0, 1, 1]),
    (2, [1, 0, 1, 0], [0, 1, 1]),
    (2, [0, 0, 0, 1], [0, 1, 1]),
]
DESIGNED_TAU = 0.75
# Worked out by hand from the table (kernels numbered 0-6 across both layers):
# modules c0 = {0, 1, 4}, c1 = {1, 2, 4, 6}, c2 = {0, 3, 5, 6}.
EXPECTED = {
    "class_masks": [
        [[True, True, False, False], [True, False, False]],
        [[False, True, True, False], [True, False, True]],
        [[True, False, False, True], [False, True, True]],
    ],
    "krr": [3 / 7, 4 / 7, 4 / 7],
    "model_krr": 11 / 21,
    # Sample masks restricted to the module's kernels, mean Jaccard over pairs:
    # c0: rows 111, 111, 111, 101 -> (3 * 1 + 3 * 2/3) / 6 = 5/6
    # c1: rows 1111, 1111, 1111, 1110 -> (3 * 1 + 3 * 3/4) / 6 = 7/8
    # c2: rows 1011, 0111, 1011, 0111 -> (2 * 1 + 4 * 1/2) / 6 = 2/3
    # (unrestricted, c0's first two samples alone would score 3/5, not 1).
    "per_class_cohesion": [5 / 6, 7 / 8, 2 / 3],
    "cohesion": (5 / 6 + 7 / 8 + 2 / 3) / 3,
    # J(c0, c1) = 2/5, J(c0, c2) = 1/6, J(c1, c2) = 1/7.
    "coupling": (2 / 5 + 1 / 6 + 1 / 7) / 3,
    # Layer 0: c0 {0,1}, c1 {1,2}, c2 {0,3} -> (1/3 + 1/3 + 0) / 3;
    # layer 1: c0 {0}, c1 {0,2}, c2 {1,2} -> (1/2 + 0 + 1/3) / 3.
    "layer_coupling": [2 / 9, 5 / 18],
}


def _designed(monkeypatch) -> tuple[DatasetBundle, list[torch.Tensor]]:
    """A dataset whose labels are the table's (in a shuffled order, so that a metric
    that assumes samples grouped by class fails) and ``collect_activity`` returning the
    table's activity for it."""
    order = [7, 2, 9, 0, 11, 4, 1, 8, 5, 10, 3, 6]
    rows = [DESIGNED[i] for i in order]
    labels = torch.tensor([r[0] for r in rows])
    activity = [torch.tensor([r[1] for r in rows], dtype=torch.bool),
                torch.tensor([r[2] for r in rows], dtype=torch.bool)]
    images = torch.zeros(len(rows), 1, 8, 8, dtype=torch.uint8)  # never looked at
    data = DatasetBundle("designed", images, labels, images[:2], labels[:2], ["a", "b", "c"],
                         InputSpec(1, 8, (0.5,), (0.5,)))

    def designed_activity(model, batches, batch_size=512):
        assert batches.labels.tolist() == labels.tolist()
        return [a.clone() for a in activity]

    monkeypatch.setattr(mz, "collect_activity", designed_activity)
    return data, activity


def test_metrics_on_designed_activity_match_hand_computed_values(monkeypatch):
    data, activity = _designed(monkeypatch)
    # Any masked model will do: the activity it would produce is replaced by the table's.
    net = create_model("simcnn", 3, in_channels=1, input_size=32, width=0.125)
    result = modularize(net, data, tau=DESIGNED_TAU, device="cpu")
    assert result.tau == DESIGNED_TAU
    _assert_matches(result, EXPECTED, 1e-6)
    # The brute force agrees with the hand computation: it can be trusted on real data.
    _assert_matches(result, _brute_force(activity, data.train_y, 3, DESIGNED_TAU), 1e-6)
    # Derived quantities follow from the masks.
    assert result.krr_of([0, 2]) == pytest.approx(6 / 7)  # {0, 1, 3, 4, 5, 6}
    assert [m.tolist() for m in result.union([1, 2])] == [[True, True, True, True],
                                                          [True, True, True]]
    back = Modularization.from_json(result.to_json())
    _assert_matches(back, EXPECTED, 1e-6)


def test_higher_tau_keeps_fewer_kernels_on_designed_activity(monkeypatch):
    # At tau 1.0 only always-active kernels survive: c0 {0 | 0}, c1 {1, 2 | 0}, and c2's
    # layer 0 drops to 0.5 as before -> {0, 3 | 1, 2}.
    data, activity = _designed(monkeypatch)
    net = create_model("simcnn", 3, in_channels=1, input_size=32, width=0.125)
    result = modularize(net, data, tau=1.0, device="cpu")
    assert result.krr == pytest.approx([2 / 7, 3 / 7, 4 / 7])
    _assert_matches(result, _brute_force(activity, data.train_y, 3, 1.0), 1e-6)


# ------------------------------------------------------------------ 2. trained model, real digits


@pytest.mark.training_outcome
@pytest.mark.parametrize("tau", [0.9, 0.5])
def test_metrics_match_brute_force_on_trained_model(trained_digits, monkeypatch, tau):
    model, data = trained_digits
    seen = {}
    real = mz.collect_activity

    def spy(*a, **k):
        seen["activity"] = real(*a, **k)
        return seen["activity"]

    monkeypatch.setattr(mz, "collect_activity", spy)
    result = modularize(model, data, tau=tau, device="cpu")
    # The model is trained enough for the metrics to mean something: none is a constant.
    assert 0 < result.model_krr < 1 and 0 < result.coupling < 1 and 0 < result.cohesion < 1
    assert min(result.krr) < max(result.krr)
    assert min(result.per_class_cohesion) < max(result.per_class_cohesion)
    expected = _brute_force(seen["activity"], data.train_y, data.num_classes, tau)
    _assert_matches(result, expected, 1e-6)
    assert len(result.layer_coupling()) == len(model.kernel_counts())


@pytest.mark.training_outcome
def test_union_json_roundtrip_and_errors(trained_digits, digits32):
    model, data = trained_digits
    result = modularize(model, data, device="cpu")
    back = Modularization.from_json(result.to_json())
    for a, b in zip(result.class_masks, back.class_masks, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    u = result.union([3, 5])
    assert all(torch.equal(x, y | z) for x, y, z in zip(u, result.class_masks[3], result.class_masks[5], strict=True))
    # Trained modules differ, so the union is larger than either class's module.
    assert result.krr_of([3, 5]) > max(result.krr[3], result.krr[5])
    assert result.krr_of([3]) == pytest.approx(result.krr[3])
    with pytest.raises(ValueError, match="out of range"):
        result.union([10])
    with pytest.raises(ValueError, match="tau"):
        modularize(model, data, tau=0.0)
    with pytest.raises(ValueError, match="no mask generators"):
        modularize(create_model("simcnn", 10, width=0.125, masked=False), digits32)


# ------------------------------------------------------------------ 3. bounded memory, one pass


@pytest.mark.parametrize("block", [1, 7, 1 << 24])
def test_blockwise_pairwise_jaccard_matches_brute_force(monkeypatch, block):
    # Tiny blocks force many row blocks (and the diagonal square of each); repeated rows
    # (merged before the pairs are formed) and empty rows included.
    g = torch.Generator().manual_seed(block)
    rows = torch.rand(23, 6, generator=g) < 0.5
    rows[5] = rows[2]
    rows[9] = rows[2]
    rows[11] = False
    rows[17] = False
    monkeypatch.setattr(mz, "BLOCK_ELEMENTS", block)
    expected = _mean_pairwise([_bits(r) for r in rows.tolist()])
    assert mz.mean_pairwise_jaccard(rows) == pytest.approx(expected, abs=1e-7)  # float32 ratios
    assert mz.mean_pairwise_jaccard(rows[:1]) == 1.0


def test_class_frequencies_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    act = torch.rand(50, 9, generator=g) < 0.3
    labels = torch.randint(0, 4, (50,), generator=g)
    monkeypatch.setattr(mz, "BLOCK_ELEMENTS", 10)  # one sample per chunk
    freq = mz.class_frequencies(act, labels, 4)
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    assert torch.allclose(freq, (onehot.T @ act.float()) / onehot.sum(0)[:, None], atol=0)


@pytest.mark.training_outcome
def test_tau_sweep_runs_the_model_once(trained_digits, monkeypatch):
    model, data = trained_digits
    calls = []
    real = mz.collect_activity
    monkeypatch.setattr(mz, "collect_activity", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep = mz.modularize_sweep(model, data, [0.9, 0.5], device="cpu")
    assert len(calls) == 1
    for tau, result in zip([0.9, 0.5], sweep, strict=True):
        single = modularize(model, data, tau=tau, device="cpu")
        assert _as_lists(result) == _as_lists(single) and result.cohesion == single.cohesion
    assert sweep[0].model_krr < sweep[1].model_krr
