"""A tiny, deterministic, random-weight Whisper model for the audio tests.

Built locally, like ``tiny.py``'s Llama (no downloads): a byte-level BPE vocabulary trained
on the same generated corpus, followed by Whisper's special tokens in Whisper's order
(``<|endoftext|>``, ``<|startoftranscript|>``, one token per language, ``<|translate|>``,
``<|transcribe|>``, ..., ``<|notimestamps|>``, then the timestamps ``<|0.00|>`` to
``<|30.00|>``), a ``WhisperFeatureExtractor`` with 2-second windows (so the encoder sees
100 positions, not 1500) and a 2-layer ``WhisperForConditionalGeneration`` with seeded
weights. The same ``seed`` always gives a byte-identical ``model.safetensors``.

The embedding rows of the control tokens (``<|endoftext|>``, ``<|startoftranscript|>``,
``<|notimestamps|>``, ...) and of the timestamps are zero (vLLM ties the output projection
to them), so their logit is exactly 0 while the others are random: greedy decoding then
writes text until ``max_completion_tokens`` or the model's length
(``MAX_TARGET_POSITIONS``). Language and task tokens keep random rows, so the decoder sees
which language and task a request asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_batch.weights._atomic import build_atomically
from vllm_batch.weights._seeded import seeded_model
from vllm_batch.weights.tiny import corpus

if TYPE_CHECKING:
    from transformers import WhisperTokenizer

EOT = "<|endoftext|>"
SOT = "<|startoftranscript|>"
NO_TIMESTAMPS = "<|notimestamps|>"
SAMPLE_RATE = 16_000
CHUNK_SECONDS = 2
HOP_LENGTH = 160
MEL_BINS = 16
MAX_SOURCE_POSITIONS = CHUNK_SECONDS * SAMPLE_RATE // HOP_LENGTH // 2  # conv stride 2: 100
MAX_TARGET_POSITIONS = 64
BPE_VOCAB_SIZE = 800


TASKS = ["<|translate|>", "<|transcribe|>"]


def language_tokens() -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return [f"<|{code}|>" for code in LANGUAGES]


def control_tokens() -> list[str]:
    """The special tokens that are neither a language nor a task."""
    # vLLM writes "<|prev|>" before a request's ``prompt``; Whisper's own name is kept too.
    return [
        EOT,
        SOT,
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        NO_TIMESTAMPS,
        "<|prev|>",
    ]


def special_tokens() -> list[str]:
    """Whisper's special tokens, in the order (and so the relative ids) Whisper uses."""
    eot, sot, *rest = control_tokens()
    return [eot, sot, *language_tokens(), *TASKS, *rest]


def timestamp_tokens() -> list[str]:
    """``<|0.00|>`` ... ``<|30.00|>`` in 0.02 s steps (after every other token, as vLLM's
    ``verbose_json`` segmenting expects)."""
    return [f"<|{i * 0.02:.2f}|>" for i in range(1501)]


def build_tokenizer() -> WhisperTokenizer:
    """A ``WhisperTokenizer`` over a BPE trained on ``tiny.corpus`` plus Whisper's tokens."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, WhisperTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus()), trainer=trainer)
    saved = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = saved["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in saved["merges"]]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TARGET_POSITIONS)
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special_tokens()],
        special_tokens=True,
    )
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in timestamp_tokens()])
    return tokenizer


def _config_kwargs(tokenizer: WhisperTokenizer) -> dict[str, Any]:
    eot = tokenizer.convert_tokens_to_ids(EOT)
    return {
        "vocab_size": len(tokenizer),
        "num_mel_bins": MEL_BINS,
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,  # head_dim 32: vLLM's CPU attention needs >= 32
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "max_source_positions": MAX_SOURCE_POSITIONS,
        "max_target_positions": MAX_TARGET_POSITIONS,
        "decoder_start_token_id": tokenizer.convert_tokens_to_ids(SOT),
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "begin_suppress_tokens": None,
        "suppress_tokens": None,
    }


def _build(tmp: Path, seed: int) -> None:
    """Write the processor (feature extractor + tokenizer), config and float32 weights."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    tokenizer = build_tokenizer()
    config = WhisperConfig(**_config_kwargs(tokenizer))
    config.architectures = ["WhisperForConditionalGeneration"]
    model = seeded_model(WhisperForConditionalGeneration, config, seed, std=0.05)
    with torch.no_grad():
        embeddings = model.model.decoder.embed_tokens.weight  # tied to proj_out
        for token in control_tokens() + timestamp_tokens():
            embeddings[tokenizer.convert_tokens_to_ids(token)] = 0.0
    model.eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    extractor = WhisperFeatureExtractor(
        feature_size=MEL_BINS,
        sampling_rate=SAMPLE_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=CHUNK_SECONDS,
    )
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(tmp)


def make_test_whisper(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny Whisper into ``out_dir`` (idempotent) and return ``out_dir``."""
    return build_atomically(
        Path(out_dir), lambda tmp: _build(tmp, seed), f"tiny-whisper seed={seed}"
    )
