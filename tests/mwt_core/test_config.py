"""The loss settings a run takes where its caller chose none (mwt_core.config.loss_defaults)."""

from __future__ import annotations

from mwt_core.config import (
    DEFAULT_DATASET,
    FROM_WEIGHTS_SETTINGS,
    PAPER_SETTINGS,
    SMALL_DATA_SETTINGS,
    TrainConfig,
    loss_default_text,
    loss_defaults,
)


def test_loss_defaults_follow_the_data_set_and_the_start() -> None:
    assert loss_defaults(False, "digits") == SMALL_DATA_SETTINGS
    assert loss_defaults(False, " Digits ") == SMALL_DATA_SETTINGS  # names are case-blind elsewhere too
    assert loss_defaults(False) == loss_defaults(False, DEFAULT_DATASET)
    for other in ("synthetic", "cifar10", "digits04", "my_digits.npz"):
        assert loss_defaults(False, other) == PAPER_SETTINGS, other
    # weights already trained: the from-weights setting, whatever the data set
    assert loss_defaults(True, "digits") == loss_defaults(True, "cifar10") == FROM_WEIGHTS_SETTINGS
    # TrainConfig's own fields stay the paper's: a data set without a tuned entry trains those
    assert {k: getattr(TrainConfig, k) for k in PAPER_SETTINGS} == PAPER_SETTINGS
    # a copy: a caller that edits the answer does not change the next run's defaults
    loss_defaults(False, "digits")["beta"] = 99.0
    assert loss_defaults(False, "digits")["beta"] == SMALL_DATA_SETTINGS["beta"]


def test_loss_default_text_names_each_value() -> None:
    assert loss_default_text("beta") == f"digits: {SMALL_DATA_SETTINGS['beta']:g}, else {PAPER_SETTINGS['beta']:g}"
    assert loss_default_text("mask_lr").endswith("else lr")  # None: the mask rate follows lr
