"""Checkpoint conversion: `python -m qvgen.convert` turns the paper authors' fake-quant checkpoints
into QVGen checkpoints (the layout is the adapter `qvgen.adapters.official`; model surgery, i.e.
swapping linear layers, is `qvgen.surgery`)."""

from ..adapters.official import ConversionResult, convert_official, convert_to_file, main

__all__ = ["ConversionResult", "convert_official", "convert_to_file", "main"]
