"""inferpass."""
