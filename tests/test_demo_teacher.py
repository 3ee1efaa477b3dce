"""The demo's synthetic data, stand-in text encoder and committed tiny teacher (fast, offline, CPU)."""

from __future__ import annotations

import pytest
import torch

from qvgen.demo import shapes, teacher, text

# ---------------------------------------------------------------- clips


def test_clip_shape_range_and_determinism():
    a = shapes.make_clip("a red circle moving left", seed=3)
    b = shapes.make_clip("a red circle moving left", seed=3)
    c = shapes.make_clip("a red circle moving left", seed=4)
    assert a.shape == (3, shapes.FRAMES, shapes.SIZE, shapes.SIZE) == (3, 8, 32, 32)
    assert a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert a.max() > 0.5 and a.min() < -0.8  # a bright shape on a dark background


def test_clip_size_is_configurable():
    v = shapes.make_clip("a green square growing", seed=0, frames=4, height=16, width=24)
    assert v.shape == (3, 4, 16, 24)
    assert v.min() >= -1 and v.max() <= 1


def _foreground(v: torch.Tensor) -> torch.Tensor:
    """(F, H, W) mask of shape pixels (brighter than the background)."""
    return (v.amax(0) > -0.5).float()


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    """(F, 2) centre of mass (x, y) per frame."""
    f, h, w = mask.shape
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    n = mask.sum((1, 2)).clamp(min=1)
    return torch.stack([(mask * xs).sum((1, 2)) / n, (mask * ys).sum((1, 2)) / n], dim=1)


@pytest.mark.parametrize("colour", list(shapes.COLOURS))
def test_caption_colour(colour):
    v = shapes.make_clip(f"a {colour} circle moving up", seed=1)
    full = v.amax(0) >= v.amax() - 1e-4  # pixels fully covered by the shape
    assert full.sum() > 20
    rgb = (v[:, full].mean(1) + 1) / 2
    expected = torch.tensor(shapes.COLOURS[colour])
    assert torch.allclose(rgb, expected, atol=1e-4), (rgb, expected)


@pytest.mark.parametrize(
    ("motion", "axis", "sign"),
    [("moving left", 0, -1), ("moving right", 0, 1), ("moving up", 1, -1), ("moving down", 1, 1)],
)
def test_caption_motion_direction(motion, axis, sign):
    for seed in range(3):
        c = _centroid(_foreground(shapes.make_clip(f"a white square {motion}", seed=seed)))
        moved = c[-1] - c[0]
        assert sign * moved[axis] > 8  # pixels over the clip
        assert moved[1 - axis].abs() < 1


def test_caption_growing_shrinking():
    grow = _foreground(shapes.make_clip("a blue triangle growing", seed=0)).sum((1, 2))
    shrink = _foreground(shapes.make_clip("a blue triangle shrinking", seed=0)).sum((1, 2))
    assert (grow[1:] >= grow[:-1]).all() and grow[-1] > 4 * grow[0]
    assert (shrink[1:] <= shrink[:-1]).all() and shrink[0] > 4 * shrink[-1]


def test_captions_change_the_content():
    clips = {c: shapes.make_clip(c, seed=0) for c in ["a red circle moving left", "a blue circle moving left"]}
    clips["a red square moving left"] = shapes.make_clip("a red square moving left", seed=0)
    clips["a red circle moving right"] = shapes.make_clip("a red circle moving right", seed=0)
    vals = list(clips.values())
    for i in range(len(vals)):
        for j in range(i + 1, len(vals)):
            assert (vals[i] - vals[j]).abs().mean() > 0.01


def test_sample_captions_balanced_and_parseable():
    caps = shapes.sample_captions(300, seed=5)
    assert caps == shapes.sample_captions(300, seed=5)
    assert caps != shapes.sample_captions(300, seed=6)
    n = len(shapes.all_captions())
    assert n == 8 * 3 * 6
    assert sorted(caps[:n]) == sorted(shapes.all_captions())  # first n: every caption once
    for c in caps[:20]:
        assert shapes.parse_caption(c).caption == c


def test_parse_caption_errors():
    assert shapes.parse_caption("An ORANGE triangle shrinking.") == shapes.ClipSpec("orange", "triangle", "shrinking")
    with pytest.raises(ValueError, match="colour"):
        shapes.parse_caption("a purple circle moving left")
    with pytest.raises(ValueError, match="motion"):
        shapes.parse_caption("a red circle spinning")
    with pytest.raises(ValueError, match="expected"):
        shapes.parse_caption("red")


# ---------------------------------------------------------------- text


def test_text_encoder_shapes_determinism_padding():
    prompts = ["a red circle moving left", "a blue circle moving left", "", "A Red Circle, moving LEFT"]
    e = text.encode_prompts(prompts)
    assert e.shape == (4, text.MAX_TOKENS, text.TEXT_DIM) == (4, 8, 32)
    assert e.dtype == torch.float32
    assert torch.equal(e, text.encode_prompts(prompts))
    assert not torch.allclose(e[0], e[1])  # one word differs
    assert torch.equal(e[0], e[3])  # case and punctuation do not matter
    assert torch.equal(e[2], torch.zeros(8, 32))  # the empty prompt is all zeros
    assert torch.equal(e[0, 5:], torch.zeros(3, 32))  # zero padding after the 5 words
    assert (e[0, :5].norm(dim=-1) > 1).all()
    assert text.encode_prompts("a red circle moving left").shape == (1, 8, 32)
    long = text.encode_prompts(["one two three four five six seven eight nine ten"])
    assert long.shape == (1, 8, 32) and (long[0].norm(dim=-1) > 0).all()  # truncated


