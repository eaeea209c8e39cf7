"""``python -m vllm_batch.cli``."""

from vllm_batch.cli.commands import main

main()
