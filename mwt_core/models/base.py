"""The base class every architecture derives from."""

from __future__ import annotations

from typing import Any

from torch import nn

from mwt_core.models.masking import ConvUnit


class MwTNet(nn.Module):
    """Base class of every architecture: knows its config and its masked units."""

    config: dict[str, Any]

    def mask_units(self) -> list[ConvUnit]:
        """Masked conv units in forward order (the order masks are reported in)."""
        return [m for m in self.modules() if isinstance(m, ConvUnit) and m.masked]

    def kernel_counts(self) -> list[int]:
        return [u.out_channels for u in self.mask_units()]

    def forward_with_masks(self, x: Any, units: list[ConvUnit] | None = None) -> tuple[Any, list[Any]]:
        """Logits plus the ``B x K_l`` mask of every masked unit, in forward order.

        ``units`` is ``mask_units()`` cached by a caller that runs many steps.
        """
        units = self.mask_units() if units is None else units
        for u in units:
            u.last_mask = None
        logits = self(x)
        masks = [u.last_mask for u in units]
        for u in units:
            u.last_mask = None
        if any(m is None for m in masks):
            raise RuntimeError("a masked unit did not run in forward(); cannot collect masks")
        return logits, masks
