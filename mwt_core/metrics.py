"""Size and cost of a network: parameters, FLOPs (torch's counter), latency."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mwt_core.devices import resolve_device


def count_params(net: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def count_flops(net: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs of one image's forward pass, as counted by ``torch.utils.flop_counter``."""
    was_training = net.training
    net.eval()
    param = next(net.parameters())
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        net(x)
    net.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(net: nn.Module, input_shape: tuple[int, int, int], batch: int = 256,
                    device: str = "auto", repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of one forward pass over a ``batch`` of images."""
    dev = resolve_device(device)
    was_training = net.training
    net.eval().to(dev)
    x = torch.randn(batch, *input_shape, device=dev)
    times = []
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():  # serving cost: no autograd bookkeeping
            net(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    net.train(was_training)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def paired_latency(nets: list[nn.Module], input_shape: tuple[int, int, int], batch: int = 64,
                   rounds: int = 15, warmup: int = 2) -> list[float]:
    """Median seconds of one forward pass over a ``batch`` of images for each of ``nets`` on
    the CPU, measured in rounds that run every net once: a load change on a shared machine
    hits all of them alike, so their ratio stays meaningful where absolute times do not."""
    x = torch.randn(batch, *input_shape)
    states = [n.training for n in nets]
    for n in nets:
        n.eval().cpu()
    times: list[list[float]] = [[] for _ in nets]
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for i, n in enumerate(nets):
                t0 = time.perf_counter()
                n(x)
                if r >= warmup:
                    times[i].append(time.perf_counter() - t0)
    for n, was in zip(nets, states, strict=True):
        n.train(was)
    return [sorted(t)[len(t) // 2] for t in times]
