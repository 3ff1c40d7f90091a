"""tau chosen on the validation slice: the smallest module within an accuracy margin."""

from __future__ import annotations

import pytest

from mwt_core.artifacts import read_manifest
from mwt_core.config import TAU_GRID, ModularizeConfig, TrainConfig, parse_tau
from mwt_core.data.bundle import split_validation
from mwt_core.modularize import modularize
from mwt_core.pipeline import NoValidationSlice, extract_classes, module_tau
from mwt_core.reuse import choose_tau, evaluate, extract_module, restrict, within_margin

CLASSES = [3, 5, 8]
# trained_digits is trained with TrainConfig's default slice and seed 0 (recomputed here).
VAL_FRACTION, SEED = TrainConfig.val_fraction, 0


@pytest.fixture(scope="module")
def sliced(trained_digits):
    model, data = trained_digits
    fit, val = split_validation(data, VAL_FRACTION, SEED)
    assert val is not None
    return model, data, fit, val


@pytest.fixture(scope="module")
def brute_force(sliced):
    """Per tau of the grid, largest first: the validation accuracy of the {3,5,8} module cut
    from a full modularization of ``fit`` at that tau (no shortcut of choose_tau's), and the
    full model's."""
    model, _, fit, val = sliced
    full = evaluate(restrict(model, CLASSES, fit.num_classes), val, CLASSES, device="cpu")
    rows = []
    for tau in sorted(TAU_GRID, reverse=True):
        mod = modularize(model, fit, tau=tau, device="cpu")
        module = extract_module(model, mod, CLASSES)
        rows.append((tau, evaluate(module, val, CLASSES, device="cpu"), mod.krr_of(CLASSES)))
    return full, rows


def _expected(full: float, rows: list[tuple[float, float, float]], margin_pp: float) -> float:
    return next((tau for tau, acc, _ in rows if within_margin(acc, full, margin_pp)), rows[-1][0])


def test_choose_tau_is_the_largest_tau_within_the_margin(sliced, brute_force):
    model, _, fit, val = sliced
    full, rows = brute_force
    losses = sorted({round(100 * (full - acc), 6) for _, acc, _ in rows if acc < full})
    # Margins on both sides of every loss the grid shows, so the choice moves along the grid.
    margins = sorted({0.0, ModularizeConfig.margin_pp, 100.0, *losses,
                      *(loss - 0.01 for loss in losses if loss > 0.01)})
    for margin in margins:
        choice = choose_tau(model, fit, val, CLASSES, margin, device="cpu")
        want = _expected(full, rows, margin)
        assert choice.tau == want, (margin, choice.tried, rows)
        acc, krr = next((a, k) for t, a, k in rows if t == want)
        assert choice.module_val_acc == pytest.approx(acc)
        assert choice.full_val_acc == pytest.approx(full)
        assert choice.krr == pytest.approx(krr)
        assert choice.met_margin
        assert choice.val_samples == sum(int((val.test_y == c).sum()) for c in CLASSES)
        # The modularization returned is the one that was measured.
        assert choice.modularization.tau == want
        assert choice.modularization.krr_of(CLASSES) == pytest.approx(krr)
        assert [t for t, _ in choice.tried] == [t for t, _, _ in rows][:len(choice.tried)]
    # With any margin the smallest module is good enough.
    assert choose_tau(model, fit, val, CLASSES, 100.0, device="cpu").tau == max(TAU_GRID)


def test_choose_tau_when_no_tau_meets_the_margin(sliced, monkeypatch):
    """Every module below the full model by more than the margin: the grid's smallest tau
    (the largest module), and the result says the margin was not met."""
    import mwt_core.reuse as reuse

    model, _, fit, val = sliced
    real = reuse.evaluate

    def worse_modules(net, data, classes=None, device="auto", batch_size=512):
        acc = real(net, data, classes, device, batch_size)
        return acc if net.krr is None else acc - 0.5  # restrict() has no KRR: the full model

    monkeypatch.setattr(reuse, "evaluate", worse_modules)
    choice = choose_tau(model, fit, val, CLASSES, 10.0, taus=[0.7, 0.95, 0.8], device="cpu")
    assert choice.tau == 0.7 and not choice.met_margin
    assert [t for t, _ in choice.tried] == [0.95, 0.8, 0.7]
    assert choice.module_val_acc < choice.full_val_acc - 0.1


