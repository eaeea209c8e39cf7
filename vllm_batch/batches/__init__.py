"""The batch domain: every status, every move, and the work that moves them."""
