"""TrainConfig's defaults are the same for every data set; its kernel-budget fields are checked."""

from __future__ import annotations

from typing import Any

import pytest

import mwt_core.config as config
from mwt_core.config import LEGACY_VALUES, PAPER_SETTINGS, TrainConfig


def test_no_per_dataset_loss_table_remains() -> None:
    for name in ("DATASET_LOSS_SETTINGS", "SMALL_DATA_SETTINGS", "FROM_WEIGHTS_SETTINGS",
                 "loss_defaults", "loss_default_text"):
        assert not hasattr(config, name), name


def test_paper_settings_are_the_papers_loss_without_a_budget() -> None:
    cfg = TrainConfig(**PAPER_SETTINGS)
    assert cfg.target_krr is None
    assert {k: getattr(cfg, k) for k in PAPER_SETTINGS} == PAPER_SETTINGS


def test_budget_fields_default_from_the_dataclass_and_have_legacy_values() -> None:
    cfg = TrainConfig()
    for key in ("target_krr", "budget_rate", "val_fraction", "guard_pp"):
        assert getattr(cfg, key) == TrainConfig.__dataclass_fields__[key].default
        assert key in LEGACY_VALUES  # checkpoints written before the budget resume as they ran


@pytest.mark.parametrize("value", [None, 1.0, 0.5, 1e-3])
def test_target_krr_none_or_up_to_one_is_accepted(value: float | None) -> None:
    assert TrainConfig(target_krr=value).target_krr == value


@pytest.mark.parametrize(("key", "value"), [
    ("target_krr", 0.0), ("target_krr", -1.0), ("target_krr", 2.0),
    ("val_fraction", 0.9), ("val_fraction", -0.1),
    ("guard_pp", -1.0), ("guard_pp", 101.0),
    ("budget_rate", -1.0),
])
def test_bad_budget_values_are_refused_by_name(key: str, value: float) -> None:
    kwargs: dict[str, Any] = {key: value}
    with pytest.raises(ValueError, match=key):
        TrainConfig(**kwargs)
