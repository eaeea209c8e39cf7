"""Legacy ``guided_*`` request fields, mapped onto vLLM's ``structured_outputs``.

vLLM removed ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` and
``guided_whitespace_pattern`` and now ignores them: the output would silently not be
constrained. Batch files written for older vLLM versions still use them, so they are
translated to the ``structured_outputs`` object vLLM reads today.
"""

from __future__ import annotations

from typing import Any

LEGACY_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "guided_whitespace_pattern": "whitespace_pattern",
}


class ConflictingStructuredOutputs(ValueError):
    """A body gives the same ``structured_outputs`` option twice (legacy and current)."""

    def __init__(self, legacy: str, option: str) -> None:
        super().__init__(
            f"Give either {legacy!r} (legacy) or 'structured_outputs.{option}', not both."
        )
        self.param = legacy


def translate_guided_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with legacy ``guided_*`` fields moved into ``structured_outputs``.

    Returns ``body`` itself when it has none; raises ``ConflictingStructuredOutputs`` when
    an option is given both ways.
    """
    present = [name for name in LEGACY_FIELDS if body.get(name) is not None]
    if not present:
        return body
    current = body.get("structured_outputs")
    if current is not None and not isinstance(current, dict):
        return body  # vLLM reports the malformed field
    options = dict(current or {})
    translated = {k: v for k, v in body.items() if k not in LEGACY_FIELDS}
    for name in present:
        option = LEGACY_FIELDS[name]
        if options.get(option) is not None:
            raise ConflictingStructuredOutputs(name, option)
        options[option] = body[name]
    translated["structured_outputs"] = options
    return translated
