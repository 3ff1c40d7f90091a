import pytest
import torch

from mwt_core.models import create_model
from mwt_core.modularize import Modularization, _pairwise_jaccard, modularize, module_masks


def test_module_masks_threshold_and_fallback():
    freq = torch.tensor([[0.95, 0.5, 0.9], [0.3, 0.2, 0.1]])
    keep = module_masks(freq, 0.9)
    assert keep[0].tolist() == [True, False, True]
    # Class 1 keeps nothing at 0.9: tau drops in 0.05 steps until 0.3 keeps kernel 0.
    assert keep[1].tolist() == [True, False, False]


def test_jaccard():
    a = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    jac = _pairwise_jaccard(a, b)
    assert jac[0, 0] == pytest.approx(0.5)
    assert jac[1, 1] == 1.0  # two empty masks are identical
    assert jac[0, 1] == 0.0


def _brute_force(activity, labels, keep, num_classes):
    # Straightforward per-pair loops, to check the vectorised metrics against.
    act = torch.cat(activity, 1)
    coh = []
    for c in range(num_classes):
        rows = act[labels == c][:, keep[c]]
        vals = []
        for i in range(len(rows)):
            for j in range(len(rows)):
                if i != j:
                    inter = (rows[i] & rows[j]).sum().item()
                    union = (rows[i] | rows[j]).sum().item()
                    vals.append(inter / union if union else 1.0)
        coh.append(sum(vals) / len(vals))
    coup = []
    for a in range(num_classes):
        for b in range(num_classes):
            if a != b:
                inter = (keep[a] & keep[b]).sum().item()
                union = (keep[a] | keep[b]).sum().item()
                coup.append(inter / union)
    return sum(coh) / len(coh), sum(coup) / len(coup)


def test_metrics_match_brute_force_on_real_digits(digits32, monkeypatch):
    from dataclasses import replace

    import mwt_core.modularize as mz

    data = replace(digits32, train_x=digits32.train_x[:120], train_y=digits32.train_y[:120])
    torch.manual_seed(0)
    net = create_model("simcnn", 10, width=0.125).eval()
    seen = {}
    real = mz.collect_activity

    def spy(*a, **k):
        seen["activity"] = real(*a, **k)
        return seen["activity"]

    monkeypatch.setattr(mz, "collect_activity", spy)
    result = modularize(net, data, tau=0.6, device="cpu")
    keep = [torch.cat(layers) for layers in result.class_masks]
    coh, coup = _brute_force(seen["activity"], data.train_y, keep, 10)
    assert result.cohesion == pytest.approx(coh, abs=1e-5)
    assert result.coupling == pytest.approx(coup, abs=1e-5)
    total = sum(net.kernel_counts())
    assert result.krr[0] == pytest.approx(keep[0].sum().item() / total)
    assert result.model_krr == pytest.approx(sum(result.krr) / 10)
    # Per-layer coupling is the same brute-force coupling on one layer's kernels at a time.
    layers = result.layer_coupling()
    assert len(layers) == len(net.kernel_counts())
    for i, value in enumerate(layers):
        one = [result.class_masks[c][i] for c in range(10)]
        assert value == pytest.approx(_brute_force([seen["activity"][i]], data.train_y, one, 10)[1], abs=1e-5)


def test_union_json_roundtrip_and_errors(digits32):
    from dataclasses import replace

    data = replace(digits32, train_x=digits32.train_x[:100], train_y=digits32.train_y[:100])
    net = create_model("rescnn", 10, width=0.125)
    result = modularize(net, data, device="cpu")
    back = Modularization.from_json(result.to_json())
    for a, b in zip(result.class_masks, back.class_masks, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    u = result.union([3, 5])
    assert all(torch.equal(x, y | z) for x, y, z in zip(u, result.class_masks[3], result.class_masks[5], strict=True))
    assert result.krr_of([3]) == pytest.approx(result.krr[3])
    with pytest.raises(ValueError, match="out of range"):
        result.union([10])
    with pytest.raises(ValueError, match="no mask generators"):
        modularize(create_model("simcnn", 10, width=0.125, masked=False), data)
