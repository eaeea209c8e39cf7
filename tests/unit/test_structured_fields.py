"""Legacy ``guided_*`` fields become vLLM's ``structured_outputs`` (vLLM ignores them now)."""

from __future__ import annotations

import pytest

from vllm_batch.engines.structured import ConflictingStructuredOutputs, translate_guided_fields


def test_bodies_without_legacy_fields_are_untouched() -> None:
    body = {"model": "m", "structured_outputs": {"choice": ["a"]}}
    assert translate_guided_fields(body) is body


def test_legacy_fields_move_into_structured_outputs() -> None:
    body = {
        "model": "m",
        "guided_json": {"type": "object"},
        "guided_whitespace_pattern": " ?",
        "guided_regex": None,  # unset fields stay out
        "structured_outputs": {"disable_any_whitespace": True},
    }
    assert translate_guided_fields(body) == {
        "model": "m",
        "structured_outputs": {
            "disable_any_whitespace": True,
            "json": {"type": "object"},
            "whitespace_pattern": " ?",
        },
    }
    assert translate_guided_fields({"guided_choice": ["x", "y"]}) == {
        "structured_outputs": {"choice": ["x", "y"]}
    }


def test_an_option_given_both_ways_is_refused() -> None:
    with pytest.raises(ConflictingStructuredOutputs) as exc:
        translate_guided_fields({"guided_regex": "a+", "structured_outputs": {"regex": "b+"}})
    assert exc.value.param == "guided_regex" and "not both" in str(exc.value)


def test_a_malformed_structured_outputs_is_left_for_vllm_to_report() -> None:
    body = {"guided_regex": "a+", "structured_outputs": "regex"}
    assert translate_guided_fields(body) is body
