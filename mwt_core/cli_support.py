"""Plumbing shared by the ``mwt`` commands (mwt_core.cli): one-line errors, the console
and progress UI, table formatting, artifact loading and the read-only helpers of ``show``
and ``evaluate``."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mwt_core import __version__
from mwt_core.artifacts import (
    WEIGHTS_FILE,
    ArtifactError,
    load_artifact,
)
from mwt_core.checksums import sha256_file
from mwt_core.config import ModularizeConfig, TrainConfig
from mwt_core.data.datasets import DatasetBundle
from mwt_core.models import MwTNet
from mwt_core.modularize import Modularization
from mwt_core.pipeline import (
    CheckpointMismatch,
    Layout,
    NoValidationSlice,
    PipelineEvent,
    PipelineResult,
    data_for_manifest,
    dataset_ref,
    extract_classes,
    load_training_data,
    run_pipeline,
)
from mwt_core.progress import budget_text
from mwt_core.training import TrainingCancelled

if TYPE_CHECKING:
    from mwt_core.compose import Part

CREATED_BY = f"mwt-cli {__version__}"
F = TypeVar("F", bound=Callable[..., Any])


class CliError(ValueError):
    """A user-facing failure detected by the CLI itself."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def given(ctx: typer.Context, param: str) -> bool:
    """Whether the command's option ``param`` was given (command line or environment)
    rather than left at its default."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name != "DEFAULT"


def command_boundary(fn: F) -> F:
    """Turn the library's user errors into ``error: ...`` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if os.environ.get("MWT_DEBUG"):
                raise
            _fail("interrupted", code=130)
        except (ValueError, OSError, TrainingCancelled) as exc:
            # DatasetError, ArtifactError, UnknownArchitecture, SlimmingError and CliError
            # are ValueErrors; OSError covers unwritable or vanished paths.
            if os.environ.get("MWT_DEBUG"):
                raise
            _fail(_one_line(exc))
        return None

    return wrapper  # type: ignore[return-value]


