"""``GET /v1/models``: what the gateway routes to, each model's state, preprocessing and
weight provenance, as Triton's configs say."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from inception.contract import UNKNOWN_WEIGHTS

from ..deps import GatewayDep, require_api_key
from ..gateway import Gateway
from ..model_config import ModelInfo
from ..openapi import ERROR_RESPONSES
from ..routing import ENSEMBLE_ALIAS
from ..schemas import Member, ModelEntry, ModelsResponse, Preprocess

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get(
    "/models", response_model=ModelsResponse, responses=ERROR_RESPONSES, summary="The routable models"
)
async def list_models(gateway: GatewayDep) -> ModelsResponse:
    settings = gateway.settings
    readiness = await gateway.backend.readiness()
    entries = [
        model_entry(gateway, name, ready, gateway.backend.models.get(name))
        for name, ready in readiness.models.items()
    ]
    return ModelsResponse(models=entries, default=settings.default_model)


def model_entry(gateway: Gateway, name: str, ready: bool, info: ModelInfo | None) -> ModelEntry:
    settings = gateway.settings
    is_ensemble = (info is not None and info.is_ensemble) or name == settings.ensemble_model
    entry = ModelEntry(
        name=name,
        kind="ensemble" if is_ensemble else "model",
        state="ready" if ready else "unavailable",
        default=name == settings.default_model,
        aliases=[ENSEMBLE_ALIAS] if name == settings.ensemble_model else [],
    )
    if info is None:
        return entry
    pre = info.preprocessing
    entry.preprocessing = Preprocess(
        crop_pct=pre.crop_pct, interpolation=pre.interpolation, input_size=pre.input_size
    )
    if len(info.inputs) > 1:
        entry.inputs = {
            n: Preprocess(crop_pct=p.crop_pct, interpolation=p.interpolation, input_size=p.input_size)
            for n, p in info.inputs
        }
    entry.weights, entry.weights_sha256 = info.provenance, info.checkpoint_sha256
    entry.max_batch_size = info.max_batch_size
    if info.is_ensemble:
        known = gateway.backend.models
        entry.members = [
            Member(model=m, weight=w, weights=known[m].provenance if m in known else UNKNOWN_WEIGHTS)
            for m, w in zip(info.members, info.member_weights, strict=True)
        ]
    return entry
