"""Process plumbing: supervised background tasks."""
