"""ComfyUI node "QVGen Quantize Wan (RTN W4A4, 4-bit)": inputs in `schema.QUANTIZE`, logic in `quantize.py`."""

from __future__ import annotations

from comfy_api.latest import io

from . import host, quantize, schema, v3


class QVGenQuantize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return v3.schema(schema.QUANTIZE)

    @classmethod
    def execute(cls, model, weight_bits="4", act_bits="4", skip="", clip_search=False, backend="auto") -> io.NodeOutput:
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            bar = bar or host.progress_bar(total)
            bar.update_absolute(done, total)

        clone, _ = quantize.quantize_model(
            model,
            weight_bits=int(weight_bits),
            act_bits=None if act_bits == "none" else int(act_bits),
            skip=quantize.parse_patterns(skip or ""),
            clip_search=bool(clip_search),
            backend=backend or "auto",
            progress=progress,
        )
        return io.NodeOutput(clone)


NODES = [QVGenQuantize]
