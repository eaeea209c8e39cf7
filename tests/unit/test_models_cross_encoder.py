"""The tiny cross-encoder is deterministic, detected as kind ``score`` and one-label."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vllm_batch.models.kinds import ModelKind, detect_kind
from vllm_batch.weights.cross_encoder import make_cross_encoder


def test_same_seed_same_bytes_and_a_one_label_classifier(
    cross_encoder_model: Path, minilm_model: Path, tmp_path: Path
) -> None:
    again = make_cross_encoder(tmp_path / "again", minilm_model)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        digests = {
            hashlib.sha256((d / name).read_bytes()).hexdigest()
            for d in (cross_encoder_model, again)
        }
        assert len(digests) == 1, name
    config = json.loads((cross_encoder_model / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert len(config["id2label"]) == 1  # one label: vLLM scores a pair as sigmoid(logit)
    assert detect_kind(str(cross_encoder_model)) is ModelKind.SCORE
