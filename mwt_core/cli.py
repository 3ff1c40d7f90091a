"""``mwt``: train with MwT, modularize, extract and evaluate modules from the shell.

Every command lives on :data:`app` (a Typer app) so the service can mount the same
commands into its own CLI; only :func:`main` exits the process.

Output conventions: results go to stdout (rich tables, or with ``--json`` exactly one
JSON object and nothing else); progress bars and notes go to stderr. A user error
(unknown architecture or dataset, bad class list, corrupt artifact, missing
directory...) prints one line ``error: ...`` on stderr and exits with status 1;
set ``MWT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

from mwt_core.artifacts import (
    load_artifact,
    read_manifest,
    save_artifact,
)
from mwt_core.checksums import sha256_file
from mwt_core.cli_support import (
    CliError,
    PipelineView,
    Ui,
    _architecture_text,
    _composition_classes,
    _extract,
    _extract_table,
    _fail,
    _kv_table,
    _load_model_artifact,
    _modularization_of,
    _num,
    _one_vs_rest_auroc,
    _pct,
    _render_train,
    _require_dir,
    _source_label,
    _tau_line,
    _verify,
    _with_arch,
    command_boundary,
    compose_sources,
    given,
    run_training,
)
from mwt_core.compose_options import (
    AUTO_COMBINE,
    CHOICES,
    DEFAULT_COMBINE,
    DEFAULT_PER_CLASS,
    METHODS,
)
from mwt_core.config import (
    DEFAULT_DATASET,
    PAPER_SETTINGS,
    ModularizeConfig,
    TrainConfig,
    check_tau,
    parse_tau,
)
from mwt_core.data.classes import parse_classes
from mwt_core.data.datasets import list_datasets
from mwt_core.models import architecture_info, list_architectures
from mwt_core.pipeline import (
    Layout,
    class_dirnames,
    data_for_manifest,
    modularization_metrics,
    remodularize,
)
from mwt_core.progress import budget_text
from mwt_core.reuse import evaluate

app = typer.Typer(
    name="mwt",
    help="MwT Hub: modular training (MwT), modularization and reuse of CNN classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_CLASSES = [3, 5, 8]

# --------------------------------------------------------------------------- options
# (the plumbing the commands share lives in mwt_core.cli_support)

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object of results to stdout and nothing else.")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(help="Where downloadable datasets live (default: $MWT_DATA_DIR or ./data)."),
]


# --------------------------------------------------------------------------- commands


_T = TrainConfig  # every training default comes from the core's config (mwt_core.config)


def _mask_lr_default() -> bool | str:
    """How --help shows mask_lr's default: None follows --lr."""
    return "same as --lr" if _T.mask_lr is None else True


def _budget_default() -> bool | str:
    """How --help shows target_krr's default: None is no budget."""
    return "none (no budget)" if _T.target_krr is None else True


