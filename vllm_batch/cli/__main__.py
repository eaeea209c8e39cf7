"""``python -m vllm_batch.cli``."""

from vllm_batch.cli.commands import main

VLLM_BATCH_CLI = True  # serve's worker child is started through this module too

if __name__ == "__main__":
    main()
