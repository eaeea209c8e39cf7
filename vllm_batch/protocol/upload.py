"""Upload wire types, as openai-python's ``types/upload.py``, ``types/uploads/upload_part.py``
and the request bodies of ``upload_create_params.py`` and ``upload_complete_params.py``."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from vllm_batch.protocol.file import FileObject


class UploadStatus(StrEnum):
    """An upload's status, OpenAI's values (the moves: ``batches/states.py``)."""

    PENDING = "pending"  # accepting parts
    COMPLETED = "completed"  # assembled into ``file_id`` (terminal)
    CANCELLED = "cancelled"  # cancelled by its owner (terminal)
    EXPIRED = "expired"  # not completed before ``expires_at`` (terminal)


class Upload(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: UploadStatus
    file: FileObject | None = None


class UploadPart(BaseModel):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


class FileExpiresAfter(BaseModel):
    """When the File made from the Upload expires (as ``expires_after`` on ``/v1/files``)."""

    anchor: str
    seconds: int


class UploadCreateRequest(BaseModel):
    bytes: int = Field(ge=0)
    filename: str
    mime_type: str
    purpose: str
    expires_after: FileExpiresAfter | None = None


MAX_PART_IDS = 10_000  # bounds the IN list of one query (asyncpg: at most 32767 arguments)


class UploadCompleteRequest(BaseModel):
    part_ids: list[str] = Field(min_length=1, max_length=MAX_PART_IDS)
    md5: str | None = None
