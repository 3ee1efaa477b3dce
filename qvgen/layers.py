"""The training form of a quantized linear layer, `QVGenLinear`.

Fake-quantized weight and input plus the low-rank auxiliary branch Φ
(`y = x̂ (Ŵ + L diag(m) R)ᵀ + b`); the quantizers come from the config's scheme
(`qvgen.schemes`). Its inference forms are the schemes' (`qvgen.packed_linear.PackedLinear` for
QVGen's own checkpoints).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QVGenConfig
from .schemes import Scheme, get_scheme
from .timestep import TimestepState, bucket_of
from .transforms import (
    block_rotate,
    cayley,
    hadamard_block,
    random_signs,
    rotate,
    smooth_group,
    smoothing_scales,
    uses_rotation,
    uses_smoothing,
)


def layer_seed(name: str, seed: int) -> int:
    """A seed of its own for each layer's random draws, fixed by the run's seed and the layer's name."""
    digest = hashlib.blake2b(f"qvgen/{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def top_svd(mat: Tensor, rank: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets; randomized (`svd_lowrank`) for large matrices, where a full SVD
    of every layer of a 14B model would take minutes. `svd_lowrank` draws its test matrix from the
    global generator of `mat`'s device and takes no generator, so it runs on a forked one seeded
    with `seed`: the result depends on the seed alone, not on what ran before."""
    mat = mat.float()
    if min(mat.shape) <= 4 * rank + 16:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    on_cuda = mat.device.type == "cuda"
    with torch.random.fork_rng(devices=[mat.device] if on_cuda else []):
        if on_cuda:
            with torch.cuda.device(mat.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)
        u, s, v = torch.svd_lowrank(mat, q=rank + 16, niter=6)
    return u[:, :rank], s[:rank], v[:, :rank].T


def factored_svd(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-`rank` SVD of the product `a @ b` (a: out×r, b: r×in) without forming it: two QRs
    and an r×r SVD."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u[:, :rank], s[:rank], vh[:rank] @ qb.T


class QVGenLinear(nn.Module):
    """Training form: W{b}A{b} fake quantization with a masked low-rank branch Φ."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        config: QVGenConfig,
        rank: int | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # The weight lives in the transformed input space (rotation folded in at conversion).
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scheme_name = config.scheme
        why = self.scheme.unsupported(in_features)
        if why:
            raise ValueError(f"{name or 'layer'}: scheme {self.scheme.name!r} cannot quantize it: {why}")
        # per-layer activation width (`layer_act_bits`): the layer's own, exported as `input_bits` when it differs
        layer_config = config.for_layer(name)
        self.own_act_bits = None if layer_config is config else layer_config.act_bits
        self.weight_quantizer, self.act_quantizer = self.scheme.quantizers(out_features, in_features, layer_config)
        # timestep-dependent smoothing: smoothing group g > 0 folds other scales into the weight, so its
        # int weight gets its own per-channel scale and zero point (one packed weight per group)
        self.group_weight_quantizers = nn.ModuleList(
            self.scheme.quantizers(out_features, in_features, layer_config)[0] for _ in range(config.smooth_buckets - 1)
        )
        r = min(config.rank if rank is None else rank, in_features, out_features)
        self.phi_down: nn.Parameter | None = None
        self.phi_up: nn.Parameter | None = None
        if r > 0:
            self.phi_down = nn.Parameter(torch.zeros(r, in_features))
            self.phi_up = nn.Parameter(torch.zeros(out_features, r))
            self.register_buffer("phi_mask", torch.ones(r))
        else:
            self.register_buffer("phi_mask", None)
        self._init_transform(config, name)
        self.seed = layer_seed(name, config.transform_seed)  # Φ's randomized SVD
        self.timestep_state: TimestepState | None = None
        # Switches to measure the weight and activation parts of the error separately.
        self.quantize_weights = True
        self.quantize_acts = True

    def _init_transform(self, config: QVGenConfig, name: str) -> None:
        self.transform = config.input_transform
        self.rot_block = hadamard_block(self.in_features, config.hadamard_block)
        signs = random_signs(self.in_features, name, config.transform_seed) if uses_rotation(self.transform) else None
        self.register_buffer("input_signs", signs)
        # smooth_buckets > 1: one row of scales per group of timestep buckets (README, "Timestep-dependent smoothing
        # and learned rotations"), each calibrated on its group's inputs (surgery.calibrate_smoothing)
        self.n_buckets, self.smooth_buckets = config.n_buckets, config.smooth_buckets
        shape = (self.smooth_buckets, self.in_features) if self.smooth_buckets > 1 else (self.in_features,)
        log_s = torch.zeros(shape) if uses_smoothing(self.transform) else None
        if log_s is not None and config.train_transform:
            self.smooth_log = nn.Parameter(log_s)
        else:
            self.register_buffer("smooth_log", log_s)
        # learned_rotation b: a block-diagonal orthogonal C (Cayley, identity at init) after the fixed
        # randomised Hadamard, so the learned rotation Q·C starts at Q
        self.rot_skew: nn.Parameter | None = None
        if config.learned_rotation:
            b = hadamard_block(self.in_features, config.learned_rotation)
            self.rot_skew = nn.Parameter(torch.zeros(self.in_features // b, b, b))

    @property
    def scheme(self) -> Scheme:
        return get_scheme(self.scheme_name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QVGenConfig, init: bool = True, name: str = "") -> QVGenLinear:
        """Wrap an existing `nn.Linear` (weights copied); `init` runs the clip search and Φ's SVD."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config, name=name)
        layer.to(device=linear.weight.device)
        with torch.no_grad():
            w = linear.weight.float()
            if layer.input_signs is not None:
                w = rotate(w, layer.input_signs, layer.rot_block)
            if layer.scheme.rotate is not None:
                w = layer.scheme.rotate(w)
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.float())
        if init:
            layer.init_quantization()
        return layer

    @torch.no_grad()
    def init_quantization(self) -> None:
        """Clip search of the weight quantizer, then Φ from the remaining error."""
        self.weight_quantizer.init_from(self.effective_weight())
        for g, wq in enumerate(self.group_weight_quantizers, start=1):
            wq.init_from(self.effective_weight(g))
        self.init_phi()

    # ---- input transform ---------------------------------------------------------------------
    def smooth_scale(self) -> Tensor | None:
        """Per-channel smoothing scales, (K,), or (smooth_buckets, K) with timestep-dependent smoothing."""
        return None if self.smooth_log is None else self.smooth_log.exp()

    def smooth_group(self) -> Tensor | int:
        """Row of the scales the current timestep bucket(s) use (0 without timestep-dependent smoothing)."""
        if self.smooth_buckets == 1:
            return 0
        return smooth_group(bucket_of(self.timestep_state), self.n_buckets, self.smooth_buckets)

    def learned_blocks(self) -> Tensor | None:
        """The learned rotation's orthogonal blocks (K/b, b, b) in fp32, None when the layer has none."""
        return None if self.rot_skew is None else cayley(self.rot_skew.float())

    def transform_input(self, x: Tensor) -> Tensor:
        """`x Q / s`: the rotation and smoothing the folded weight expects (identity when none).

        Computed in fp32 whatever `x`'s dtype (bf16 under autocast), with the rounding of the kernels'
        `qvgen_kernels.common.apply_transform`, so training sees the integer codes inference computes.
        """
        if self.scheme.rotate is not None:  # a scheme's fixed rotation (ConvRot) replaces signs and smoothing
            return self.scheme.rotate(x)
        s = self.smooth_scale()
        if self.input_signs is None and s is None:
            return x
        v = x.float()
        if self.input_signs is not None:
            v = rotate(v, self.input_signs.float(), self.rot_block)
        if self.rot_skew is not None:
            v = block_rotate(v, self.learned_blocks())
        if s is None:
            return v
        return v / (s.float() if s.dim() == 1 else _rows_for_batch(s.float(), self.smooth_group(), v))

    def effective_weight(self, group: int = 0) -> Tensor:
        """`W Q · s`, the full-precision weight that gets quantized (`s` of smoothing group `group`)."""
        w = self.weight
        if self.rot_skew is not None:
            w = block_rotate(w, self.learned_blocks()).to(w.dtype)
        s = self.smooth_scale()
        if s is None:
            return w
        return w * (s if s.dim() == 1 else s[group])

    @torch.no_grad()
    def set_smoothing(self, act_absmax: Tensor, alpha: float, group: int | None = None) -> None:
        """SmoothQuant scales from the per-channel max |input| (in the rotated space); `group`: one
        row of timestep-dependent scales (None: every row)."""
        if self.smooth_log is None:
            return
        log_s = smoothing_scales(act_absmax, self.weight, alpha).log()
        (self.smooth_log if group is None else self.smooth_log[group]).copy_(log_s)

    def calibration_rows(self, x: Tensor) -> list[tuple[int | None, Tensor]]:
        """`x` as (None, all of it), then with timestep-dependent smoothing (group, its samples) for
        each smoothing group in the batch: what the per-group SmoothQuant statistics are taken over."""
        out: list[tuple[int | None, Tensor]] = [(None, x)]
        g = self.smooth_group()
        if self.smooth_buckets == 1:
            return out
        if not isinstance(g, Tensor) or g.numel() == 1:
            return [*out, (int(g), x)]
        return out + [(gi, x[g.to(x.device) == gi]) for gi in g.unique().tolist()]

    # ---- Φ -----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Live components of Φ (those with a non-zero mask)."""
        return 0 if self.phi_mask is None else int((self.phi_mask > 0).sum())

    @torch.no_grad()
    def quant_error(self) -> Tensor:
        w = self.effective_weight().float()
        return w - self.weight_quantizer(w)

    @torch.no_grad()
    def init_phi(self) -> None:
        """Φ from the SVD of the quantization error: L = U√S, R = √S Vᵀ (top-r components)."""
        if self.phi_down is None:
            return
        self._set_phi(*top_svd(self.quant_error(), self.phi_down.shape[0], self.seed))

    @torch.no_grad()
    def halve_phi(self, new_rank: int) -> None:
        """Phase boundary: re-SVD of the current masked product `L diag(m) R`, keep the top `new_rank`."""
        if self.phi_down is None:
            return
        if new_rank <= 0:
            self.remove_phi()
            return
        self._set_phi(*factored_svd(self.phi_up.float() * self.phi_mask, self.phi_down.float(), new_rank))

    def _set_phi(self, u: Tensor, s: Tensor, vh: Tensor) -> None:
        rank = min(s.numel(), self.phi_down.shape[0])
        root = s[:rank].clamp(min=0).sqrt()
        self.phi_up.zero_()
        self.phi_down.zero_()
        self.phi_up[:, :rank] = (u[:, :rank] * root).to(self.phi_up.dtype)
        self.phi_down[:rank] = (root[:, None] * vh[:rank]).to(self.phi_down.dtype)
        self.phi_mask.zero_()
        self.phi_mask[:rank] = 1.0

    @torch.no_grad()
    def phi_product(self) -> Tensor:
        """`L diag(m) R`, the weight-space correction Φ currently adds."""
        if self.phi_down is None:
            return torch.zeros(self.out_features, self.in_features, device=self.weight.device)
        return (self.phi_up.float() * self.phi_mask) @ self.phi_down.float()

    def remove_phi(self) -> None:
        """Rank 0: drop Φ entirely so the layer is plain W{b}A{b}."""
        self.phi_down = None
        self.phi_up = None
        self.phi_mask = None

    # ---- forward -----------------------------------------------------------------------------
    def quantize_input(self, x: Tensor) -> Tensor:
        """`x̂`, in `x`'s dtype: transform and quantize in fp32 (as the kernels do), then cast back."""
        return self._quantize_transformed(self.transform_input(x)).to(x.dtype)

    def _quantize_transformed(self, v: Tensor) -> Tensor:
        if self.act_quantizer is not None and self.quantize_acts:
            v = self.act_quantizer(v, bucket_of(self.timestep_state))
        return v

    def forward(self, x: Tensor) -> Tensor:
        v = self.transform_input(x)
        x_hat = self._quantize_transformed(v).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x_hat.dtype)
        y = self._quantized_linear(x_hat, bias)
        if self.phi_down is not None:
            phi_in = v.to(x_hat.dtype) if self.scheme.phi_sees_input else x_hat
            down = F.linear(phi_in, self.phi_down.to(x_hat.dtype)) * self.phi_mask.to(x_hat.dtype)
            y = y + F.linear(down, self.phi_up.to(x_hat.dtype))
        return y

    def weight_quantizer_of(self, group: int) -> nn.Module:
        """The weight quantizer of smoothing group `group` (the layer's own for group 0)."""
        return self.weight_quantizer if group == 0 else self.group_weight_quantizers[group - 1]

    def _weight_hat(self, group: int) -> Tensor:
        w = self.effective_weight(group)
        return self.weight_quantizer_of(group)(w) if self.quantize_weights else w

    def _quantized_linear(self, x_hat: Tensor, bias: Tensor | None) -> Tensor:
        """`x̂ Ŵᵀ + b`; with timestep-dependent smoothing each sample uses its group's weight."""
        g = self.smooth_group()
        if not isinstance(g, Tensor) or g.numel() == 1:
            return F.linear(x_hat, self._weight_hat(int(g)).to(x_hat.dtype), bias)
        y = x_hat.new_zeros(*x_hat.shape[:-1], self.out_features)
        for gi in g.unique().tolist():
            rows = g.to(x_hat.device) == gi
            y[rows] = F.linear(x_hat[rows], self._weight_hat(gi).to(x_hat.dtype), bias)
        return y

    # ---- export ------------------------------------------------------------------------------
    @torch.no_grad()
    def export_tensors(self) -> dict[str, Tensor]:
        """This layer's tensors in its scheme's file format (QVGen's: docs/format.md)."""
        return self.scheme.export(self)

    def extra_repr(self) -> str:
        a = self.act_quantizer.bits if self.act_quantizer is not None else 16
        kind = "" if self.scheme.name == "qvgen" else f", {self.scheme.name}"
        return (
            f"in={self.in_features}, out={self.out_features}, W{self.weight_quantizer.bits}A{a}{kind}, rank={self.rank}"
        )


def _rows_for_batch(table: Tensor, rows: Tensor | int, x: Tensor) -> Tensor:
    """`table[rows]` shaped to broadcast against `x` (…, K): one row for the batch, or one per sample."""
    if not isinstance(rows, Tensor):
        return table[rows]
    if rows.numel() == 1:
        return table.index_select(0, rows.reshape(1).to(table.device, torch.long))[0]
    if rows.numel() != x.shape[0]:
        raise ValueError(f"timestep bucket has {rows.numel()} entries but the input batch is {x.shape[0]}")
    picked = table[rows.to(table.device).long()]
    return picked.view(picked.shape[0], *([1] * (x.dim() - 2)), picked.shape[-1])
