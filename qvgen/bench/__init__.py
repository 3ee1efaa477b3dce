"""QVGen bench."""
