"""Files: upload (streamed, size-limited, checksummed, validated), list, retrieve, download, delete."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTeam, SessionDep, SettingsDep, StorageDep, owned_or_404
from api.errors import ApiError, not_found
from api.schemas import ListPage
from api.views import file_view
from core.data import TASKS, validate_file
from store import repo
from store.models import DatasetRow, FileRow, new_id

router = APIRouter(tags=["files"])
FORMATS = (".jsonl", ".json", ".csv", ".tsv")
GENERATION_KEYS = ("prompt", "completion", "mr", "ref")
CHUNK = 1 << 20


def sniff_task(path: Path) -> str:
    """generation if the first record names prompt/completion (or E2E's mr/ref) columns, else classification."""
    with path.open("rb") as fh:
        for raw in fh:
            line = raw.decode("utf-8", errors="replace").strip().lower()
            if line:
                return "generation" if any(f'"{k}"' in line or k in line.replace('"', "").replace("\t", ",")
                                           .split(",") for k in GENERATION_KEYS) else "classification"
    return "classification"


def _label_names(raw: str | None) -> list[str] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = [s.strip() for s in raw.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(422, "invalid_request", "label_names must be a JSON list or comma-separated words",
                       param="label_names")
    return value


@router.post("/v1/files", summary="Upload a dataset file", status_code=200)
async def upload_file(
    team: CurrentTeam, session: SessionDep, storage: StorageDep, settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL (text,label | prompt,completion), CSV or TSV.")],
    purpose: Annotated[str, Form(description="Must be fine-tune.")],
    dataset: Annotated[str | None, Form(description="Dataset id to attach to; a new one is made if absent.")] = None,
    task: Annotated[str | None, Form(description="classification or generation (sniffed if absent).")] = None,
    label_names: Annotated[str | None, Form(description="Label names (JSON list or comma-separated).")] = None,
    metadata: Annotated[str | None, Form(description="JSON object; its 'dataset' key works like dataset.")] = None,
) -> dict[str, Any]:
    if purpose != "fine-tune":
        raise ApiError(422, "invalid_purpose", f"purpose must be 'fine-tune', got {purpose!r}", param="purpose")
    name = Path(file.filename or "upload.jsonl").name
    suffix = Path(name).suffix.lower()
    if suffix not in FORMATS:
        raise ApiError(400, "unsupported_file_format", f"{name}: use one of {', '.join(FORMATS)}", param="file")
    if task is not None and task not in TASKS:
        raise ApiError(422, "invalid_task", f"task must be one of {', '.join(TASKS)}", param="task")
    if metadata and not dataset:
        try:
            dataset = (json.loads(metadata) or {}).get("dataset")
        except (json.JSONDecodeError, AttributeError):
            raise ApiError(422, "invalid_request", "metadata must be a JSON object", param="metadata") from None
    names = _label_names(label_names)
    target = None
    if dataset:
        target = repo.owned(session, DatasetRow, team_id=team.id, ident=dataset)
        if target is None:
            raise not_found("dataset", dataset, param="dataset")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        digest, size = hashlib.sha256(), 0
        with path.open("wb") as out:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise ApiError(413, "file_too_large", f"upload exceeds {settings.max_upload_bytes} bytes",
                                   param="file")
                digest.update(chunk)
                out.write(chunk)
        task = task or sniff_task(path)
        summary = await run_in_threadpool(validate_file, path, task=task, label_names=names)
        if target is None:
            target = repo.create_dataset(session, team_id=team.id, name=name, epsilon_max=settings.default_epsilon_max,
                                         delta=settings.default_delta)
        fid = new_id("file-")
        row = FileRow(id=fid, team_id=team.id, dataset_id=target.id, filename=name, purpose=purpose, bytes=size,
                      sha256=digest.hexdigest(), task=task, rows=summary.rows, summary=_summary(summary),
                      storage_key=f"files/{fid}")  # storage keys come from ids, never from user input
        session.add(row)
        session.flush()
        await run_in_threadpool(storage.put, row.storage_key, path)
    return file_view(row)


def _summary(summary: Any) -> dict[str, Any]:
    return {"label_names": list(summary.label_names) if summary.label_names else None,
            "label_counts": list(summary.label_counts) if summary.label_counts else None,
            "max_text_chars": summary.max_text_chars, "mean_text_chars": summary.mean_text_chars,
            "prompts": summary.prompts}


@router.get("/v1/files", summary="List files")
def list_files(team: CurrentTeam, session: SessionDep, purpose: str | None = None, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> ListPage:
    filters = [FileRow.purpose == purpose] if purpose else []
    rows, more = repo.page(session, FileRow, team_id=team.id, after=after, limit=limit, filters=filters)
    return ListPage.of([file_view(r) for r in rows], more)


def _file(session: SessionDep, team: CurrentTeam, file_id: str) -> FileRow:
    return owned_or_404(session, FileRow, team=team, ident=file_id, kind="file", param="file_id")


@router.get("/v1/files/{file_id}", summary="Retrieve a file's metadata")
def retrieve_file(file_id: str, team: CurrentTeam, session: SessionDep) -> dict[str, Any]:
    return file_view(_file(session, team, file_id))


@router.get("/v1/files/{file_id}/content", summary="Download a file (uploads and job results)")
def file_content(file_id: str, team: CurrentTeam, session: SessionDep, storage: StorageDep) -> StreamingResponse:
    row = _file(session, team, file_id)
    stream = storage.open(row.storage_key)

    def chunks() -> Any:
        with stream:
            while data := stream.read(CHUNK):
                yield data

    media = "application/json" if row.filename.endswith(".json") else "application/octet-stream"
    return StreamingResponse(chunks(), media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="{row.filename}"',
                                      "Content-Length": str(row.bytes)})


@router.delete("/v1/files/{file_id}", summary="Delete a file")
def delete_file(file_id: str, team: CurrentTeam, session: SessionDep, storage: StorageDep) -> dict[str, Any]:
    row = _file(session, team, file_id)
    row.deleted = True
    storage.delete(row.storage_key)
    return {"id": row.id, "object": "file", "deleted": True}
