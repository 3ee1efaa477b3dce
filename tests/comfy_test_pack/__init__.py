"""Test-only ComfyUI node pack for QVGen's integration tests (never shipped to users).

ComfyUI has no tiny text encoder (`CLIPLoader` type "wan" always builds UMT5-XXL), so test graphs
take their conditioning from `QVGenTestConditioning`: seeded random text embeddings of Wan's
shape [batch, tokens, 4096]. V1 node API, the simplest ComfyUI understands.
"""

import torch


class QVGenTestConditioning:
    DESCRIPTION = "Seeded random Wan text conditioning [batch, tokens, 4096] (tests only)."
    CATEGORY = "QVGen/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                "scale": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01}),
            }
        }

    def make(self, seed, tokens, scale):
        g = torch.Generator().manual_seed(int(seed))
        cond = torch.randn(1, int(tokens), 4096, generator=g) * float(scale)
        return ([[cond, {}]],)


NODE_CLASS_MAPPINGS = {"QVGenTestConditioning": QVGenTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"QVGenTestConditioning": "QVGen Test Conditioning"}