@app.command("train")
@command_boundary
def train_cmd(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="Architecture (see `mwt archs`).")] = _T.arch,
    dataset: Annotated[str, typer.Option(help="Dataset name (see `mwt datasets`) or a .npz path.")] = DEFAULT_DATASET,
    width: Annotated[float | None, typer.Option(show_default="the architecture's (`mwt archs`)", help="Channel width multiplier.")] = _T.width,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = _T.epochs,
    modular: Annotated[bool, typer.Option("--modular/--standard", help="MwT (mask generators and losses) or plain training.")] = _T.modular,
    alpha: Annotated[float, typer.Option(help=f"Weight of the cohesion loss (the paper: {PAPER_SETTINGS['alpha']}).")] = _T.alpha,
    beta: Annotated[float, typer.Option(help=f"Weight of the coupling loss (the paper: {PAPER_SETTINGS['beta']}).")] = _T.beta,
    gamma: Annotated[float, typer.Option(help=f"Weight of the cross-class mask-overlap term (the paper: {PAPER_SETTINGS['gamma']}).")] = _T.gamma,
    lr: Annotated[float, typer.Option(help="SGD learning rate (cosine annealed).")] = _T.lr,
    mask_lr: Annotated[float | None, typer.Option(show_default=_mask_lr_default(), help="Learning rate of the mask generators (the paper: same as --lr).")] = _T.mask_lr,
    target_krr: Annotated[float | None, typer.Option(show_default=_budget_default(), help="Kernel budget of MwT training: the share of the masked kernels a sample may keep on, on average, in (0, 1]; 1 turns it off (as --no-budget).")] = _T.target_krr,
    no_budget: Annotated[bool, typer.Option("--no-budget", help="No kernel budget: the paper's loss alone.")] = False,
    budget_rate: Annotated[float, typer.Option(help="How fast the budget's multiplier may grow over the run (its step: this / the run's optimiser steps).")] = _T.budget_rate,
    budget_warmup: Annotated[float, typer.Option(help="Share of the run over which the budget tightens from every kernel to --target-krr.")] = _T.budget_warmup,
    val_fraction: Annotated[float, typer.Option(help="Share of the training split held out for validation (stratified, fixed by --seed; 0: none).")] = _T.val_fraction,
    guard_pp: Annotated[float, typer.Option(help="Accuracy guard: validation accuracy this many points below the run's best loosens the budget.")] = _T.guard_pp,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay.")] = _T.weight_decay,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = _T.batch_size,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _T.seed,
    device: DeviceOpt = _T.device,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision on GPU.")] = _T.amp,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop (+ flip where the dataset allows).")] = _T.augment,
    data_dir: DataDirOpt = None,
    download: Annotated[bool, typer.Option("--download", help="Download torchvision datasets missing from --data-dir.")] = False,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: runs/<arch>-<dataset>-<mode>).")] = None,
    tau: Annotated[float, typer.Option(help="Modularization threshold (MwT runs).")] = ModularizeConfig.tau,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from OUT/checkpoint if present.")] = True,
    train_limit: Annotated[int | None, typer.Option(help="Use only the first N training images (smoke tests).")] = None,
    init_from: Annotated[str | None, typer.Option(help="Start from this safetensors state dict (fresh mask generators).")] = _T.init_from,
    as_json: JsonOpt = False,
) -> None:
    """Train a model; MwT runs are then modularized and cut into one module per class.

    Options not given take TrainConfig's defaults, the same for every data set and with or
    without --init-from (mwt_core.config)."""
    ui = Ui(as_json)
    if no_budget and given(ctx, "target_krr"):
        raise CliError("give --target-krr or --no-budget, not both")
    cfg = TrainConfig(arch=arch, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, mask_lr=mask_lr, alpha=alpha, beta=beta,
                      gamma=gamma, target_krr=None if no_budget else target_krr,
                      budget_rate=budget_rate, budget_warmup=budget_warmup,
                      val_fraction=val_fraction, guard_pp=guard_pp, modular=modular, seed=seed, device=device, amp=amp, augment=augment,
                      init_from=init_from)
    if out is None:
        stem = Path(dataset).stem if dataset.lower().endswith(".npz") else dataset
        out = Path("runs") / f"{cfg.arch}-{class_dirnames([stem])[0]}-{'mwt' if modular else 'std'}"
    _, summary = run_training(cfg, dataset, out, ui, tau=tau, data_dir=data_dir, resume=resume,
                              train_limit=train_limit, download=download)
    ui.emit(summary, lambda: _render_train(ui, summary))


