"""The tiny test model is deterministic, idempotent and has a working tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from vllm_batch.weights.tiny import ASSISTANT_HEADER, make_test_model


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("tiny") / "model")


def test_same_seed_gives_identical_files(tiny_model: Path, tmp_path: Path) -> None:
    other = make_test_model(tmp_path / "again")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert _sha256(tiny_model / name) == _sha256(other / name), name


def test_other_seed_gives_other_weights(tiny_model: Path, tmp_path: Path) -> None:
    other = make_test_model(tmp_path / "seed1", seed=1)
    assert _sha256(tiny_model / "model.safetensors") != _sha256(other / "model.safetensors")


def test_idempotent(tiny_model: Path) -> None:
    before = (tiny_model / "model.safetensors").stat().st_mtime_ns
    assert make_test_model(tiny_model) == tiny_model
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == before


def test_refuses_to_overwrite_foreign_dir(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_test_model(foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_config_matches_tokenizer(tiny_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert config.vocab_size == len(tok)
    assert config.head_dim >= 32
    assert config.max_position_embeddings >= 2048
    assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert config.pad_token_id == tok.pad_token_id


def test_tokenizer_round_trips(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = 'Hello, world!  Ünïcödé 123\n\tzebra 🚀 {"a": 1}'
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.endswith(ASSISTANT_HEADER)
    assert "What is the capital of France?" in prompt
    no_gen = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert isinstance(no_gen, str)
    assert not no_gen.endswith(ASSISTANT_HEADER)
