"""Audio for the audio tests: WAV tones made with the stdlib ``wave`` module, ``data:`` URLs,
request lines, and an independent reference: transformers' own Whisper, decoded greedily."""

from __future__ import annotations

import base64
import functools
import io
import math
import struct
import wave
from pathlib import Path
from typing import Any

from tests.conftest import WHISPER_NAME
from vllm_batch.weights.tiny_whisper import MAX_TARGET_POSITIONS, NO_TIMESTAMPS, SOT

TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"


def tone_wav(freq: float, seconds: float = 1.0, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV of a sine tone (``freq`` 0: silence)."""
    frames = b"".join(
        struct.pack("<h", round(12_000 * math.sin(2 * math.pi * freq * i / rate)))
        for i in range(int(seconds * rate))
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return buffer.getvalue()


def data_url(audio: bytes, media_type: str = "audio/wav") -> str:
    return f"data:{media_type};base64,{base64.b64encode(audio).decode()}"


def audio_line(
    custom_id: str, url: str, file_url: str, *, model: str = WHISPER_NAME, **body: Any
) -> dict[str, Any]:
    """One batch line for ``url`` (transcriptions or translations), greedy unless told."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": model, "file_url": file_url, "temperature": 0, **body},
    }


@functools.cache
def _reference_model(model_dir: Path) -> tuple[Any, Any]:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(model_dir)
    return processor, WhisperForConditionalGeneration.from_pretrained(model_dir).eval()


def reference_text(model_dir: Path, audio: bytes, task: str, language: str = "en") -> str:
    """What greedy decoding of ``audio`` (16 kHz, one window) gives with transformers'
    Whisper, from vLLM's decoder prompt, up to the model's length: no vLLM involved."""
    import numpy as np
    import torch

    processor, model = _reference_model(model_dir)
    with wave.open(io.BytesIO(audio)) as source:
        rate = source.getframerate()
        samples = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2")
    features = processor.feature_extractor(
        samples.astype(np.float32) / 32768, sampling_rate=rate, return_tensors="pt"
    ).input_features
    tokenizer = processor.tokenizer
    prompt = [SOT, f"<|{language}|>", f"<|{task}|>", NO_TIMESTAMPS]
    tokens = torch.tensor([tokenizer.convert_tokens_to_ids(prompt)])
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        while tokens.shape[1] < MAX_TARGET_POSITIONS:
            logits = model(encoder_outputs=(encoded,), decoder_input_ids=tokens).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    text: str = tokenizer.decode(tokens[0, len(prompt) :], skip_special_tokens=True)
    return text.strip()
