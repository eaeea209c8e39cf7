"""The tiny Whisper is deterministic and laid out as vLLM's Whisper expects it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vllm_batch.models.kinds import ModelKind, detect_kind
from vllm_batch.weights.tiny_whisper import (
    MAX_SOURCE_POSITIONS,
    NO_TIMESTAMPS,
    TASKS,
    control_tokens,
    language_tokens,
    make_test_whisper,
    timestamp_tokens,
)


@pytest.fixture(scope="module")
def whisper(tiny_whisper: Path) -> Path:
    """The session's tiny Whisper (``tests/conftest.py``), built once per test process."""
    return tiny_whisper


def test_same_seed_gives_identical_files(whisper: Path, tmp_path: Path) -> None:
    other = make_test_whisper(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        digest = hashlib.sha256((whisper / name).read_bytes()).hexdigest()
        assert digest == hashlib.sha256((other / name).read_bytes()).hexdigest(), name
    assert make_test_whisper(whisper) == whisper  # idempotent


def test_tokens_config_and_processor_agree(whisper: Path) -> None:
    from safetensors.torch import load_file
    from transformers import WhisperConfig, WhisperProcessor

    config = WhisperConfig.from_pretrained(whisper)
    processor = WhisperProcessor.from_pretrained(whisper)
    tokenizer, extractor = processor.tokenizer, processor.feature_extractor
    assert detect_kind(str(whisper)) is ModelKind.TRANSCRIBE
    assert config.vocab_size == len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in control_tokens() + language_tokens()}
    ids.update({t: tokenizer.convert_tokens_to_ids(t) for t in TASKS + timestamp_tokens()})
    assert config.decoder_start_token_id == ids["<|startoftranscript|>"]
    assert config.eos_token_id == tokenizer.eos_token_id == ids["<|endoftext|>"]
    # Timestamps come after every other token, in order (vLLM's verbose_json relies on it).
    stamps = [ids[t] for t in timestamp_tokens()]
    assert stamps == list(range(stamps[0], stamps[0] + 1501))
    assert stamps[0] == max(ids[t] for t in control_tokens() + language_tokens() + TASKS) + 1
    prompt = "<|startoftranscript|><|de|><|translate|><|notimestamps|>"
    expected = [ids[t] for t in ("<|startoftranscript|>", "<|de|>", "<|translate|>")]
    assert tokenizer.encode(prompt, add_special_tokens=False) == [*expected, ids[NO_TIMESTAMPS]]
    # One 2-second window of mel frames is the encoder's whole input after its stride-2 conv.
    assert extractor.nb_max_frames // 2 == MAX_SOURCE_POSITIONS == config.max_source_positions
    assert extractor.feature_size == config.num_mel_bins
    embeddings = load_file(whisper / "model.safetensors")["model.decoder.embed_tokens.weight"]
    assert all(not embeddings[ids[t]].any() for t in control_tokens() + timestamp_tokens()[:3])
    assert all(embeddings[ids[t]].any() for t in TASKS + language_tokens()[:3])