class Ui:
    """Results on stdout (tables or one JSON object), progress and notes on stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        # No markup: paths and class names are printed verbatim, brackets included.
        self.out = Console(highlight=False, markup=False)
        self.err = Console(stderr=True, highlight=False, markup=False)

    def note(self, message: str) -> None:
        if not self.as_json:
            self.err.print(message)

    def progress(self) -> Progress:
        return Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=False,
        )

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        with self.err.status(message):
            yield

    def emit(self, payload: dict[str, Any], render: Callable[[], None]) -> None:
        if self.as_json:
            typer.echo(json.dumps(payload, default=str))
        else:
            render()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _require_dir(path: Path, what: str = "directory") -> Path:
    if not path.exists():
        raise CliError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise CliError(f"{path} is not a directory")
    return path


def _load_model_artifact(model_dir: Path, device: str = "cpu") -> tuple[MwTNet, dict[str, Any]]:
    _require_dir(model_dir, "model directory")
    net, manifest = load_artifact(model_dir, device=device)
    if manifest.get("kind") != "model":
        raise CliError(f"{model_dir} holds a {manifest.get('kind')}, not a model")
    return net, manifest  # type: ignore[return-value]


def _modularization_of(manifest: dict[str, Any], model_dir: Path) -> Modularization:
    data = manifest.get("modularization")
    if not data:
        raise CliError(
            f"{model_dir} has no modularization: only MwT-trained (--modular) models can be cut "
            "into modules; run `mwt modularize` on one"
        )
    try:
        return Modularization.from_json(data)
    except (KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise ArtifactError(f"the manifest's modularization is invalid: {exc}") from exc


class PipelineView:
    """Shows a pipeline run on stderr: a bar while training, a spinner while modularizing
    and saving, a bar while the class modules are written; notes as lines."""

    def __init__(self, ui: Ui, mode: str) -> None:
        self.ui = ui
        self.mode = mode
        self.kind: str | None = None
        self.widget: Any = None
        self.task: Any = None
        self.last_acc: float | None = None
        self.last_val: float | None = None

    def __enter__(self) -> PipelineView:
        return self

    def __exit__(self, *exc: object) -> None:
        self._switch(None)

    def _switch(self, kind: str | None, text: str = "") -> None:
        if kind == self.kind:
            return
        if self.widget is not None:
            if self.kind == "modules":  # the last module is written once the next phase starts
                self.widget.update(self.task, completed=self.widget.tasks[0].total)
            self.widget.stop()
        self.kind, self.widget = kind, None
        if kind in ("training", "modules"):
            self.widget = self.ui.progress()
            self.task = self.widget.add_task(text, total=None)
            self.widget.start()
        elif kind is not None:
            self.widget = self.ui.err.status(text)
            self.widget.start()

    def __call__(self, ev: PipelineEvent) -> None:
        if ev.note:
            self.ui.note(ev.note)
        p = ev.training
        if p is not None:
            self._switch("training", f"{self.mode} training")
            if p.test_acc is not None:
                self.last_acc = p.test_acc
            if p.val_acc is not None:
                self.last_val = p.val_acc
            # Validation and test accuracy are measured at epoch ends: the last ones stay shown.
            acc = f" val {_pct(self.last_val)}" if self.last_val is not None else ""
            acc += f" test {_pct(self.last_acc)}" if self.last_acc is not None else ""
            self.widget.update(self.task, total=p.epochs * p.steps,
                               completed=(p.epoch - 1) * p.steps + p.step,
                               description=f"{self.mode} epoch {p.epoch}/{p.epochs} loss {p.loss:.3f}{acc}")
        elif "module" in ev.info:
            self._switch("modules", "exporting class modules")
            self.widget.update(self.task, total=ev.info["modules"], completed=ev.info["module"] - 1)
        elif ev.phase == "modularizing":
            self._switch("modularizing", f"modularizing (tau={ev.info.get('tau')})")
        elif ev.phase == "saving":
            self._switch("saving", "saving the model")
        else:
            self._switch(ev.phase, ev.phase)


def _composition_classes(manifest: dict[str, Any]) -> list[int]:
    """The dataset classes a saved composition outputs, in output order (its sources' classes)."""
    sources = manifest.get("sources") or []
    classes = [int(c) for src in sources for c in src.get("classes") or []]
    if not manifest.get("dataset") or len(set(classes)) != len(classes):
        raise CliError("this composition joins different datasets or repeats a class across its "
                       "sources; one test split cannot score it (its recorded figures: `mwt show`)")
    return classes


def _with_arch(manifest: dict[str, Any]) -> dict[str, Any]:
    """A composition's manifest with its first part's architecture in ``config`` (the data
    loader needs one to size the images); other artifacts unchanged."""
    if manifest.get("kind") != "composition":
        return manifest
    parts = (manifest.get("config") or {}).get("parts") or []
    arch = parts[0].get("module", {}).get("arch") if parts else None
    return {**manifest, "config": {"arch": arch or ""}}


@torch.no_grad()
def _one_vs_rest_auroc(net: torch.nn.Module, data: DatasetBundle, cls: int, device: str) -> float:
    """P(the module's logit is higher on an image of ``cls`` than on another image), ties 1/2."""
    from mwt_core.data.batches import ImageBatches
    from mwt_core.devices import resolve_device

    dev = resolve_device(device)
    net.eval().to(dev)
    scores = torch.cat([net(xb)[:, 0].cpu() for xb, _ in
                        ImageBatches(data.test_x, data.test_y, data.spec, dev).ordered(512)])
    pos, neg = scores[data.test_y == cls], scores[data.test_y != cls]
    if not len(pos) or not len(neg):
        raise CliError(f"the test split needs images of class {cls} and of other classes")
    # Rank form of the Mann-Whitney statistic (average ranks for ties): O(n log n).
    order = torch.cat([pos, neg]).double()
    ranks = _average_ranks(order)
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x``, tied values sharing their average rank."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def _verify(directory: Path, manifest: dict[str, Any]) -> tuple[bool, str]:
    weights = directory / str(manifest.get("weights_file") or WEIGHTS_FILE)
    if not weights.is_file():
        return False, f"missing {weights.name}"
    actual = sha256_file(weights)
    if actual != manifest.get("sha256"):
        return False, f"checksum mismatch: manifest says {manifest.get('sha256')}, file is {actual}"
    return True, "verified"


def _source_label(src: dict[str, Any]) -> str:
    """Where a composition's source came from: the registry's module or model id (service),
    the model or module directory (`mwt compose`), else the model's sha256."""
    if src.get("module_id") is not None:
        return f"module {src['module_id']} of model {src.get('model_id')}"
    if src.get("module_dir"):
        return str(src["module_dir"])
    if src.get("model_id") is not None:
        return f"model {src['model_id']}"
    if src.get("model_dir"):
        return str(src["model_dir"])
    return f"model {str(src.get('sha256') or '?')[:12]}"


def _architecture_text(summary: dict[str, Any], config: dict[str, Any]) -> str:
    if summary["kind"] == "composition":
        parts = [p.get("module", {}) for p in config.get("parts", [])]
        return f"{len(parts)} modules: " + ", ".join(f"{p.get('arch')} x{p.get('width')}" for p in parts)
    return f"{summary['arch']} x{summary['width']}" + (" (MwT)" if summary["masked"] else "")


def run_training(cfg: TrainConfig, dataset: str, out: Path, ui: Ui, *, tau: float = ModularizeConfig.tau,
                 data_dir: Path | None = None, resume: bool = True,
                 restart_on_mismatch: bool = False, train_limit: int | None = None,
                 download: bool = False) -> tuple[PipelineResult, dict[str, Any]]:
    """Run the pipeline into ``out`` (``mwt train``'s layout) and summarise it."""
    data = load_training_data(dataset, cfg.arch, data_dir, train_limit, download=download)
    layout = Layout.run_dir(out)
    mode = "MwT" if cfg.modular else "standard"
    try:
        with PipelineView(ui, mode) as view:
            r = run_pipeline(cfg, data, layout, tau=tau, resume=resume,
                             restart_on_mismatch=restart_on_mismatch, dataset_ref=dataset_ref(dataset),
                             manifest_extra={"train_limit": train_limit} if train_limit is not None else None,
                             created_by=CREATED_BY, progress=view)
    except CheckpointMismatch as exc:
        raise CliError(f"{exc}; use another --out directory or pass --no-resume") from exc
    (out / "history.json").write_text(json.dumps(r.training.history, indent=2))
    assert r.manifest is not None
    summary = {
        "out": str(out),
        "model_dir": str(layout.model_dir),
        "modules_dir": str(layout.modules_dir) if r.modules else None,
        "arch": cfg.arch,
        "width": cfg.width,
        "dataset": data.name,
        "modular": cfg.modular,
        **r.metrics,
        "modules": [m.dir.name for m in r.modules],
        "module_krr": [m.metrics["krr"] for m in r.modules],
        "layer_coupling": r.metrics.get("layer_coupling"),
        "sha256": r.manifest["sha256"],
    }
    return r, summary


def _render_train(ui: Ui, s: dict[str, Any]) -> None:
    rows = [
        ("model", f"{s['arch']} x{s['width']} on {s['dataset']} ({'MwT' if s['modular'] else 'standard'})"),
        ("test accuracy", _pct(s["test_acc"])),
        ("validation accuracy", _pct(s.get("val_acc"))),
        ("training time", f"{s['train_seconds']:.1f} s over {s['epochs']} epochs"),
        ("params / FLOPs", f"{_num(s['params'])} / {_num(s['flops'])}"),
    ]
    if s["modular"]:
        rows += [
            ("kernel budget", budget_text(s.get("kernel_budget"))),
            ("tau", f"{s['tau']:g}"),
            ("KRR (mean over class modules)", _pct(s["krr"])),
            ("cohesion (higher is better)", f"{s['cohesion']:.4f}"),
            ("coupling (lower is better)", f"{s['coupling']:.4f}"),
        ]
    rows.append(("model artifact", s["model_dir"]))
    if s["modules_dir"]:
        rows.append(("class modules", f"{s['modules_dir']} ({len(s['modules'])} modules)"))
    ui.out.print(_kv_table("training result", rows))


def _extract(model: MwTNet, manifest: dict[str, Any], mod: Modularization, data: DatasetBundle,
             classes: list[int], out: Path, ui: Ui, *, finetune_epochs: int = 0,
             mask_generators: bool = True, device: str = "auto", latency_batch: int = 64,
             tau: float | str | None = None, margin_pp: float = ModularizeConfig.margin_pp
             ) -> dict[str, Any]:
    if finetune_epochs < 0:
        raise CliError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    with PipelineView(ui, "") as view:
        try:
            return extract_classes(model, manifest, mod, data, classes, out,
                                   finetune_epochs=finetune_epochs, mask_generators=mask_generators,
                                   device=device, created_by=CREATED_BY, progress=view,
                                   latency_batch=latency_batch, tau=tau, margin_pp=margin_pp)
        except NoValidationSlice as exc:
            raise CliError(f"--tau auto: {exc} (e.g. --tau {mod.tau:g})") from None


def _tau_line(s: dict[str, Any]) -> str:
    """How the module's threshold was decided, in one line for a person."""
    tau = f"tau {s['tau']:g}"
    if s.get("tau_mode") == "auto":
        verdict = "within" if s["met_margin"] else "none within"
        return (f"{tau}: chosen on {s['val_samples']} validation images, {verdict} "
                f"{s['margin_pp']:g} pp of the full model (module {_pct(s['module_val_acc'])}, "
                f"full model {_pct(s['full_val_acc'])})")
    if s.get("tau_mode") == "fixed":
        return f"{tau} (given)"
    note = f"; {s['tau_note']}" if s.get("tau_note") else ""
    return f"{tau} (the model's own{note})"


def _extract_table(s: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("module", justify="right")
    table.add_column("full model", justify="right")
    table.add_column("module / full", justify="right")
    table.add_row("KRR", _pct(s["krr"]), "100.00%", f"{s['krr']:.3f}")
    table.add_row("accuracy (zero training)", _pct(s["zero_shot_acc"]), _pct(s["full_model_acc"]),
                  f"{100 * (s['zero_shot_acc'] - s['full_model_acc']):+.2f} pp")
    if s["finetuned_acc"] is not None:
        table.add_row(f"accuracy (head fine-tuned {s['finetune_epochs']} ep)", _pct(s["finetuned_acc"]),
                      _pct(s["full_model_acc"]),
                      f"{100 * (s['finetuned_acc'] - s['full_model_acc']):+.2f} pp")
    table.add_row("parameters", _num(s["params"]), _num(s["full_params"]), f"{s['params_ratio']:.3f}")
    table.add_row("FLOPs / image", _num(s["flops"]), _num(s["full_flops"]), f"{s['flops_ratio']:.3f}")
    if s.get("latency_ms") is not None:
        table.add_row(f"CPU ms / image (batch {s['latency_batch']})", f"{s['latency_ms']:.3f}",
                      f"{s['full_latency_ms']:.3f}", f"{s['latency_ratio']:.3f}")
    return table


def compose_sources(sources: list[str], data_dir: Path | None, ui: Ui
                    ) -> tuple[list[Part], list[DatasetBundle], list[dict[str, Any]], list[str],
                               list[dict[str, Any]]]:
    """The parts of ``mwt compose``'s SOURCES (``MODEL_DIR:CLASSES`` or module directories),
    their datasets (as trained), a description of each source for the manifest, a tag per
    source that tells apart equal class names, and each source's artifact manifest."""
    from mwt_core.compose import CompositionError, Source, source_part
    from mwt_core.data.classes import parse_classes
    from mwt_core.module_parts import is_module_dir, load_module_parts, module_tag

    parts: list[Part] = []
    datas: list[DatasetBundle] = []
    described: list[dict[str, Any]] = []
    tags: list[str] = []
    manifests: list[dict[str, Any]] = []
    loaded_data: dict[tuple[str, str], DatasetBundle] = {}
    for text in sources:
        if is_module_dir(text):
            with ui.status(f"loading {text}"):
                try:
                    mparts, mdata, (manifest,) = load_module_parts([text], data_dir, loaded_data)
                except CompositionError as exc:
                    raise CliError(f"{text}: {exc}") from None
            if any(d.get("module_sha256") == manifest.get("sha256") for d in described):
                raise CliError(f"{text}: the same module is given twice")
            parts += mparts
            datas += mdata
            manifests.append(manifest)
            tags.append(module_tag(manifest))
            registry = manifest.get("registry") or {}
            described.append({"module_dir": text, "module_sha256": manifest.get("sha256"),
                              "sha256": (manifest.get("source_model") or {}).get("sha256"),
                              "model_id": registry.get("model_id"),
                              "dataset": manifest.get("dataset"), "classes": mparts[0].classes,
                              "class_names": mparts[0].class_names})
            continue
        model_text, sep, class_text = text.rpartition(":")
        if not sep or not model_text:
            raise CliError(f"bad source {text!r}: write MODEL_DIR:CLASSES (e.g. runs/a:3,5) or "
                           "give a module directory")
        model_dir = Path(model_text)
        with ui.status(f"loading {model_dir}"):
            model, manifest = _load_model_artifact(model_dir)
            mod = _modularization_of(manifest, model_dir)
            data = data_for_manifest(manifest, data_dir)
        names = list(manifest.get("class_names") or [str(i) for i in range(mod.num_classes)])
        classes = parse_classes(class_text, names)
        parts.append(source_part(Source(model, mod, classes, data.spec, names)))
        datas.append(data)
        manifests.append(manifest)
        tags.append(str(len(tags)))
        described.append({"model_dir": str(model_dir), "sha256": manifest.get("sha256"),
                          "dataset": manifest.get("dataset"), "classes": classes,
                          "class_names": [names[c] for c in classes]})
    return parts, datas, described, tags, manifests
