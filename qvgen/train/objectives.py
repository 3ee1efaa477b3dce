"""Distillation objectives: what noisy input both models see, and how their outputs are compared.

Teacher and student get the same noisy latent, timestep and text embedding; the loss is the MSE
between their predictions (DESIGN.md part A): the flow-matching velocity for Wan (σ uniform), and
x0 weighted by 1/(1-ᾱ) for CogVideoX (v-prediction DDPM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class NoisyBatch:
    inputs: dict  # keyword arguments of the transformer call
    aux: dict  # what the loss needs besides the two predictions


class FlowMatchingObjective:
    """Wan 2.1 (and the demo's pixel-space teacher): x_t = (1-σ)x0 + σε, t = 1000σ, velocity target."""

    family = "wan"

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = num_train_timesteps

    def make_inputs(self, latents: Tensor, text: Tensor, gen: torch.Generator) -> NoisyBatch:
        b = latents.shape[0]
        sigma = torch.rand(b, generator=gen, device=gen.device).to(latents.device)
        noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(latents.device, latents.dtype)
        s = sigma.view(b, *([1] * (latents.dim() - 1))).to(latents.dtype)
        x_t = (1 - s) * latents + s * noise
        t = sigma * self.num_train_timesteps
        return NoisyBatch({"hidden_states": x_t, "timestep": t, "encoder_hidden_states": text}, {})

    def loss(self, student: Tensor, teacher: Tensor, aux: dict) -> Tensor:
        return (student.float() - teacher.float()).pow(2).mean()


class CogVideoXObjective:
    """CogVideoX: DDPM forward process, v-prediction converted to x0, loss weighted by 1/(1-ᾱ_t)."""

    family = "cogvideox"

    def __init__(self, alphas_cumprod: Tensor, rotary_fn=None) -> None:
        self.alphas_cumprod = alphas_cumprod.float()
        self.rotary_fn = rotary_fn  # latents → image_rotary_emb for models that use RoPE (CogVideoX-5B)

    def make_inputs(self, latents: Tensor, text: Tensor, gen: torch.Generator) -> NoisyBatch:
        b = latents.shape[0]
        n = self.alphas_cumprod.numel()
        t = torch.randint(0, n, (b,), generator=gen, device=gen.device).to(latents.device)
        noise = torch.randn(latents.shape, generator=gen, device=gen.device).to(latents.device, latents.dtype)
        abar = self.alphas_cumprod.to(latents.device)[t].view(b, *([1] * (latents.dim() - 1)))
        x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        inputs = {"hidden_states": x_t.to(latents.dtype), "timestep": t, "encoder_hidden_states": text}
        if self.rotary_fn is not None:
            inputs["image_rotary_emb"] = self.rotary_fn(latents)
        return NoisyBatch(inputs, {"x_t": x_t.float(), "abar": abar.float()})

    def loss(self, student: Tensor, teacher: Tensor, aux: dict) -> Tensor:
        abar, x_t = aux["abar"], aux["x_t"]
        x0_s = abar.sqrt() * x_t - (1 - abar).sqrt() * student.float()
        x0_t = abar.sqrt() * x_t - (1 - abar).sqrt() * teacher.float()
        w = 1.0 / (1.0 - abar).clamp(min=1e-4)
        return (w * (x0_s - x0_t).pow(2)).mean()


def predict(model: nn.Module, inputs: dict) -> Tensor:
    """One transformer call in diffusers' convention."""
    return model(**inputs, return_dict=False)[0]
