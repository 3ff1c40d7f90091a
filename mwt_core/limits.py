"""Upper bounds of the run settings (re-exported by :mod:`mwt_core.config`).

Apart from the config so that the architecture registry can read the width cap without
importing the config, whose checks import the registry (no import cycle either way).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Upper bounds of the settings (the lower bounds are in the checks below)."""

    width: float = 4.0  # channel width multiplier; 4x VGG16 already has 16x its parameters
    epochs: int = 2000
    batch_size: int = 8192
    lr: float = 10.0  # also bounds mask_lr
    weight_decay: float = 1.0
    loss_weight: float = 100.0  # alpha, beta and gamma; also bounds budget_rate
    # At most half the training split held out for validation: the rest must still train.
    val_fraction: float = 0.5
    guard_pp: float = 100.0  # percentage points
    seed: int = 2**31 - 1
    # A state dict to start from (TrainConfig.init_from): VGG-16-BN, the catalogue's largest,
    # is 0.55 GB in float32.
    init_weights_bytes: int = 1 << 30


LIMITS = Limits()
