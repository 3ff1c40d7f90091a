"""Traces (slimming's torch.fx, TorchScript, ONNX) beside other threads' inference.

A server slims, converts and exports on request threads while other threads predict; each
of those tracers keeps process-wide state while it runs, so these tests run them all at
once on several threads and check that every one succeeds, that the inference running
meanwhile computes what it computes alone, and that nothing stays patched afterwards.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from mwt_core.artifacts import load_artifact, save_artifact
from mwt_core.export import export_artifact
from mwt_core.models import create_model
from mwt_core.slimming import slim
from tests.support.nets import randomise_bn

ORIGINAL_CALL = nn.Module.__call__
ORIGINAL_GETATTR = nn.Module.__getattr__


def _run_together(jobs: list[Callable[[], None]], rounds: int, reference: nn.Module,
                  x: torch.Tensor) -> list[str]:
    """Run each job ``rounds`` times on its own thread while two threads run ``reference`` on
    ``x`` in a loop; the errors raised, and any inference output that differs."""
    with torch.no_grad():
        expected = reference(x)
    errors: list[str] = []
    stop = threading.Event()

    def infer() -> None:
        while not stop.is_set():
            try:
                with torch.no_grad():
                    if not torch.allclose(reference(x), expected, atol=1e-5, rtol=0):
                        errors.append("inference changed while another thread traced")
            except Exception as exc:  # what the test is about: any failure counts
                errors.append(f"inference: {exc!r}")

    def repeat(job: Callable[[], None]) -> None:
        for _ in range(rounds):
            try:
                job()
            except Exception as exc:
                errors.append(f"trace: {exc!r}")

    readers = [threading.Thread(target=infer) for _ in range(2)]
    workers = [threading.Thread(target=repeat, args=(job,)) for job in jobs]
    for t in readers + workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    return errors


def test_slimming_on_several_threads_leaves_other_threads_inference_alone() -> None:
    torch.manual_seed(0)
    nets = [create_model(a, 10, in_channels=3, input_size=32, width=0.25).eval()
            for a in ("resnet18", "simcnn", "rescnn")]
    reference = create_model("simcnn", 10, in_channels=3, input_size=32, width=0.25).eval()
    randomise_bn(reference)

    def slim_job(net: nn.Module) -> Callable[[], None]:
        def job() -> None:
            keep = [torch.rand(u.out_channels) < 0.5 for u in net.mask_units()]
            slim(net, keep, classes=[1, 2])
        return job

    errors = _run_together([slim_job(n) for n in nets], 4, reference, torch.rand(4, 3, 32, 32))
    assert errors == []
    assert nn.Module.__call__ is ORIGINAL_CALL and nn.Module.__getattr__ is ORIGINAL_GETATTR


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, digits32) -> dict[str, Path]:
    """A model and two of its modules, saved as artifacts (untrained weights suffice)."""
    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("tracing")
    model = create_model("simcnn", 10, in_channels=3, input_size=32, width=0.25).eval()
    randomise_bn(model)
    base = {"dataset": "digits", "input_spec": digits32.spec.to_json()}
    out = {"model": root / "model"}
    save_artifact(out["model"], model, {**base, "class_names": list(digits32.class_names)})
    for name, classes in (("module_a", [3, 5, 8]), ("module_b", [1])):
        keep = [torch.rand(u.out_channels) < 0.4 for u in model.mask_units()]
        from mwt_core.reuse import ModuleClassifier

        module = ModuleClassifier(slim(model, keep, classes=classes), classes, 0.4, restricted=True)
        module.net.config.update({"classes": classes, "keep": [k.nonzero().flatten().tolist()
                                                                 for k in keep],
                                  "keep_mask_generators": True})
        out[name] = root / name
        save_artifact(out[name], module, {**base, "class_names": [str(c) for c in classes]})
    return out


@pytest.mark.slow
def test_exports_and_loads_on_several_threads_all_succeed(stored: dict[str, Path],
                                                          tmp_path: Path) -> None:
    reference, _ = load_artifact(stored["model"])
    counter = iter(range(10_000))

    def export_job(name: str, fmt: str) -> Callable[[], None]:
        def job() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_artifact(stored[name], fmt, tmp_path / f"{name}-{next(counter)}.{fmt}")
        return job

    def load_job(name: str) -> Callable[[], None]:
        def job() -> None:
            net, _ = load_artifact(stored[name])  # a module's load slims (traces) the model
            with torch.no_grad():
                net(torch.rand(2, 3, 32, 32))
        return job

    jobs = [export_job(n, f) for n in stored for f in ("torchscript", "onnx")]
    jobs += [load_job("module_a"), load_job("module_b")]
    errors = _run_together(jobs, 2, reference, torch.rand(4, 3, 32, 32))
    assert errors == []
    assert nn.Module.__call__ is ORIGINAL_CALL and nn.Module.__getattr__ is ORIGINAL_GETATTR


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.slow
def test_torchscript_exports_one_after_another_do_not_accumulate(stored: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """Each trace registers class types in torch's process-wide compilation unit; a server
    exports artifact after artifact, so what one export registers must not outlive it."""
    import gc

    def export_round(i: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_artifact(stored["module_a"], "torchscript", tmp_path / f"m{i}.pt")
        gc.collect()

    for i in range(3):  # allocator and import warm-up
        export_round(i)
    before = _rss_mb()
    for i in range(3, 19):
        export_round(i)
    grown = _rss_mb() - before
    # Kept types cost several MB per export of a module; without them the growth is noise.
    assert grown < 24, f"16 exports grew the process by {grown:.0f} MB"
    loaded = torch.jit.load(str(tmp_path / "m18.pt"))  # what was written still loads and runs
    with torch.no_grad():
        assert loaded(torch.rand(2, 3, 32, 32)).shape == (2, 3)
