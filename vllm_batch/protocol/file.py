"""File wire types, as openai-python's ``types/file_object.py`` and ``file_deleted.py``."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel


class FilePurpose(StrEnum):
    ASSISTANTS = "assistants"
    ASSISTANTS_OUTPUT = "assistants_output"
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"
    FINE_TUNE = "fine-tune"
    FINE_TUNE_RESULTS = "fine-tune-results"
    VISION = "vision"
    USER_DATA = "user_data"
    EVALS = "evals"


UPLOAD_PURPOSES: frozenset[str] = frozenset(
    {"assistants", "batch", "fine-tune", "vision", "user_data", "evals"}
)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
