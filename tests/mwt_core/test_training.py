import pytest
import torch

from mwt_core.training import TrainConfig, TrainingCancelled, train


def _small(digits32, modular=True, epochs=2, **kw):
    cfg = TrainConfig(arch="simcnn", width=0.125, epochs=epochs, batch_size=64, modular=modular,
                      device="cpu", seed=3, **kw)
    return cfg


def _subset(data, n=256):
    # Enough real digits for a couple of steps per epoch, kept small for speed.
    from dataclasses import replace
    return replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n],
                   test_x=data.test_x[:96], test_y=data.test_y[:96])


def test_modular_training_reports_progress_and_losses(digits32):
    data = _subset(digits32)
    reports = []
    result = train(_small(digits32), data, progress=reports.append, progress_every=1)
    epoch_ends = [r for r in reports if r.test_acc is not None]
    assert [r.epoch for r in epoch_ends] == [1, 2]
    assert all(0 <= r.kernel_rate <= 1 for r in epoch_ends)
    assert all(r.cohesion > 0 and r.coupling > 0 for r in epoch_ends)
    assert all(r.loss > r.ce for r in epoch_ends)
    assert epoch_ends[-1].eta_s == pytest.approx(0.0, abs=1e-6)
    assert len(result.history) == 2 and result.train_seconds > 0
    assert not result.model.training


def test_standard_training_has_no_mask_terms(digits32):
    data = _subset(digits32)
    reports = []
    result = train(_small(digits32, modular=False, epochs=1), data, progress=reports.append)
    assert reports[-1].kernel_rate is None and reports[-1].cohesion == 0.0
    assert result.model.mask_units() == []


def test_same_seed_same_weights(digits32):
    data = _subset(digits32, 128)
    a = train(_small(digits32, epochs=1), data).model.state_dict()
    b = train(_small(digits32, epochs=1), data).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reproduces_uninterrupted_run_bit_for_bit(digits32, tmp_path):
    data = _subset(digits32, 192)
    straight = train(_small(digits32, epochs=3), data).model.state_dict()

    stop_after = {"calls": 0}

    def stop_in_third_epoch():
        stop_after["calls"] += 1
        return stop_after["calls"] > 2 * 4  # two epochs of 3 steps + 2 end-of-epoch checks

    with pytest.raises(TrainingCancelled):
        train(_small(digits32, epochs=3), data, checkpoint_dir=tmp_path, should_stop=stop_in_third_epoch,
              progress_every=1)
    assert (tmp_path / "last.pt").exists()
    resumed = train(_small(digits32, epochs=3), data, checkpoint_dir=tmp_path)
    assert resumed.epochs_run < 3
    state = resumed.model.state_dict()
    assert all(torch.equal(state[k], straight[k]) for k in straight)


def test_resume_refuses_other_config(digits32, tmp_path):
    data = _subset(digits32, 128)
    train(_small(digits32, epochs=1), data, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="another config"):
        train(_small(digits32, epochs=1, lr=0.01), data, checkpoint_dir=tmp_path)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown architecture"):
        TrainConfig(arch="nope")
    with pytest.raises(ValueError, match="device"):
        from mwt_core.devices import resolve_device
        resolve_device("tpu")


def test_overlap_term_switches_kernels_off(digits32):
    # The optional gamma term (cross-class mask overlap) must lower the share of active kernels
    # against the same run without it.
    data = _subset(digits32)
    rates = {}
    for gamma in (0.0, 10.0):
        reports = []
        train(_small(digits32, epochs=3, gamma=gamma, mask_lr=0.5), data, progress=reports.append)
        rates[gamma] = reports[-1].kernel_rate
    assert rates[10.0] < rates[0.0] - 0.1, rates


def test_checkpoint_of_an_older_config_still_resumes():
    # A checkpoint written before a config field existed stores no value for it: its default applies.
    from mwt_core.training import same_run

    cfg = TrainConfig(device="cpu").to_json()
    older = {k: v for k, v in cfg.items() if k != "gamma"}
    assert same_run(older, {**cfg, "device": "cuda"})
    assert not same_run(older, {**cfg, "gamma": 0.5})
