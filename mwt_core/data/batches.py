"""Image batches for training and inference: normalised, augmented on the device.

A dataset small enough is moved to the device once as uint8; every batch is then
gathered, augmented (random crop with padding, optional horizontal flip) and
normalised there with a few tensor ops, instead of per-sample CPU transforms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mwt_core.data.datasets import InputSpec

# Data at most this large (uint8 bytes) is kept resident on an accelerator.
MAX_RESIDENT_BYTES = 4 * 1024**3


class ImageBatches:
    """uint8 ``N x C x H x W`` images plus labels, served as float batches on ``device``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: InputSpec,
                 device: torch.device) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape N x C x H x W")
        self.device = device
        resident = device.type == "cpu" or images.numel() <= MAX_RESIDENT_BYTES
        # Kept as a flag: comparing devices would take "cuda:0" (the data's) for another
        # device than "cuda" (the caller's), and gather every batch through the host.
        self.resident = resident
        self.images = images.to(device) if resident else images.pin_memory()
        self.labels = labels.to(device=device, dtype=torch.long)
        scale = 1.0 / 255.0
        self.mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1) / scale
        self.inv_std = scale / torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
        self.hflip = spec.hflip
        self.pad = max(1, images.shape[-1] // 8)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.images[idx]
        return self.images[idx.cpu()].to(self.device, non_blocking=True)

    def batch(self, idx: torch.Tensor, augment: bool = False,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images and labels at ``idx`` (augmented if asked)."""
        x = self._gather(idx).float()
        if augment:
            x = self._augment(x, generator)
        x = ((x - self.mean) * self.inv_std).contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]

    def _augment(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.pad
        # Pad with the mean colour so padded borders normalise to zero, like zero padding
        # after normalisation in the usual per-sample pipeline.
        padded = F.pad(x - self.mean, (p, p, p, p)) + self.mean
        dy = torch.randint(0, 2 * p + 1, (b, 1), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b, 1), device=x.device, generator=gen)
        rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (dx + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        flat = padded.flatten(2)  # b x c x (H*W) of the padded image
        index = (rows * (w + 2 * p) + cols).view(b, 1, h * w).expand(-1, x.shape[1], -1)
        out = flat.gather(2, index).view_as(x)
        if self.hflip:
            flip = torch.rand(b, device=x.device, generator=gen) < 0.5
            out = torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
        return out

    def ordered(self, batch_size: int):
        """Yield ``(x, y)`` over the whole set in order, without augmentation."""
        for start in range(0, len(self), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(self)), device=self.device)
            yield self.batch(idx)
