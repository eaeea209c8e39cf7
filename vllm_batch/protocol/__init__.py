"""OpenAI wire models: one small module per wire type."""

from vllm_batch.protocol.batch import (
    Batch,
    BatchCreateRequest,
    BatchError,
    BatchRequestCounts,
    BatchStatus,
    BatchUsage,
    Errors,
)
from vllm_batch.protocol.error import ErrorDetail, ErrorResponse
from vllm_batch.protocol.file import FileDeleted, FileObject, FilePurpose
from vllm_batch.protocol.page import ListPage
from vllm_batch.protocol.upload import Upload, UploadPart

__all__ = [
    "Batch",
    "BatchCreateRequest",
    "BatchError",
    "BatchRequestCounts",
    "BatchStatus",
    "BatchUsage",
    "ErrorDetail",
    "ErrorResponse",
    "Errors",
    "FileDeleted",
    "FileObject",
    "FilePurpose",
    "ListPage",
    "Upload",
    "UploadPart",
]
