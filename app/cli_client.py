"""``mwt`` client commands: submit, upload-weights, weights, watch, jobs, cancel, models,
modules, download, compose. They talk to ``--url`` (MWT_URL, default http://127.0.0.1:8000)
with ``--key`` (MWT_API_KEY)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from app import cli_common as common
from app.cli_common import (
    Col,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    _call,
    _compact,
    _fail,
    _pct,
    _print_page,
    _short_id,
    _table,
    app,
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
)
from mwt_core.progress import budget_text

_T = TrainConfig  # the same defaults as POST /jobs {} and `mwt train` (mwt_core.config)


@app.command()
def submit(
    ctx: typer.Context,
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    dataset: Annotated[str, typer.Option(help="Dataset name.")] = DEFAULT_DATASET,
    arch: Annotated[str, typer.Option(help="Architecture.")] = _T.arch,
    width: Annotated[
        float | None, typer.Option(show_default="the architecture's", help="Width multiplier.")
    ] = _T.width,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = _T.epochs,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = _T.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = _T.lr,
    alpha: Annotated[float, typer.Option(help=f"Cohesion loss weight (the paper: {PAPER_SETTINGS['alpha']}).")] = _T.alpha,
    beta: Annotated[float, typer.Option(help=f"Coupling loss weight (the paper: {PAPER_SETTINGS['beta']}).")] = _T.beta,
    mask_lr: Annotated[
        float | None,
        typer.Option(show_default="same as --lr" if _T.mask_lr is None else True,
                     help="Mask-generator learning rate (the paper: same as --lr)."),
    ] = _T.mask_lr,
    gamma: Annotated[
        float, typer.Option(help=f"Cross-class mask-overlap weight (the paper: {PAPER_SETTINGS['gamma']}).")
    ] = _T.gamma,
    target_krr: Annotated[
        float | None,
        typer.Option(show_default="none (no budget)" if _T.target_krr is None else True,
                     help="Kernel budget: the share of the masked kernels a sample may keep on, "
                     "in (0, 1]; 1 turns it off (as --no-budget)."),
    ] = _T.target_krr,
    no_budget: Annotated[
        bool, typer.Option("--no-budget", help="No kernel budget: the paper's loss alone.")
    ] = False,
    budget_rate: Annotated[
        float, typer.Option(help="How fast the budget's multiplier may grow over the run.")
    ] = _T.budget_rate,
    budget_warmup: Annotated[
        float, typer.Option(help="Share of the run over which the budget tightens to --target-krr.")
    ] = _T.budget_warmup,
    val_fraction: Annotated[
        float, typer.Option(help="Share of the training split held out for validation (0: none).")
    ] = _T.val_fraction,
    guard_pp: Annotated[
        float,
        typer.Option(help="Accuracy guard: validation accuracy this many points below the best loosens the budget."),
    ] = _T.guard_pp,
    tau: Annotated[float, typer.Option(help="Modularization threshold.")] = ModularizeConfig.tau,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _T.seed,
    standard: Annotated[
        bool, typer.Option("--standard", help="Standard training (no modules).")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Model name (default <dataset>-<arch>).")] = None,
    init_from: Annotated[
        str | None, typer.Option(help="Start from weights uploaded with `mwt upload-weights`.")
    ] = _T.init_from,
    init_from_model: Annotated[
        int | None, typer.Option(help="Start from a ready registry model's weights (its id).")
    ] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe submit key.")] = None,
    watch_it: Annotated[
        bool, typer.Option("--watch", help="Follow the job until it ends.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a training job (options not given take the server's defaults)."""
    from mwt_core.cli_support import given

    if no_budget and given(ctx, "target_krr"):
        _fail("give --target-krr or --no-budget, not both")
    params = dict(
        dataset=dataset, arch=arch, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
        alpha=alpha, beta=beta, mask_lr=mask_lr, gamma=gamma, target_krr=target_krr,
        budget_rate=budget_rate, budget_warmup=budget_warmup, val_fraction=val_fraction, guard_pp=guard_pp, tau=tau, seed=seed,
        modular=not standard, name=name, init_from=init_from, init_from_model=init_from_model,
    )
    # Only what was asked for is sent: the server fills in the rest from the one place the
    # defaults live (mwt_core.config), so a server with other defaults than this client's
    # applies its own.
    option = {"modular": "standard", "target_krr": "no_budget" if no_budget else "target_krr"}
    params = {k: v for k, v in params.items() if given(ctx, option.get(k, k))}
    if no_budget:
        # 1 rather than null: the client leaves null values out of a request (the server's
        # default would apply), and a budget of every kernel is no budget.
        params["target_krr"] = 1.0
    with common._client(url, key) as hub:
        job = _call(hub.submit_job, idempotency_key=idempotency_key, **params)
        if as_json and not watch_it:
            common.out.print_json(json.dumps(job))
            return
        common.err.print(f"job [bold]{job['id']}[/] {job['status']}")
        if watch_it:
            _watch(hub, job["id"], as_json)
        elif not as_json:
            common.out.print(job["id"])