def test_text_encoder_distinct_over_vocabulary():
    e = text.encode_prompts(shapes.all_captions()).flatten(1)
    d = torch.cdist(e, e)
    d.fill_diagonal_(float("inf"))
    assert d.min() > 1.0


# ---------------------------------------------------------------- teacher


@pytest.fixture(scope="module")
def fp_teacher():
    torch.manual_seed(0)
    return teacher.load_teacher()


def test_teacher_asset_small_and_described():
    assert teacher.TEACHER_PATH.is_file()
    assert teacher.TEACHER_PATH.stat().st_size < 5 * 2**20
    meta = teacher.teacher_metadata()
    assert meta["config"]["in_channels"] == meta["config"]["out_channels"] == 3
    assert meta["config"]["text_dim"] == text.TEXT_DIM
    assert tuple(meta["data"]["shape"]) == teacher.DEFAULT_SHAPE
    assert meta["training"]["steps"] > 0


def test_build_teacher_is_a_wan_transformer():
    from diffusers import WanTransformer3DModel

    a, b = teacher.build_teacher(seed=1), teacher.build_teacher(seed=1)
    assert isinstance(a, WanTransformer3DModel)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    x = torch.randn(2, *teacher.DEFAULT_SHAPE)
    out = a(hidden_states=x, timestep=torch.tensor([100.0, 900.0]), encoder_hidden_states=torch.zeros(2, 8, 32))
    assert out.sample.shape == x.shape


def _noised(seed: int, n: int, sigma: float):
    caps = shapes.sample_captions(n, seed=seed)
    clips = torch.stack([shapes.make_clip(c, seed=10_000 + seed + i) for i, c in enumerate(caps)])
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed))
    return caps, clips, noise, (1 - sigma) * clips + sigma * noise


@torch.no_grad()
@pytest.mark.parametrize("sigma", [0.2, 0.5, 0.8])
def test_teacher_velocity_beats_trivial_predictors(fp_teacher, sigma):
    caps, clips, noise, x_t = _noised(seed=77, n=8, sigma=sigma)
    target = noise - clips
    t = torch.full((len(caps),), sigma * 1000)
    v = fp_teacher(hidden_states=x_t, timestep=t, encoder_hidden_states=text.encode_prompts(caps), return_dict=False)[0]
    mse = (v - target).pow(2).mean()
    zero = target.pow(2).mean()  # predicting v = 0
    # predicting x0 as the dark background (the best prompt-blind constant): v = (x_t - bg) / σ
    bg = clips.amin((0, 2, 3, 4), keepdim=True)
    blind = ((x_t - bg) / sigma - bg - target).pow(2).mean()
    assert mse < 0.15 * zero, (float(mse), float(zero))
    assert mse < 0.5 * blind, (float(mse), float(blind))


@torch.no_grad()
def test_teacher_uses_the_caption(fp_teacher):
    caps, clips, noise, x_t = _noised(seed=78, n=8, sigma=0.9)
    target = noise - clips
    t = torch.full((len(caps),), 900.0)

    def err(prompts):
        emb = text.encode_prompts(prompts)
        v = fp_teacher(hidden_states=x_t, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        return float((v - target).pow(2).mean())

    right, empty, wrong = err(caps), err([""] * len(caps)), err(caps[1:] + caps[:1])
    assert right < 0.8 * empty and right < 0.8 * wrong, (right, empty, wrong)


def test_sampler_shape_finite_deterministic(fp_teacher):
    emb = text.encode_prompts(["a red circle moving left", "a green square growing"])
    a = teacher.sample(fp_teacher, emb, seed=0, num_steps=4)
    b = teacher.sample(fp_teacher, emb, seed=0, num_steps=4)
    assert a.shape == (2, *teacher.DEFAULT_SHAPE)
    assert torch.isfinite(a).all() and a.abs().max() <= 1
    assert torch.equal(a, b)
    c = teacher.sample(fp_teacher, emb, seed=0, num_steps=3, guidance_scale=2.0, shift=2.0, clip=False)
    assert c.shape == a.shape and torch.isfinite(c).all()
    small = teacher.sample(fp_teacher, emb[:1], seed=1, num_steps=2, shape=(3, 4, 16, 16))
    assert small.shape == (1, 3, 4, 16, 16)


def test_sigma_schedule():
    s = teacher.sigma_schedule(10)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all()
    shifted = teacher.sigma_schedule(10, shift=3.0)
    assert (shifted[1:-1] > s[1:-1]).all()


@torch.no_grad()
def test_teacher_sample_matches_caption_colour(fp_teacher):
    """A 10-step sample of a red prompt is mostly red where it is bright, a blue one mostly blue."""
    for caption, channel in [("a red square moving right", 0), ("a blue circle growing", 2)]:
        vid = teacher.sample(fp_teacher, text.encode_prompts([caption]), seed=0, num_steps=10)[0]
        bright = vid.amax(0) > 0.0
        assert bright.float().mean() > 0.02, caption  # something was drawn
        means = vid[:, bright].mean(1)
        assert means.argmax() == channel, (caption, means)
