"""Read-only views the dashboard draws: the caller's scopes, a model's modularization as matrices,
and a few sample images of a dataset. Nothing here changes the registry."""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from app import storage
from app.auth import Principal, ReadKey, current_principal
from app.capacity import HeavyWork
from app.db.models import Model
from app.deps import DbDep, SettingsDep
from app.routers._common import not_found
from app.schemas.common import PathId
from app.services import datasets as datasets_svc
from mwt_core.progress import progress_record

router = APIRouter(tags=["dashboard"])
MAX_SAMPLES_PER_CLASS = 16
MAX_SAMPLE_CLASSES = 100  # a grid of more classes is unreadable; the rest are left out


class WhoAmI(BaseModel):
    name: str
    scopes: list[str] = Field(description="effective scopes (admin implies write implies read)")


class ModelInsights(BaseModel):
    model_id: int
    class_names: list[str]
    layers: list[str] = Field(description="masked layers, input to output")
    layer_kernels: list[int] = Field(description="kernels of each masked layer")
    kept: list[list[int]] | None = Field(
        None, description="class x layer: kernels each class's module keeps (null: not modular)"
    )
    coupling: list[list[float]] | None = Field(
        None,
        description="class x class: Jaccard overlap of the two modules' kept kernels over all "
        "layers (1 on the diagonal)",
    )
    shared: list[list[int]] | None = Field(
        None, description="class x class: kernels kept by both modules"
    )
    class_recall: list[float] | None = Field(None, description="test accuracy of each class")
    history: list[dict[str, Any]] = Field(description="one record per epoch, as trained")
    tau: float | None = None


class SamplesOut(BaseModel):
    dataset: str
    split: str
    class_names: list[str]
    images: list[list[str]] = Field(description="per class, PNG images as data: URLs")
    truncated: bool = Field(description="true when classes were left out")


@router.get("/whoami", response_model=WhoAmI, summary="The calling key's name and scopes")
def whoami(principal: Annotated[Principal, Depends(current_principal)]) -> WhoAmI:
    return WhoAmI(name=principal.name, scopes=sorted(principal.scopes))


@router.get(
    "/models/{model_id}/insights",
    response_model=ModelInsights,
    summary="A model's modularization as matrices, and its training history",
)
def model_insights(model_id: PathId, db: DbDep, settings: SettingsDep, _: ReadKey) -> ModelInsights:
    from mwt_core.artifacts import ArtifactError, read_manifest

    m = db.get(Model, model_id)
    if m is None:
        raise not_found("model", model_id)
    if m.artifact_path is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"model {model_id} is {m.status}; it has no artifact yet"
        )
    try:
        manifest = read_manifest(storage.resolve(settings.artifacts, m.artifact_path))
    except (ArtifactError, ValueError) as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"model {model_id}'s manifest cannot be read: {exc}"
        ) from None
    metrics = m.metrics or {}
    recall = metrics.get("class_recall")
    mod = manifest.get("modularization")
    out: dict[str, Any] = {
        "model_id": m.id,
        "class_names": list(m.class_names),
        "layers": [],
        "layer_kernels": [],
        "history": [progress_record(r) for r in manifest.get("history") or []],
        "class_recall": [float(x) for x in recall] if isinstance(recall, list) else None,
    }
    if isinstance(mod, dict):
        sizes = [int(k) for k in mod["kernels"]]
        sets = [
            [set(int(i) for i in layer) for layer in per_class] for per_class in mod["class_masks"]
        ]
        # One flat set of (layer, kernel) per class, for the overlap over the whole network.
        flat = [{(li, k) for li, layer in enumerate(cls) for k in layer} for cls in sets]
        shared = [[len(a & b) for b in flat] for a in flat]
        coupling = [
            [(len(a & b) / len(a | b)) if (a | b) else 0.0 for b in flat] for a in flat
        ]
        out.update(
            layers=[f"L{i + 1}" for i in range(len(sizes))],
            layer_kernels=sizes,
            kept=[[len(layer) for layer in cls] for cls in sets],
            coupling=coupling,
            shared=shared,
            tau=float(mod["tau"]),
        )
    return ModelInsights(**out)


def _png_data_url(image: Any) -> str:
    """A ``C x H x W`` uint8 tensor as a PNG ``data:`` URL."""
    from PIL import Image

    arr = image.numpy()
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(
        arr.transpose(1, 2, 0), mode="RGB"
    )
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@router.get(
    "/datasets/{name}/samples",
    response_model=SamplesOut,
    summary="A few test images of each class, as PNG data URLs",
)
def dataset_samples(
    name: str,
    request: Request,
    db: DbDep,
    settings: SettingsDep,
    _: ReadKey,
    _work: HeavyWork,
    per_class: Annotated[int, Query(ge=1, le=MAX_SAMPLES_PER_CLASS)] = 6,
) -> SamplesOut:
    try:
        bundle = request.app.state.bundle_cache.load(settings, db, name, 0)
    except datasets_svc.DatasetNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except datasets_svc.DatasetUnavailable as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    classes = list(bundle.class_names)[:MAX_SAMPLE_CLASSES]
    images: list[list[str]] = []
    for c in range(len(classes)):
        # The first images of each class in file order: the same grid on every visit.
        idx = (bundle.test_y == c).nonzero().flatten()[:per_class].tolist()
        images.append([_png_data_url(bundle.test_x[i]) for i in idx])
    return SamplesOut(
        dataset=name,
        split="test",
        class_names=[str(c) for c in classes],
        images=images,
        truncated=len(classes) < bundle.num_classes,
    )
