"""QVGen diffusers_backend."""
