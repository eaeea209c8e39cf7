"""``python -m vllm_batch.cli``."""

from vllm_batch.cli.app import main

main()