@app.command("modularize")
@command_boundary
def modularize_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A model artifact directory (OUT/model of `mwt train`).")],
    tau: Annotated[float, typer.Option(help="Modularization threshold.")] = ModularizeConfig.tau,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    modules_out: Annotated[Path | None, typer.Option(help="Write one module per class here (default: re-cut the modules `mwt train` wrote beside the model, if any).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-modularize a saved MwT model with another threshold; updates its manifest and re-cuts
    its class modules (those beside it, or into --modules-out)."""
    ui = Ui(as_json)
    check_tau(tau)
    model, manifest = _load_model_artifact(model_dir)
    if not model.mask_units():
        raise CliError(f"{model_dir} was trained without MwT (--standard); it has no masks to modularize")
    data = data_for_manifest(manifest, data_dir)
    # Modules cut at the old threshold would no longer match the manifest: re-cut them too.
    modules_out = modules_out if modules_out is not None else Layout.modules_beside(model_dir)
    old = (manifest.get("modularization") or {}).get("tau")
    with PipelineView(ui, "") as view:
        r = remodularize(model, manifest, data, model_dir, tau=tau, device=device,
                         modules_dir=modules_out, progress=view)
    mod, seconds = r.modularization, r.seconds
    summary = {
        "model_dir": str(model_dir), "previous_tau": old, **modularization_metrics(mod),
        "module_krr": mod.krr, "per_class_cohesion": mod.per_class_cohesion,
        "layer_coupling": mod.layer_coupling(), "modularize_seconds": seconds,
        "modules_dir": str(modules_out) if r.modules else None,
    }

    def render() -> None:
        table = Table(title=f"modularization of {model_dir} (tau {old} -> {tau:g})", title_justify="left")
        for col in ("class", "KRR", "cohesion"):
            table.add_column(col)
        names = manifest.get("class_names") or []
        for c, (krr, coh) in enumerate(zip(mod.krr, mod.per_class_cohesion, strict=True)):
            table.add_row(f"{c} {names[c] if c < len(names) else ''}".strip(), _pct(krr), f"{coh:.4f}")
        table.add_section()
        table.add_row("model", _pct(mod.model_krr), f"{mod.cohesion:.4f}")
        ui.out.print(table)
        ui.out.print(f"coupling {mod.coupling:.4f}; manifest updated ({seconds:.1f} s)")
        if r.modules:
            ui.out.print(f"{len(r.modules)} class modules re-cut at tau {tau:g} in {modules_out}")
        else:
            ui.out.print("no class modules beside the model to re-cut (--modules-out DIR writes them)")

    ui.emit(summary, render)


@app.command("extract")
@command_boundary
def extract_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A modularized model artifact directory.")],
    classes: Annotated[str, typer.Option(help="Comma-separated class indices or names, e.g. 3,5,8.")],
    out: Annotated[Path, typer.Option(help="Where to write the module artifact.")],
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tune the module's head this many epochs.")] = 0,
    mask_generators: Annotated[bool, typer.Option("--mask-generators/--no-mask-generators", help="Keep the mask generators (exact masked computation) or drop them (paper's modules).")] = True,
    latency_batch: Annotated[int, typer.Option(help="Time module and model on the CPU with batches of N images (0: skip).", min=0)] = 64,
    tau: Annotated[str | None, typer.Option(help="'auto': the smallest module within --margin-pp of the full model on the model's validation slice; a number in (0, 1]: that threshold. Default: auto if the model was trained with a validation slice, else the model's own tau.")] = None,
    margin_pp: Annotated[float, typer.Option(help="With tau auto: how many percentage points of validation accuracy the module may lose against the full model on its classes.", min=0, max=100)] = ModularizeConfig.margin_pp,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Build the module of a class set from a modularized model, evaluate and save it."""
    ui = Ui(as_json)
    try:
        chosen_tau = parse_tau(tau) if tau is not None else None
    except ValueError as exc:
        raise CliError(f"--tau: {exc}") from None
    model, manifest = _load_model_artifact(model_dir)
    mod = _modularization_of(manifest, model_dir)
    names = list(manifest.get("class_names") or [str(i) for i in range(mod.num_classes)])
    class_list = parse_classes(classes, names)
    data = data_for_manifest(manifest, data_dir)
    s = _extract(model, manifest, mod, data, class_list, out, ui, finetune_epochs=finetune_epochs,
                 mask_generators=mask_generators, device=device, latency_batch=latency_batch,
                 tau=chosen_tau, margin_pp=margin_pp)

    def render() -> None:
        ui.out.print(_extract_table(s, f"module for classes {', '.join(s['class_names'])}"))
        ui.out.print(_tau_line(s))
        ui.out.print(f"saved to {out}")

    ui.emit(s, render)


@app.command("compose")
@command_boundary
def compose_cmd(
    sources: Annotated[list[str], typer.Argument(
        help="MODEL_DIR:CLASSES per source model (e.g. runs/a:3,5 runs/b:cat,dog), or module "
             "directories as `mwt download` unpacks the registry's per-class modules (one part "
             "each); same input shape, in output order.")],
    out: Annotated[Path, typer.Option(help="Where to write the composed classifier artifact.")],
    calibration_per_class: Annotated[int, typer.Option(
        "--calibrate", help="Labelled training images per class for the labelled combine methods "
                            "(scale_bias, head).")] = DEFAULT_PER_CLASS,
    combine: Annotated[str, typer.Option(
        help=f"How the sources' outputs become one answer: {', '.join(METHODS)}, or "
             f"{AUTO_COMBINE} (the no-label method most accurate on the source models' "
             "validation slices).")] = DEFAULT_COMBINE,
    torchscript: Annotated[Path | None, typer.Option(
        help="Also export a TorchScript file (images in [0, 1] in, one logit per class out).")] = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Compose classes of modularized models, or downloaded module artifacts, into one
    classifier; measure and save it. Module artifacts give the registry's composition of the
    same modules (POST /compositions with `modules`) to 1e-5."""
    from mwt_core.compose import (
        CompositionError,
        composition_manifest,
        distinct_labels,
        measure_parts,
    )
    from mwt_core.export import export_torchscript

    if calibration_per_class < 0:
        raise CliError(f"--calibrate must be >= 0, got {calibration_per_class}")
    if combine not in CHOICES:
        raise CliError(f"unknown --combine {combine!r}; choose one of {', '.join(CHOICES)}")
    ui = Ui(as_json)
    parts, datas, described, tags, manifests = compose_sources(sources, data_dir, ui)
    validation = None
    if combine == AUTO_COMBINE:
        from mwt_core.pipeline import composition_validation

        validation = composition_validation([(m, d, p.classes) for m, d, p
                                             in zip(manifests, datas, parts, strict=True)])
    labels = distinct_labels([(t, d["class_names"]) for t, d in zip(tags, described, strict=True)])
    with ui.status("composing, fitting and evaluating"):
        try:
            composed, metrics = measure_parts(parts, datas, calibration_per_class, labels,
                                              device=device, combine=combine,
                                              validation=validation)
        except CompositionError as exc:
            raise CliError(str(exc)) from None
    for d, m in zip(described, metrics["sources"], strict=True):
        d.update(krr=m["krr"], zero_training_accuracy=m["zero_training_accuracy"])
    metrics["sources"] = described
    written = save_artifact(out, composed, composition_manifest(
        parts[0].spec, labels, described, metrics, created_by="mwt compose"))
    if torchscript is not None:
        export_torchscript(composed, written, torchscript)
    summary = {**metrics, "out": str(out), "class_names": labels, "sha256": written["sha256"],
               "torchscript": str(torchscript) if torchscript else None}

    def render() -> None:
        table = Table(title=f"composition of {len(parts)} part(s): {', '.join(labels)}",
                      title_justify="left")
        for col in ("", f"accuracy ({metrics['combine']})", "raw logits", "full models", "KRR"):
            table.add_column(col, justify="right" if col else "left")
        table.add_row("composed", _pct(metrics["accuracy"]), _pct(metrics["raw_accuracy"]),
                      _pct(metrics["baseline_accuracy"]), _pct(metrics["krr"]))
        for d in described:
            table.add_row(f"{d.get('model_dir') or d.get('module_dir')} {','.join(d['class_names'])}",
                          _pct(d["zero_training_accuracy"]), "-", "-", _pct(d["krr"]))
        ui.out.print(table)
        ui.out.print(f"{metrics['test_samples']} test images, {metrics['calibration_samples']} "
                     f"labelled training images, {metrics['own_samples']} sources' own training "
                     f"images; {_num(metrics['params'])} parameters ({metrics['combine_params']} "
                     f"in the combination), {_num(metrics['flops'])} FLOPs, "
                     f"{metrics['latency_ms']:.2f} ms per image; saved to {out}")

    ui.emit(summary, render)


@app.command("export")
@command_boundary
def export_cmd(
    artifact_dir: Annotated[Path, typer.Argument(
        help="A model, module or composition artifact directory.")],
    out: Annotated[Path, typer.Option(help="The file to write.")],
    fmt: Annotated[str, typer.Option(
        "--format", help="torchscript or onnx.")] = "torchscript",
    as_json: JsonOpt = False,
) -> None:
    """Export an artifact as a self-contained TorchScript or ONNX file (images in [0, 1] in,
    one logit per class out; class names and input spec embedded)."""
    from mwt_core.export import check_format, export_artifact, read_export_metadata

    ui = Ui(as_json)
    _require_dir(artifact_dir, "artifact directory")
    check_format(fmt)
    with ui.status(f"exporting to {fmt}"):
        path = export_artifact(artifact_dir, fmt, out)
    meta = read_export_metadata(path)
    s: dict[str, Any] = {"artifact": str(artifact_dir), "format": fmt, "out": str(path),
         "size_bytes": path.stat().st_size, "sha256": sha256_file(path), "metadata": meta}

    def render() -> None:
        rows = [("artifact", f"{artifact_dir} ({meta['kind']})"), ("format", fmt),
                ("written", f"{path} ({_num(s['size_bytes'])} bytes)"),
                ("input", f"N x {' x '.join(map(str, meta['input']['shape'][1:]))}, float32 in [0, 1]"),
                ("classes", ", ".join(meta["class_names"])),
                ("scores", f"logits; {meta['output']['scoring']} for probabilities")]
        ui.out.print(_kv_table("export", rows))

    ui.emit(s, render)


@app.command("evaluate")
@command_boundary
def evaluate_cmd(
    artifact_dir: Annotated[Path, typer.Argument(help="A model or module artifact directory.")],
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Accuracy of a model, module or composition artifact on its dataset's test split."""
    ui = Ui(as_json)
    _require_dir(artifact_dir, "artifact directory")
    with ui.status("loading"):
        net, manifest = load_artifact(artifact_dir)
        kind = manifest.get("kind")
        classes = None
        if kind == "module":
            classes = [int(c) for c in manifest["config"]["classes"]]
        elif kind == "composition":
            classes = _composition_classes(manifest)
        data = data_for_manifest(_with_arch(manifest), data_dir)
    recorded = (manifest.get("metrics") or {}).get("test_acc")
    s: dict[str, Any] = {"artifact": str(artifact_dir), "kind": kind, "dataset": manifest.get("dataset"),
         "classes": classes, "recorded_test_acc": recorded}
    if classes is not None and len(classes) == 1:
        # One output always wins an argmax, so "accuracy" would read 100%: score the module
        # one-vs-rest instead (threshold-free AUROC of its logit on the whole test split) and
        # show the registry's figure for the class, the full model's recall on it.
        with ui.status("evaluating one-vs-rest"):
            auroc = _one_vs_rest_auroc(net, data, classes[0], device)
        class_recall = (manifest.get("metrics") or {}).get("accuracy")
        s.update(accuracy=None, one_vs_rest_auroc=auroc, samples=int(data.test_y.numel()),
                 positives=int((data.test_y == classes[0]).sum()),
                 full_model_class_recall=class_recall)
    else:
        with ui.status("evaluating"):
            acc = evaluate(net, data, classes, device=device)
        samples = (int(data.test_y.numel()) if classes is None
                   else int(torch.isin(data.test_y, torch.tensor(classes)).sum()))
        s.update(accuracy=acc, samples=samples)

    def render() -> None:
        rows = [("artifact", f"{artifact_dir} ({kind})"), ("dataset", str(manifest.get("dataset")))]
        if classes is not None:
            rows.append(("classes", ", ".join(manifest.get("class_names") or map(str, classes))))
        if s["accuracy"] is not None:
            rows.append(("accuracy", f"{_pct(s['accuracy'])} on {s['samples']} test images"))
        else:
            rows.append(("accuracy", "n/a: a one-output module always wins an argmax"))
            rows.append(("one-vs-rest AUROC", f"{s['one_vs_rest_auroc']:.4f} ({s['positives']} of "
                                              f"{s['samples']} test images are the class)"))
            if s["full_model_class_recall"] is not None:
                rows.append(("full model's recall on the class", _pct(s["full_model_class_recall"])))
        if recorded is not None and s["accuracy"] is not None:  # a one-output "100%" misleads
            rows.append(("recorded at creation", _pct(recorded)))
        ui.out.print(_kv_table("evaluation", rows))

    ui.emit(s, render)


@app.command("show")
@command_boundary
def show_cmd(
    artifact_dir: Annotated[Path, typer.Argument(help="A model or module artifact directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Summary of an artifact's manifest; checks the weights' sha256 (exit 1 if it fails)."""
    ui = Ui(as_json)
    _require_dir(artifact_dir, "artifact directory")
    manifest = read_manifest(artifact_dir)
    ok, why = _verify(artifact_dir, manifest)
    config = manifest.get("config") or {}
    metrics = manifest.get("metrics") or {}
    mz = manifest.get("modularization") or {}
    s: dict[str, Any] = {
        "artifact": str(artifact_dir), "kind": manifest.get("kind"), "arch": config.get("arch"),
        "width": config.get("width"), "masked": config.get("masked"), "dataset": manifest.get("dataset"),
        "class_names": manifest.get("class_names"), "classes": config.get("classes"),
        "input_spec": manifest.get("input_spec"), "params": manifest.get("params"),
        "size_bytes": manifest.get("size_bytes"), "metrics": metrics,
        "tau": mz.get("tau"), "train_config": manifest.get("train_config"),
        "sha256": manifest.get("sha256"), "sha256_verified": ok, "verification": why,
        "created_by": manifest.get("created_by"),
    }

    def render() -> None:
        names = list(manifest.get("class_names") or [])
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        spec = manifest.get("input_spec") or {}
        rows = [
            ("kind", str(s["kind"])),
            ("architecture", _architecture_text(s, config)),
            ("dataset", str(s["dataset"])),
            ("classes", shown or "-"),
            ("input", f"{spec.get('channels')}x{spec.get('size')}x{spec.get('size')}" if spec else "-"),
            ("parameters", _num(s["params"])),
            ("weights", f"{_num(s['size_bytes'])}B"),
            ("sha256", f"{str(s['sha256'])[:16]}... {'verified' if ok else 'NOT VERIFIED: ' + why}"),
        ]
        if s["tau"] is not None:
            rows.append(("modularization tau", f"{s['tau']:g}"))
        tc = s["train_config"] or {}
        if tc:
            rows.append(("training", f"{tc.get('epochs')} epochs, {'MwT' if tc.get('modular') else 'standard'}, "
                                     f"lr {tc.get('lr')}, batch {tc.get('batch_size')}, seed {tc.get('seed')}"))
        for key, value in metrics.items():
            if key == "sources" and isinstance(value, list):
                # The metrics' sources hold the figures; the manifest's, where they came from.
                origins = manifest.get("sources") or []
                for i, src in enumerate(value):
                    src = {**(origins[i] if i < len(origins) else {}), **src}
                    acc = src.get("zero_training_accuracy")
                    rows.append((f"source {_source_label(src)}",
                                 f"classes {src.get('classes')}, KRR {_pct(src.get('krr'))}, "
                                 f"module accuracy {_pct(acc)}"))
                continue
            if key == "kernel_budget":
                text = budget_text(value)
            elif isinstance(value, float):
                text = _pct(value) if ("acc" in key or key == "krr") else f"{value:.4g}"
            elif isinstance(value, int) and key in ("params", "flops", "full_params", "full_flops"):
                text = _num(value)
            else:
                text = str(value)
            rows.append((key, text))
        ui.out.print(_kv_table(f"{artifact_dir}", rows))

    ui.emit(s, render)
    if not ok:
        _fail(f"{artifact_dir}: {why}")


@app.command("datasets")
@command_boundary
def datasets_cmd(data_dir: DataDirOpt = None, as_json: JsonOpt = False) -> None:
    """List the built-in datasets and whether their files are present."""
    ui = Ui(as_json)
    infos = list_datasets(data_dir)

    def render() -> None:
        table = Table(title="datasets (or give the path of a .npz file)", title_justify="left")
        for col in ("name", "classes", "image", "available", "source"):
            table.add_column(col)
        for i in infos:
            table.add_row(i.name, str(i.num_classes), f"{i.channels}x{i.size}x{i.size}",
                          "yes" if i.available else "no", i.source)
        ui.out.print(table)

    ui.emit({"datasets": [dataclasses.asdict(i) for i in infos]}, render)


@app.command("archs")
@command_boundary
def archs_cmd(as_json: JsonOpt = False) -> None:
    """List the architectures."""
    ui = Ui(as_json)
    infos = [architecture_info(a) for a in list_architectures()]

    def render() -> None:
        table = Table(title="architectures", title_justify="left")
        for col in ("name", "min input", "width", "default width", "description"):
            table.add_column(col)
        for i in infos:
            about = i.description
            if i.features:
                about += f" [{', '.join(i.features)}]"
            if i.unsupported:
                about = f"not trainable: {i.unsupported}"
            width = "any" if i.width_multiplier else "1 only"
            table.add_row(i.name, f"{i.min_input_size}x{i.min_input_size}", width,
                          f"{i.default_width:g}", about)
        ui.out.print(table)

    ui.emit({"architectures": [dataclasses.asdict(i) for i in infos]}, render)


DEMO_DATASET = "digits"


def demo_config(*, epochs: int = TrainConfig.epochs, width: float | None = TrainConfig.width,
                seed: int = TrainConfig.seed, device: str = "auto") -> TrainConfig:
    """What ``mwt demo`` trains on :data:`DEMO_DATASET` (docs/defaults.md's table reads it):
    TrainConfig's defaults, as ``mwt train`` takes them."""
    return TrainConfig(arch="simcnn", width=width, epochs=epochs, modular=True, seed=seed,
                       device=device)


@app.command("demo")
@command_boundary
def demo_cmd(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = TrainConfig.epochs,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path(".mwt/demo"),
    width: Annotated[float | None, typer.Option(show_default="SimCNN's (`mwt archs`)", help="SimCNN width multiplier.")] = TrainConfig.width,
    tau: Annotated[float, typer.Option(help="Modularization threshold.")] = ModularizeConfig.tau,
    seed: Annotated[int, typer.Option(help="Random seed.")] = TrainConfig.seed,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """MwT in a few minutes: train SimCNN on digits, modularize, reuse the {3,5,8} module."""
    ui = Ui(as_json)
    cfg = demo_config(epochs=epochs, width=width, seed=seed, device=device)
    ui.note(f"MwT demo: simcnn x{cfg.width} on digits, {epochs} epochs -> {out}")
    r, t = run_training(cfg, DEMO_DATASET, out, ui, tau=tau, restart_on_mismatch=True)
    assert r.modularization is not None and r.manifest is not None
    ex = _extract(r.model, r.manifest, r.modularization, r.data, DEMO_CLASSES,
                  out / "module_3_5_8", ui, device=device)
    summary = {
        "out": str(out), "epochs": epochs, "width": cfg.width, "test_acc": t["test_acc"],
        "train_seconds": t["train_seconds"], "krr": t["krr"], "cohesion": t["cohesion"],
        "coupling": t["coupling"], "tau": tau, "module_classes": DEMO_CLASSES,
        "module_tau": ex["tau"], "module_tau_mode": ex["tau_mode"],
        "module_krr": ex["krr"], "module_acc": ex["accuracy"], "full_model_acc_on_module_classes":
        ex["full_model_acc"], "module_params": ex["params"], "full_params": ex["full_params"],
        "module_flops": ex["flops"], "full_flops": ex["full_flops"],
        "params_ratio": ex["params_ratio"], "flops_ratio": ex["flops_ratio"],
        "model_dir": t["model_dir"], "module_dir": ex["out"],
    }

    def render() -> None:
        _render_train(ui, t)
        ui.out.print(_extract_table(ex, "reusing the module of classes 3, 5, 8 (no retraining)"))
        ui.out.print(_tau_line(ex))
        ui.out.print(
            f"\nThe {{3,5,8}} module keeps {_pct(ex['krr'])} of the kernels, "
            f"{_pct(ex['params_ratio'])} of the parameters and {_pct(ex['flops_ratio'])} of the FLOPs; "
            f"its accuracy on 3/5/8 is {_pct(ex['accuracy'])} vs {_pct(ex['full_model_acc'])} "
            "for the full model."
        )
        ui.out.print("\nNext steps:")
        ui.out.print(f"  mwt show {t['model_dir']}", soft_wrap=True)
        ui.out.print(f"  mwt extract {t['model_dir']} --classes 0,1 --out {out / 'module_0_1'}",
                     soft_wrap=True)
        ui.out.print(f"  mwt modularize {t['model_dir']} --tau 0.8", soft_wrap=True)

    ui.emit(summary, render)


def main() -> None:
    """Console-script entry point (``mwt``)."""
    app(prog_name="mwt")


if __name__ == "__main__":
    main()