@app.command("upload-weights")
def upload_weights(
    name: Annotated[str, typer.Argument(help="Name jobs refer to (--init-from NAME).")],
    path: Annotated[Path, typer.Argument(help="A safetensors state dict.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
) -> None:
    """Upload weights (a safetensors state dict) that training jobs can start from."""
    if not path.is_file():
        _fail(f"no file at {path}")
    with common._client(url, key) as hub:
        r = _call(hub.upload_weights, name, path)
    common.out.print(f"weights {r['name']}: {r['tensors']} tensors, {r['size_bytes']} bytes, sha256 {r['sha256']}",
              soft_wrap=True)  # the digest stays one piece


@app.command("weights")
def weights_cmd(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    delete: Annotated[str | None, typer.Option(help="Delete the weights of this name (admin key).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the uploaded weights jobs can start from (or delete one with --delete)."""
    with common._client(url, key) as hub:
        if delete is not None:
            _call(hub.delete_weights, delete)
            common.out.print(f"weights {delete} deleted")
            return
        items = _call(hub.weights)
    if as_json:
        common.out.print_json(json.dumps(items))
        return
    common.out.print(_table(f"weights ({len(items)})", [Col("name", "text"), Col("tensors", "num"),
                                                 Col("params", "num"), Col("dtypes", drop=1),
                                                 Col("size", "num")],
                     [[w["name"], w["tensors"], _compact(w["params"]), ", ".join(w["dtypes"]),
                       _compact(w["size_bytes"], "B")] for w in items]))


def _watch(hub: Any, job_id: str, as_json: bool) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=common.err,
        transient=False,
    ) as bar:
        task = bar.add_task("queued", total=100)
        # Validation and test accuracy come with epoch ends only: the last ones stay shown.
        last: dict[str, float] = {}

        def update(job: dict[str, Any]) -> None:
            p = job.get("progress") or {}
            phase = p.get("phase") or job["status"]
            desc = f"{job['status']}: {phase}"
            if p.get("epoch") is not None and p.get("epochs"):
                desc += f" epoch {p['epoch']}/{p['epochs']}"
            if p.get("loss") is not None:
                desc += f" loss {p['loss']:.3f}"
            last.update({k: p[k] for k in ("val_acc", "test_acc") if p.get(k) is not None})
            if "val_acc" in last:
                desc += f" val {_pct(last['val_acc'])}"
            if "test_acc" in last:
                desc += f" test {_pct(last['test_acc'])}"
            bar.update(task, completed=job.get("percent") or 0, description=desc)

        job = _call(hub.wait, job_id, on_update=update)
        bar.update(task, completed=100 if job["status"] == "succeeded" else job.get("percent") or 0)
    if as_json:
        common.out.print_json(json.dumps(job))
    else:
        r = job.get("result") or {}
        line = f"job {job_id} {job['status']}"
        if job["status"] == "succeeded" and job["kind"] == "train":
            line += (
                f": model {r.get('model_id')} ({r.get('model_name')} v{r.get('model_version')}), "
                f"accuracy {_pct(r.get('accuracy'))}, KRR {_pct(r.get('krr'))}, {r.get('modules')} modules"
            )
            if r.get("val_acc") is not None:
                line += f", validation {_pct(r['val_acc'])}"
            if r.get("kernel_budget"):
                line += f", kernel budget {budget_text(r['kernel_budget'])}"
        elif job["status"] == "succeeded":
            line += f": composition {r.get('composition_id')}, accuracy {_pct(r.get('accuracy'))}"
        elif job.get("error"):
            line += f": {job['error']}"
        common.out.print(line)
    if job["status"] != "succeeded":
        raise typer.Exit(1)
    return job


@app.command()
def watch(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a job's progress (live, Server-Sent Events) until it ends."""
    with common._client(url, key) as hub:
        _watch(hub, job_id, as_json)


@app.command()
def jobs(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    status: Annotated[list[str] | None, typer.Option(help="Filter by status (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="Page size.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    with common._client(url, key) as hub:
        page = _call(hub.jobs, status=status, limit=limit)
    _print_page(
        page,
        as_json,
        "jobs",
        [
            (Col("id", "id"), lambda j: _short_id(j["id"])),
            (Col("kind"), lambda j: j["kind"]),
            (Col("status"), lambda j: j["status"]),
            (Col("dataset", drop=2, max_width=12), lambda j: j["dataset"]),
            (Col("arch", drop=3, max_width=10), lambda j: j["arch"]),
            (Col("done", "num"), lambda j: None if j.get("percent") is None else f"{j['percent']:.0f}%"),
            (Col("try", "num", drop=4), lambda j: j["attempts"]),
            (Col("model", "num"), lambda j: j.get("model_id")),
            (Col("error", drop=1, max_width=30), lambda j: j.get("error") or ""),
        ],
    )


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument()],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
) -> None:
    """Cancel a job."""
    with common._client(url, key) as hub:
        job = _call(hub.cancel, job_id)
    common.out.print(f"job {job_id}: {job['status']}{' (stopping)' if job['cancel_requested'] else ''}")


@app.command()
def models(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    dataset: Annotated[str | None, typer.Option()] = None,
    arch: Annotated[str | None, typer.Option()] = None,
    min_accuracy: Annotated[float | None, typer.Option()] = None,
    max_krr: Annotated[float | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List ready models."""
    with common._client(url, key) as hub:
        page = _call(
            hub.models,
            dataset=dataset,
            arch=arch,
            min_accuracy=min_accuracy,
            max_krr=max_krr,
            limit=limit,
        )
    _print_page(
        page,
        as_json,
        "models",
        [
            (Col("id", "num"), lambda m: m["id"]),
            (Col("name", max_width=20), lambda m: m["name"]),
            (Col("v", "num"), lambda m: m["version"]),
            (Col("dataset", drop=5, max_width=12), lambda m: m["dataset"]),
            (Col("arch", drop=3, max_width=10), lambda m: m["arch"]),
            (Col("width", "num", drop=4), lambda m: f"{m['width']:g}"),
            (Col("accuracy", "num"), lambda m: _pct(m["accuracy"])),
            (Col("KRR", "num"), lambda m: _pct(m["krr"])),
            (Col("cohesion", "num", drop=1),
             lambda m: None if m["cohesion"] is None else f"{m['cohesion']:.3f}"),
            (Col("coupling", "num", drop=2),
             lambda m: None if m["coupling"] is None else f"{m['coupling']:.3f}"),
            (Col("params", "num"), lambda m: _compact(m["params"])),
        ],
    )


@app.command()
def modules(
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    dataset: Annotated[str | None, typer.Option()] = None,
    arch: Annotated[str | None, typer.Option(help="Architecture of the module's model.")] = None,
    model_id: Annotated[int | None, typer.Option()] = None,
    class_name: Annotated[str | None, typer.Option()] = None,
    class_index: Annotated[int | None, typer.Option()] = None,
    max_krr: Annotated[float | None, typer.Option()] = None,
    min_accuracy: Annotated[float | None, typer.Option()] = None,
    sort: Annotated[
        str | None,
        typer.Option(help="krr, accuracy, created or id; '-' prefix for descending (e.g. -accuracy)."),
    ] = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Query modules across models."""
    with common._client(url, key) as hub:
        page = _call(
            hub.modules,
            dataset=dataset,
            arch=arch,
            sort=sort,
            model_id=model_id,
            class_name=class_name,
            class_index=class_index,
            max_krr=max_krr,
            min_accuracy=min_accuracy,
            limit=limit,
        )
    _print_page(
        page,
        as_json,
        "modules",
        [
            (Col("id", "num"), lambda m: m["id"]),
            (Col("model", "num"), lambda m: m["model_id"]),
            (Col("class", "num"), lambda m: m["class_index"]),
            (Col("name", max_width=16), lambda m: m["class_name"]),
            (Col("dataset", drop=3, max_width=12), lambda m: m["dataset"]),
            (Col("KRR", "num"), lambda m: _pct(m["krr"])),
            (Col("accuracy", "num"), lambda m: _pct(m["accuracy"])),
            (Col("params", "num"), lambda m: _compact(m["params"])),
            (Col("size", "num", drop=1), lambda m: _compact(m["size_bytes"], "B")),
            (Col("sha256", "id", drop=2), lambda m: _short_id(m["sha256"])),
        ],
    )


@app.command()
def download(
    module_id: Annotated[
        int, typer.Argument(help="Module id (or composition/model id with --what).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Destination directory.")] = Path("."),
    what: Annotated[str, typer.Option(help="module | composition | model")] = "module",
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    extract: Annotated[bool, typer.Option(help="Unpack the archive.")] = True,
) -> None:
    """Download an artifact; the archive's sha256 is verified (resumes a partial download)."""
    with common._client(url, key) as hub:
        fn = {
            "module": hub.download_module,
            "composition": hub.download_composition,
            "model": hub.download_model,
        }.get(what)
        if fn is None:
            _fail("--what must be module, composition or model")
        d = _call(fn, module_id, out_dir, extract=extract)
    common.out.print(
        f"{d.path} ({d.size} bytes) sha256 {d.sha256} verified"
        + (" (already downloaded; skipped)" if d.skipped else "")
        + (f", resumed at byte {d.resumed_from}" if d.resumed_from else ""),
        soft_wrap=True,  # a narrow terminal wraps the line, never the digest inside it
    )
    for f in d.files:
        common.out.print(f"  {f}")


def _class_items(text: str) -> list[int | str]:
    from mwt_core.data.classes import ClassListError, class_items

    try:
        return class_items(text)
    except ClassListError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


@app.command()
def compose(
    model_id: Annotated[int, typer.Argument(help="Model id.")],
    classes: Annotated[
        str, typer.Argument(help="Comma-separated class indices or names, e.g. 3,5,8.")
    ],
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = None,
    also: Annotated[
        list[str] | None,
        typer.Option(
            "--with",
            help="Classes of another model, MODEL_ID:CLASSES (e.g. 7:0,1); repeat for more models.",
        ),
    ] = None,
    calibration: Annotated[
        int,
        typer.Option(
            help="Labelled training images per class for a cross-model composition's labelled "
            "combine methods (scale_bias, head)."
        ),
    ] = DEFAULT_PER_CLASS,
    combine: Annotated[
        str,
        typer.Option(
            help=f"How a cross-model composition combines its sources: {', '.join(METHODS)}, "
            f"or {AUTO_COMBINE} (the no-label method best on the models' validation slices)."
        ),
    ] = DEFAULT_COMBINE,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="Fine-tune a head for N epochs (runs as a job).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Also download the classifier here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compose a classifier for some classes of a model (or several) and show its test accuracy."""
    sources = [(model_id, _class_items(classes))]
    for spec in also or []:
        mid, sep, rest = spec.partition(":")
        if not sep or not mid.strip().isdigit():
            _fail(f"--with {spec!r}: write MODEL_ID:CLASSES, e.g. 7:0,1")
        sources.append((int(mid), _class_items(rest)))
    with common._client(url, key) as hub:
        finetune = {"epochs": finetune_epochs} if finetune_epochs else None
        if len(sources) > 1:
            if finetune:
                _fail("--finetune-epochs works on one model's classes; drop --with or the option")
            if combine not in CHOICES:
                _fail(f"unknown --combine {combine!r}; choose one of {', '.join(CHOICES)}")
            comp = _call(hub.compose_across, sources, calibration, combine)
        else:
            comp = _call(hub.compose, model_id, sources[0][1], finetune)
        if finetune:
            job = _watch(hub, comp["id"], as_json=False)
            comp = _call(hub.composition, job["composition_id"])
        if out_dir is not None:
            d = _call(hub.download_composition, comp["id"], out_dir)
            common.err.print(f"downloaded {d.path} (sha256 verified)")
    if as_json:
        common.out.print_json(json.dumps(comp))
        return
    common.out.print(
        _table(
            f"composition {comp['id']} of model(s) "
            + ", ".join(str(src["model_id"]) for src in comp["sources"]),
            [
                Col("classes", max_width=24),
                Col("accuracy", "num"),
                Col("full model", "num", drop=2),
                Col("loss", "num", drop=3),
                Col("KRR", "num"),
                Col("params", "num"),
                Col("FLOPs", "num"),
                Col("sha256", "id", drop=1),
            ],
            [
                [
                    ",".join(comp["class_names"]),
                    _pct(comp["accuracy"]),
                    _pct(comp["baseline_accuracy"]),
                    _pct(comp["accuracy_loss"]),
                    _pct(comp["krr"]),
                    _compact(comp["params"]),
                    _compact(comp["flops"]),
                    _short_id(comp["sha256"]),
                ]
            ],
        )
    )