def test_choose_tau_refuses_what_it_cannot_judge(sliced):
    model, _, fit, val = sliced
    with pytest.raises(ValueError, match="at least two classes"):
        choose_tau(model, fit, val, [3], device="cpu")
    with pytest.raises(ValueError, match="margin_pp"):
        choose_tau(model, fit, val, CLASSES, -1, device="cpu")
    with pytest.raises(ValueError, match="tau must be"):
        choose_tau(model, fit, val, CLASSES, taus=[0.0], device="cpu")


def test_parse_tau():
    assert parse_tau("auto") == parse_tau(" AUTO ") == "auto"
    assert parse_tau("0.85") == 0.85 and parse_tau(1) == 1.0
    for bad in ("fast", "0", "1.5", "nan"):
        with pytest.raises(ValueError, match="tau must be"):
            parse_tau(bad)


def _manifest(data, val_fraction: float | None) -> dict:
    config: dict = {"seed": SEED}
    if val_fraction is not None:
        config["val_fraction"] = val_fraction
    return {"dataset": data.name, "class_names": list(data.class_names),
            "input_spec": data.spec.to_json(), "train_config": config}


def test_module_tau_defaults_and_refusals(sliced):
    model, data, _, _ = sliced
    stored = modularize(model, data, tau=ModularizeConfig.tau, device="cpu")
    with_slice = _manifest(data, VAL_FRACTION)
    for old in (_manifest(data, None), _manifest(data, 0.0)):  # recorded before the slice, or 0
        # Without a slice the default is the model's own modularization, and "auto" is refused
        # with what to do instead.
        default = module_tau(model, old, stored, data, CLASSES, device="cpu")
        assert default.modularization is stored and default.record["tau_mode"] == "model"
        with pytest.raises(NoValidationSlice, match=r"give a fixed tau.*val_fraction > 0"):
            module_tau(model, old, stored, data, CLASSES, "auto", device="cpu")
    auto = module_tau(model, with_slice, stored, data, CLASSES, margin_pp=2.0, device="cpu")
    assert auto.record["tau_mode"] == "auto" and auto.record["margin_pp"] == 2.0
    assert auto.record["tau"] in TAU_GRID and auto.record["val_samples"] > 0
    assert auto.modularization.tau == auto.record["tau"] and auto.tried
    fixed = module_tau(model, with_slice, stored, data, CLASSES, 0.8, device="cpu")
    assert fixed.record["tau_mode"] == "fixed" and fixed.modularization.tau == 0.8
    assert fixed.record["module_val_acc"] is None
    own = module_tau(model, with_slice, stored, data, CLASSES, stored.tau, device="cpu")
    assert own.modularization is stored
    # One class: auto cannot judge its module, so the model's own tau is used, and said so.
    one = module_tau(model, with_slice, stored, data, [3], "auto", device="cpu")
    assert one.modularization is stored and one.record["tau_mode"] == "model"
    assert "one class" in one.record["tau_note"]


def test_extracted_module_records_its_tau(sliced, tmp_path):
    model, data, _, _ = sliced
    stored = modularize(model, data, tau=ModularizeConfig.tau, device="cpu")
    s = extract_classes(model, _manifest(data, VAL_FRACTION), stored, data,
                        CLASSES, tmp_path / "m", device="cpu", latency_batch=0, margin_pp=3.0)
    assert s["tau_mode"] == "auto" and s["margin_pp"] == 3.0 and s["tau"] in TAU_GRID
    manifest = read_manifest(tmp_path / "m")
    choice = manifest["tau_choice"]
    assert choice["tau"] == s["tau"] == manifest["metrics"]["tau"]
    assert choice["margin_pp"] == 3.0 and choice["tau_mode"] == "auto"
    assert choice["module_val_acc"] == s["module_val_acc"] and choice["full_val_acc"] is not None
    assert choice["tried"] and choice["tried"][-1][0] == s["tau"]
    assert within_margin(choice["module_val_acc"], choice["full_val_acc"], 3.0)
