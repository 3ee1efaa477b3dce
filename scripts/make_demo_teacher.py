#!/usr/bin/env python
"""Train the demo's tiny full-precision teacher from scratch and write `qvgen/demo/assets/teacher.safetensors`.

The teacher is a 2-layer `WanTransformer3DModel` on pixels (`qvgen.demo.teacher`), trained by flow
matching (x_t = (1-σ)x0 + σε, σ ~ U(0, 1), target ε - x0) on freshly generated clips of moving shapes
(`qvgen.demo.shapes`) with the stand-in text encoder (`qvgen.demo.text`) and 10% caption dropout (so the
empty prompt is a usable unconditional branch). AdamW with warm-up and cosine decay; the saved weights
are an exponential moving average. Everything is seeded: the same arguments give the same file on the
same torch build. About 10 minutes on 2 CPU cores with the defaults.

    python scripts/make_demo_teacher.py                    # writes the committed asset
    python scripts/make_demo_teacher.py --output teacher.safetensors --steps 300 --preview preview.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

# Spinning OpenMP workers collapse (10-20x slower) when another process shares the cores; must be set
# before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from qvgen.demo import shapes, teacher, text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=teacher.TEACHER_PATH)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights (0: no EMA)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--config", type=json.loads, default=None, help="JSON overrides of the model config, e.g. '{\"num_layers\": 3}'"
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--preview", type=Path, default=None, help="also write a PNG of sampled clips (one row per prompt)")
    return p.parse_args(argv)


def zero_init_residuals(model: torch.nn.Module) -> None:
    """Zero the last linear of every residual branch and the output projection (as DiT's adaLN-Zero):
    each block starts as the identity and the first prediction is 0, which speeds up early training."""
    for block in model.blocks:
        for lin in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
    torch.nn.init.zeros_(model.proj_out.weight)
    torch.nn.init.zeros_(model.proj_out.bias)


def make_batch(rng: random.Random, step: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    captions = [rng.choice(shapes.all_captions()) for _ in range(args.batch_size)]
    clips = shapes.make_batch(captions, seed=args.seed * 1_000_003 + step)
    prompts = [c if rng.random() >= args.caption_dropout else "" for c in captions]
    return clips, text.encode_prompts(prompts)


def flow_matching_loss(model, clips, emb, gen) -> torch.Tensor:
    b = clips.shape[0]
    sigma = torch.rand(b, generator=gen)
    noise = torch.randn(clips.shape, generator=gen)
    s = sigma.view(b, 1, 1, 1, 1)
    x_t = (1 - s) * clips + s * noise
    v = model(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=emb, return_dict=False)[0]
    return (v - (noise - clips)).pow(2).mean()


@torch.no_grad()
def held_out_mse(model, seed: int = 12345, n: int = 32) -> dict[str, float]:
    """Velocity MSE on fixed held-out noised clips at σ ∈ {0.1, 0.3, 0.5, 0.7, 0.9}, vs predicting zero."""
    captions = shapes.sample_captions(n, seed=seed)
    clips = shapes.make_batch(captions, seed=seed)
    emb = text.encode_prompts(captions)
    gen = torch.Generator().manual_seed(seed)
    err = base = 0.0
    sigmas = (0.1, 0.3, 0.5, 0.7, 0.9)
    for sg in sigmas:
        noise = torch.randn(clips.shape, generator=gen)
        x_t = (1 - sg) * clips + sg * noise
        t = torch.full((n,), sg * 1000)
        v = model(hidden_states=x_t, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        target = noise - clips
        err += float((v - target).pow(2).mean()) / len(sigmas)
        base += float(target.pow(2).mean()) / len(sigmas)
    return {"velocity_mse": err, "zero_predictor_mse": base}


def write_preview(model, path: Path, prompts: list[str], seed: int = 0, num_steps: int = 20) -> None:
    import numpy as np
    from PIL import Image

    emb = text.encode_prompts(prompts)
    rows = []
    for i in range(len(prompts)):
        vid = teacher.sample(model, emb[i : i + 1], seed=seed + i, num_steps=num_steps)[0]
        frames = ((vid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        pad = np.full((frames.shape[1], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([x for f in frames for x in (f, pad)][:-1], axis=1))
    sep = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    img = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = teacher.build_teacher(args.config, seed=args.seed)
    zero_init_residuals(model)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params:,} parameters; {args.steps} steps × batch {args.batch_size}", flush=True)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "scale_shift" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    running, history = 0.0, []
    for step in range(args.steps):
        clips, emb = make_batch(rng, step, args)
        loss = flow_matching_loss(model, clips, emb, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1 - d)
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = (step % args.log_every) + 1
            history.append({"step": step + 1, "loss": running / k})
            el = time.perf_counter() - t0
            eta = el / (step + 1) * (args.steps - step - 1)
            lr = sched.get_last_lr()[0]
            print(f"step {step + 1:5d}  loss {running / k:.4f}  lr {lr:.2e}  {el:6.0f}s  eta {eta:4.0f}s", flush=True)
            running = 0.0
    train_seconds = time.perf_counter() - t0
    final = ema if ema is not None else model.eval()
    final.eval()
    ev = held_out_mse(final)
    print(f"held-out velocity MSE {ev['velocity_mse']:.4f} (zero predictor {ev['zero_predictor_mse']:.4f})", flush=True)
    training = {
        "script": "scripts/make_demo_teacher.py",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "ema": args.ema,
        "caption_dropout": args.caption_dropout,
        "seed": args.seed,
        "threads": args.threads,
        "seconds": round(train_seconds, 1),
        "final_loss": history[-1]["loss"],
        "held_out": {k: round(v, 5) for k, v in ev.items()},
        "torch": torch.__version__,
    }
    data = {"shape": list(teacher.DEFAULT_SHAPE), "text_dim": text.TEXT_DIM, "max_tokens": text.MAX_TOKENS}
    out = teacher.save_teacher(final, args.output, data=data, training=training)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MB) in {train_seconds:.0f} s", flush=True)
    if args.preview:
        prompts = shapes.sample_captions(8, seed=args.seed + 7)
        write_preview(final, args.preview, prompts)
        print(f"preview {args.preview}: " + " | ".join(prompts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
