"""Adapters: what belongs to other projects, kept out of the core.

- `comfy/`: ComfyUI's tensor names and its native single-file quantized format (export and a
  PyTorch loader); it never imports ComfyUI itself;
- `diffusers_models`: diffusers model skeletons built from a checkpoint's model config;
- `official`: the layout of the paper authors' fake-quant checkpoints (`python -m qvgen.convert`).

The layering (checked by tests/test_import_rules.py): the core (`qvgen/` outside `adapters/`,
the doors and the tools) imports no adapter, door, diffusers, accelerate or ComfyUI; adapters may
import the core; `kernels/` imports nothing of `qvgen`.
"""
