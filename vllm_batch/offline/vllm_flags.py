"""``vllm run-batch`` flags that ``vllm-batch run`` does not take, and why.

``vllm-batch run`` takes ``vllm run-batch``'s input/output flags, ``--enable-metrics``
with ``--host``/``--port`` (and the deprecated ``--url``), ``--lora-modules NAME=PATH`` and
the engine flags listed in ``SUPPORTED_ENGINE_FLAGS``. Any other option is refused before
anything starts (exit code 2); the frontend options below get their reason.
"""

from __future__ import annotations

SUPPORTED_ENGINE_FLAGS = (
    "--model, --served-model-name, --lora/--lora-modules, --max-num-seqs, "
    "--max-num-batched-tokens, --block-size, --gpu-memory-utilization, "
    "--tensor-parallel-size, --max-model-len, --dtype, --enforce-eager, "
    "--[no-]enable-prefix-caching, --runner, --enable-metrics, --host, --port, --url, "
    "--engine, --engine-url, --engine-api-key, --engine-max-concurrency, "
    "--executor, --ray-address, --ray-replicas"
)

_TEMPLATE = "the model's own chat template is used (from its tokenizer_config.json)"
_TOOLS = (
    "tool-call parsers are not loaded: tool_choice 'required' or a named function still "
    "gives tool_calls; with 'auto' a call stays in the message text"
)
_NO_HTTP = "it configures `vllm serve`'s HTTP frontend, which a batch run does not have"
_REASONING = "reasoning parsers are not loaded: the reasoning stays in the message content"

REFUSED: dict[str, str] = {
    "--chat-template": _TEMPLATE,
    "--chat-template-content-format": _TEMPLATE,
    "--trust-request-chat-template": _TEMPLATE,
    "--default-chat-template-kwargs": "give chat_template_kwargs in each request body instead",
    "--response-role": "chat responses always use the role 'assistant'",
    "--return-tokens-as-token-ids": "logprobs always name tokens by their text",
    "--enable-auto-tool-choice": _TOOLS,
    "--exclude-tools-when-tool-choice-none": _TOOLS,
    "--tool-call-parser": _TOOLS,
    "--tool-parser-plugin": _TOOLS,
    "--tool-strict-level": _TOOLS,
    "--tool-server": _TOOLS,
    "--reasoning-parser": _REASONING,
    "--reasoning-parser-plugin": _REASONING,
    "--trust-request-mm-kwargs": "multimodal inputs are not supported by `vllm-batch run`",
    "--max-log-len": _NO_HTTP,
    "--enable-per-request-metrics": _NO_HTTP,
    "--enable-server-load-tracking": _NO_HTTP,
    "--enable-force-include-usage": "every batch response already has its usage",
    "--sse-keep-alive-interval": _NO_HTTP,
    "--enable-tokenizer-info-endpoint": _NO_HTTP,
    "--enable-log-outputs": _NO_HTTP,
    "--enable-log-deltas": _NO_HTTP,
    "--cohere-is-reasoning-model": _NO_HTTP,
    "--cohere-format": _NO_HTTP,
    "--anthropic-disabled-thinking-effort": _NO_HTTP,
    "--log-error-stack": _NO_HTTP,
    "--tokens-only": _NO_HTTP,
    "--enable-scale-out": _NO_HTTP,
    "--fingerprint-mode": _NO_HTTP,
    "--fingerprint-value": _NO_HTTP,
}
"""``vllm run-batch``'s frontend options (0.32's ``BatchFrontendArgs``) that are refused."""


def flag_name(arg: str) -> str:
    """``--no-x=1`` → ``--x``: the option an argument sets (as a key of ``REFUSED``)."""
    name = arg.split("=", 1)[0]
    return "--" + name[len("--no-") :] if name.startswith("--no-") else name


def unsupported_message(args: list[str]) -> str:
    """What to tell the user about the options ``args`` (all refused), one reason a line."""
    lines = [f"error: unsupported option(s) for `vllm-batch run`: {' '.join(args)}"]
    named = dict.fromkeys(flag_name(a) for a in args if a.startswith("--"))
    for name in named:
        if name in REFUSED:
            lines.append(f"  {name} (a `vllm run-batch` option): {REFUSED[name]}")
    lines.append(f"supported vLLM flags: {SUPPORTED_ENGINE_FLAGS}")
    return "\n".join(lines)
