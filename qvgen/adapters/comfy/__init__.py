"""ComfyUI's side of the QVGen format: its tensor names (`names`) and its native quantized single
file (`native`). Plain PyTorch: nothing here imports ComfyUI."""
