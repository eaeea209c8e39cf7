"""Work the API starts in the background: batch input validation."""
