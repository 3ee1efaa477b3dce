"""QVGen demo."""
