"""Large images are prepared in strips with the one-call resize's result, and cheaply.

Each case is compared with ``prepare_image`` forced to resize in one call (the chunk size
raised past the image), so the strips are checked against what every image got before.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import mwt_core.export as export
from mwt_core.data.bundle import InputSpec
from tests.support.processes import REPO_ROOT


def _spec(channels: int, size: int) -> InputSpec:
    return InputSpec(channels, size, (0.5,) * channels, (0.25,) * channels)


def _one_call(img: torch.Tensor, spec: InputSpec, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(export, "RESIZE_CHUNK_VALUES", img.numel())
        return export.prepare_image(img, spec)


@pytest.mark.parametrize(
    ("shape", "channels", "size"),
    [
        ((3, 300, 200), 3, 32),  # taller than wide, still across first (wider than S)
        ((3, 96, 400), 1, 24),  # RGB to grey: the weighted sum per strip
        ((1, 250, 250), 3, 16),  # grey to RGB: one channel resized, then repeated
        ((3, 120, 330), 3, 64),
        ((1, 97, 1000), 1, 8),  # a last strip shorter than the others
    ],
)
def test_strips_give_the_one_call_result(
    shape: tuple[int, int, int], channels: int, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spec = _spec(channels, size)
    expected = _one_call(img, spec, monkeypatch)
    monkeypatch.setattr(export, "RESIZE_CHUNK_VALUES", 3 * 1000 * 7)  # a few rows per strip
    got = export.prepare_image(img, spec)
    assert got.shape == (channels, size, size)
    assert torch.equal(got, expected)
    batch = export.prepare_images([img, img], spec)
    assert torch.equal(batch[1], expected / 255.0)


def test_tall_narrow_images_go_down_first_within_one_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Narrower than S and tall: rows across would be enlarged first, so columns go down
    first; float rounding may move a value by one 8-bit level, no more."""
    img = torch.randint(0, 256, (3, 900, 40), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(1))
    spec = _spec(3, 64)
    expected = _one_call(img, spec, monkeypatch)
    monkeypatch.setattr(export, "RESIZE_CHUNK_VALUES", 3 * 900 * 3)
    got = export.prepare_image(img, spec)
    assert got.shape == expected.shape and float((got - expected).abs().max()) <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_large_image_costs_little_beyond_its_own_bytes() -> None:
    """4096 x 4096 RGB (48 MiB as uint8) to 32 x 32, in a fresh process: its peak RSS over
    the moment before, sampled every millisecond (a float copy alone would be 192 MiB)."""
    code = textwrap.dedent("""
        import threading, time, torch
        from mwt_core.data.bundle import InputSpec
        from mwt_core.export import prepare_images
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        spec = InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3)
        img = torch.full((3, 4096, 4096), 7, dtype=torch.uint8)
        prepare_images([torch.zeros(3, 64, 64, dtype=torch.uint8)], spec)
        idle, peak, done = rss(), [0.0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.001)
        watcher = threading.Thread(target=sample)
        watcher.start()
        prepare_images([img], spec)
        done.set()
        watcher.join()
        print(peak[0] - idle)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    print(f"prepare_images of a 4096x4096 RGB image: +{growth_mb:.0f} MB")
    assert growth_mb < 64
