"""Tracing that is safe beside other threads running networks.

torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process while it
traces, and torch's TorchScript tracer and ONNX exporter keep module-level state during a
trace. In a server that traces (slimming, conversion, export) on one request thread while
other threads run inference, an unguarded trace breaks the other threads' forward passes,
and two traces at once can leave the patched methods installed for good. Every trace here
holds one process-wide lock, and the fx tracer lets the patched methods act as the
originals on every thread but its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

# Reentrant: a trace may build a network that is itself traced (loading a module slims it).
_TRACE_LOCK = threading.RLock()


@contextmanager
def exclusive_trace() -> Iterator[None]:
    """Hold the process-wide tracing lock (around ``torch.jit.trace`` or ``torch.onnx.export``)."""
    with _TRACE_LOCK:
        yield


def save_traced(net: nn.Module, example: torch.Tensor, path: str, extra_files: dict[str, str]
                ) -> None:
    """``torch.jit.trace`` ``net`` on ``example`` and save it to ``path``, leaving nothing behind.

    Every traced module registers its TorchScript class types in torch's process-wide
    compilation unit, and they stay there after the traced module is gone: a server that
    exports one artifact after another would grow without end. The trace is dropped once
    saved and the registry cleared, under the tracing lock, so no other traced module can
    be alive to lose its types (loaded TorchScript files have compilation units of their own).
    """
    with _TRACE_LOCK:
        traced = torch.jit.trace(net, example, check_trace=False)
        try:
            torch.jit.save(traced, path, _extra_files=extra_files)
        finally:
            del traced
            torch._C._jit_clear_class_registry()
            torch.jit._recursive.concrete_type_store = torch.jit._recursive.ConcreteTypeStore()
            torch.jit._state._clear_class_state()


class ThreadSafeTracer(fx.Tracer):
    """A torch.fx tracer whose process-wide patches only act on the tracing thread.

    One trace runs at a time; on any other thread a module call during the trace runs the
    module as usual and an attribute read returns the attribute, as if nothing were patched.
    """

    _owner: int | None = None

    def trace(self, root: nn.Module | Callable[..., Any],
              concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _TRACE_LOCK:
            self._owner = threading.get_ident()
            try:
                return super().trace(root, concrete_args)
            finally:
                self._owner = None

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._owner:
            return forward(*args, **kwargs)  # the unpatched ``nn.Module.__call__``
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)
