"""QVGen train."""
