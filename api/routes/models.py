from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CurrentTeam
from core.registry import available_models

router = APIRouter(tags=["models"])


@router.get("/v1/models", summary="Base models the workers can serve")
def list_models(_team: CurrentTeam) -> dict[str, Any]:
    data = [{"id": c.name, "object": "model", "created": 0, "owned_by": "pflat", "family": c.family,
             "description": c.description} for c in available_models()]
    return {"object": "list", "data": data}
