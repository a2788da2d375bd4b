"""CodeFormer (Zhou et al., "Towards Robust Blind Face Restoration with Codebook Lookup Transformer").

Three parts, with parameter names equal to the official ``params_ema`` state dict:

* a VQ autoencoder: ``encoder`` (512x512 RGB -> 16x16 latent ``lq_feat``), the codebook ``quantize`` and
  ``generator`` (codebook features -> image);
* a pre-norm Transformer (``feat_emb``, ``position_emb``, ``ft_layers``, ``idx_pred_layer``) that classifies each
  of the latent tokens into a codebook entry;
* Controllable Feature Transformation blocks (``fuse_convs_dict``): SFT modulations computed from encoder features,
  added to the generator's features scaled by the fidelity weight ``w``.

Numerics follow the reference: GroupNorm(32, eps 1e-6), LayerNorm eps 1e-5, swish, exact GELU, AdaIN with unbiased
variance and eps 1e-5 inside the square root. Codes are looked up with an embedding lookup (no one-hot matmul), so the
network runs in float16/bfloat16 as well. Attention uses ``scaled_dot_product_attention``.

Deliberately different, same values within float32 rounding: on the CPU in float32 the autoencoder runs its maps
channels-last (oneDNN's convolutions there take ~0.7x the time at 64-128 channels) with the pack's exact
GroupNorm (:mod:`..groupnorm`; ATen's channels-last GroupNorm is not exact enough), whose second norm of each
ResBlock writes in place into the fresh convolution output; the result is returned contiguous. Its 3x3 convolutions
of large float32 CPU maps run as Winograd convolutions (:mod:`..winograd`: 0.44-0.88x the time of the direct
kernel, at most about 1e-5 relative rounding difference per convolution).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groupnorm import group_norm as exact_group_norm
from ..layout import channels_last, conv1x1
from ..subpixel import interleaved_output, phase_kernels
from .. import winograd
from ..winograd import Conv2d as WinogradConv2d

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5
ADAIN_EPS = 1e-5
SFT_LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class CodeFormerConfig:
    """Hyper-parameters of a CodeFormer network (defaults: the released ``codeformer.pth``)."""

    nf: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4, 8)
    res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    img_size: int = 512
    emb_dim: int = 256
    codebook_size: int = 1024
    latent_size: int = 256
    dim_embd: int = 512
    n_head: int = 8
    n_layers: int = 9
    dim_mlp: int = 1024
    connect_list: tuple[str, ...] = ("32", "64", "128", "256")

    @property
    def latent_hw(self) -> int:
        return self.img_size // 2 ** (len(self.ch_mult) - 1)

    def width(self, resolution: int) -> int:
        """Channels of the autoencoder level working at ``resolution``."""
        level = (self.img_size // resolution).bit_length() - 1
        return self.nf * self.ch_mult[level]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` through :func:`photo_restoration.groupnorm.group_norm` (exact in both memory layouts),
    optionally into a buffer and with the swish that follows it."""

    def forward(self, x: Tensor, silu: bool = False, out: Tensor | None = None) -> Tensor:
        return exact_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu, out=out)


def normalize(channels: int) -> GroupNorm:
    return GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS, affine=True)


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return WinogradConv2d(c_in, c_out, 3, stride=stride, padding=padding)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus the input (through a 1x1 ``conv_out`` when the width changes)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = normalize(c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.norm2 = normalize(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.conv_out = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True, out=h))  # in place on the fresh conv output: lower peak memory
        return h.add_(x if self.conv_out is None else conv1x1(x, self.conv_out.weight, self.conv_out.bias))


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, HW, C), C innermost for the fused kernel
            return t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous()

        o = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        o = o.transpose(2, 3).reshape(b, c, h, w).contiguous()
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one pixel, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.conv.weight, self.conv.bias
        if x.dtype != torch.float32 or w.dtype != x.dtype or w.device != x.device:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        # Deliberately different, same sums: conv3x3(upsample2x(x)) as four 2x2 convolutions of x, one per
        # output pixel phase (taps falling on the same source pixel summed): 16 instead of 36 multiply-adds
        # per output value, and no 4x upsampled map (float32 only: 16-bit weights would round the sums).
        n, _, h, wd = x.shape
        co = w.shape[0]
        result, out = interleaved_output(x, co)  # the 2x map in x's layout; its [n, co, h, a, w, c] view
        for p, kernel in enumerate(phase_kernels(w)):
            a, c = divmod(p, 2)
            # the 2x2 kernel over the zero-padded input gives (h+1) x (w+1) values; phase (a, c) is the
            # window starting at (a, c) (no padded copy or strided slice of the input per phase)
            out[:, :, :, a, :, c] = F.conv2d(x, kernel, b, padding=1)[:, :, a:a + h, c:c + wd]
        return result


class Encoder(nn.Module):
    """Image -> latent. ``taps[resolution]`` is the block whose output feeds the fusion at that resolution
    (the last ResBlock of the level)."""

    def __init__(self, cfg: CodeFormerConfig, in_channels: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [conv3x3(in_channels, cfg.nf)]
        self.taps: dict[str, int] = {}
        res, c = cfg.img_size, cfg.nf
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(c, cfg.nf * mult))
                c = cfg.nf * mult
                self.taps[str(res)] = len(blocks) - 1
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(c))
            if level != len(cfg.ch_mult) - 1:
                blocks.append(Downsample(c))
                res //= 2
        blocks += [ResBlock(c, c), AttnBlock(c), ResBlock(c, c), normalize(c), conv3x3(c, cfg.emb_dim)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, keep: Sequence[str] = ()) -> tuple[Tensor, dict[str, Tensor]]:
        wanted = {self.taps[r]: r for r in keep}
        feats: dict[str, Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                feats[wanted[i]] = x
        return x, feats


class Generator(nn.Module):
    """Latent -> image. ``taps[resolution]`` is the block after which the fusion at that resolution applies:
    the first ResBlock of the level, except at the lowest level where the reference uses the last one."""

    def __init__(self, cfg: CodeFormerConfig, out_channels: int = 3):
        super().__init__()
        c = cfg.nf * cfg.ch_mult[-1]
        res = cfg.latent_hw
        blocks: list[nn.Module] = [conv3x3(cfg.emb_dim, c), ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]
        self.taps: dict[str, int] = {}
        for level in reversed(range(len(cfg.ch_mult))):
            for j in range(cfg.res_blocks):
                blocks.append(ResBlock(c, cfg.nf * cfg.ch_mult[level]))
                c = cfg.nf * cfg.ch_mult[level]
                lowest = level == len(cfg.ch_mult) - 1
                if j == 0 or (lowest and j == cfg.res_blocks - 1):
                    self.taps[str(res)] = len(blocks) - 1
                if res in cfg.attn_resolutions:
                    blocks.append(AttnBlock(c))
            if level != 0:
                blocks.append(Upsample(c))
                res *= 2
        blocks += [normalize(c), conv3x3(c, out_channels)]
        self.blocks = nn.ModuleList(blocks)


class VectorQuantizer(nn.Module):
    """The codebook. Only the lookup is needed at inference (codes come from the Transformer)."""

    def __init__(self, codebook_size: int, emb_dim: int):
        super().__init__()
        # given storage: skips the random init (slow on the meta device, overwritten by loading anyway)
        self.embedding = nn.Embedding(codebook_size, emb_dim, _weight=torch.empty(codebook_size, emb_dim))

    def lookup(self, code_idx: Tensor, hw: int) -> Tensor:
        """(B, T) indices -> (B, emb_dim, hw, hw) features; token t sits at row t // hw, column t % hw."""
        feat = F.embedding(code_idx, self.embedding.weight)  # (B, T, C)
        b, _, c = feat.shape
        return feat.reshape(b, hw, hw, c).permute(0, 3, 1, 2).contiguous()


class SelfAttention(nn.Module):
    """Multi-head attention with packed q/k/v projections (``nn.MultiheadAttention``'s parameter names)."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim_embd {dim} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query_key: Tensor, value: Tensor) -> Tensor:
        """``query_key`` feeds both queries and keys, ``value`` the values; (B, T, d) batch-first."""
        b, t, d = value.shape
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)

        def heads(z: Tensor) -> Tensor:  # (B, T, d) -> (B, heads, T, d / heads)
            return z.reshape(b, t, self.n_head, d // self.n_head).transpose(1, 2)

        q = heads(F.linear(query_key, wq, bq))
        k = heads(F.linear(query_key, wk, bk))
        v = heads(F.linear(value, wv, bv))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, d))


class TransformerSALayer(nn.Module):
    """Pre-norm layer: self-attention (position embedding on queries and keys only), then an exact-GELU MLP."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, n_head)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y + pos, y)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFT(nn.Module):
    """Controllable Feature Transformation: ``h + w * (h * scale(e) + shift(e))`` with
    ``e = encode_enc(concat(encoder feature, h))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * channels, channels)

        def branch() -> nn.Sequential:
            return nn.Sequential(conv3x3(channels, channels), nn.LeakyReLU(SFT_LEAKY_SLOPE, inplace=True),
                                 conv3x3(channels, channels))

        self.scale = branch()
        self.shift = branch()

    def forward(self, enc_feat: Tensor, dec_feat: Tensor, w: float | Tensor) -> Tensor:
        e = self.encode_enc(torch.cat([enc_feat, dec_feat], dim=1))
        # the reference's expression, evaluated in place on the fresh branch output (same values, bit for bit)
        return self.scale(e).mul_(dec_feat).add_(self.shift(e)).mul_(w).add_(dec_feat)


def calc_mean_std(feat: Tensor, eps: float = ADAIN_EPS) -> tuple[Tensor, Tensor]:
    """Per sample and channel over the spatial positions: mean and sqrt(unbiased variance + eps)."""
    flat = feat.flatten(2)
    var = flat.var(dim=2, unbiased=True)
    return flat.mean(dim=2)[..., None, None], (var + eps).sqrt()[..., None, None]


def adaptive_instance_norm(content: Tensor, style: Tensor) -> Tensor:
    """Give ``content`` the per-channel mean/std of ``style`` (statistics in float32 for low precisions)."""
    dtype = content.dtype
    content32, style32 = content.float(), style.float()
    c_mean, c_std = calc_mean_std(content32)
    s_mean, s_std = calc_mean_std(style32)
    return ((content32 - c_mean) / c_std * s_std + s_mean).to(dtype)


class CodeFormerOutput(NamedTuple):
    out: Tensor  # (B, 3, H, W) restored image, [-1, 1] nominally, not clamped
    logits: Tensor  # (B, T, K) pre-softmax code logits, tokens row-major over the latent grid
    lq_feat: Tensor  # (B, emb_dim, h, w) encoder latent
    code_idx: Tensor  # (B, T) int64 argmax of the logits


class CodeFormer(nn.Module):
    """The full network. ``model(x, w=0.5, adain=True)`` restores RGB faces in [-1, 1], shape (B, 3, 512, 512)."""

    def __init__(self, cfg: CodeFormerConfig = CodeFormerConfig()):
        super().__init__()
        side = cfg.latent_hw
        if side * side != cfg.latent_size:
            raise ValueError(f"latent_size {cfg.latent_size} does not match a {side}x{side} latent "
                             f"(img_size {cfg.img_size}, {len(cfg.ch_mult)} levels)")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.emb_dim)
        self.generator = Generator(cfg)
        self.position_emb = nn.Parameter(torch.empty(cfg.latent_size, cfg.dim_embd))
        self.feat_emb = nn.Linear(cfg.emb_dim, cfg.dim_embd)
        self.ft_layers = nn.ModuleList(
            TransformerSALayer(cfg.dim_embd, cfg.n_head, cfg.dim_mlp) for _ in range(cfg.n_layers))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(cfg.dim_embd, eps=LAYER_NORM_EPS),
                                            nn.Linear(cfg.dim_embd, cfg.codebook_size, bias=False))
        for res in cfg.connect_list:
            if res not in self.encoder.taps or res not in self.generator.taps:
                raise ValueError(f"fusion resolution {res} is not a level of this autoencoder")
        self.fuse_convs_dict = nn.ModuleDict({res: FuseSFT(cfg.width(int(res))) for res in cfg.connect_list})

    # -- stages ---------------------------------------------------------------------------------------------

    def encode(self, x: Tensor, keep_features: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, 3, H, W) -> latent ``lq_feat`` and (if ``keep_features``) the encoder features the fusion blocks
        use. ``x`` is cast to the model's dtype."""
        size = self.config.img_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (size, size):
            raise ValueError(f"CodeFormer expects faces shaped (B, 3, {size}, {size}), got {tuple(x.shape)}")
        x = channels_last(x.to(self.position_emb.dtype))
        return self.encoder(x, keep=tuple(self.fuse_convs_dict.keys()) if keep_features else ())

    def predict_logits(self, lq_feat: Tensor) -> Tensor:
        """Latent (B, emb_dim, h, w) -> code logits (B, h*w, K)."""
        x = self.feat_emb(lq_feat.flatten(2).transpose(1, 2))  # (B, T, d), token t = row * w + col
        pos = self.position_emb.unsqueeze(0)
        for layer in self.ft_layers:
            x = layer(x, pos)
        return self.idx_pred_layer(x)

    def decode(self, quant: Tensor, enc_feats: dict[str, Tensor], w: float | Tensor = 0.0) -> Tensor:
        """Generator from codebook features, fusing encoder features with fidelity ``w`` (skipped when no w > 0)."""
        weight = _fidelity(w, quant.shape[0], quant)
        fuse = {i: r for r, i in self.generator.taps.items() if r in self.fuse_convs_dict} if weight is not None else {}
        x = channels_last(quant)
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in fuse:
                res = fuse[i]
                x = self.fuse_convs_dict[res](enc_feats[res], x, weight)
        return x.contiguous()

    def forward(self, x: Tensor, w: float | Tensor = 0.5, adain: bool = True,
                return_codes: bool = False) -> Tensor | CodeFormerOutput:
        """Restore faces ``x`` (B, 3, 512, 512) RGB in [-1, 1]; returns the raw (unclamped) output image, or with
        ``return_codes`` a :class:`CodeFormerOutput` (out, logits, lq_feat, code_idx).

        ``w`` (fidelity) is a number or a tensor with one value per batch element; 0 (or less) decodes the predicted
        codes only, larger values pull the result towards the input (trained with 1 and 1.3; UIs offer 0..1).
        """
        with winograd.workspace():  # the CPU convolutions' scratch buffers, reused face after face
            return self._forward(x, w, adain, return_codes)

    def _forward(self, x: Tensor, w: float | Tensor, adain: bool, return_codes: bool) -> Tensor | CodeFormerOutput:
        fusing = _fidelity(w, x.shape[0], x) is not None  # also checks a per-face w against the batch
        if x.device.type == "cpu" and x.ndim == 4 and x.shape[0] > 1:
            # one face at a time on the CPU: the same speed per face as a batched call at about half its
            # peak memory for 4 faces (1.7 instead of 3.2 GiB), same values (no op mixes faces)
            per_face = isinstance(w, Tensor) and w.numel() == x.shape[0]
            parts = [self(x[i:i + 1], w.reshape(-1)[i] if per_face else w, adain, return_codes=True)
                     for i in range(x.shape[0])]
            joined = CodeFormerOutput(*(torch.cat(fields) for fields in zip(*parts)))
            return joined if return_codes else joined.out
        lq_feat, enc_feats = self.encode(x, keep_features=fusing)
        logits = self.predict_logits(lq_feat)
        code_idx = logits.argmax(dim=2)
        quant = self.quantize.lookup(code_idx, lq_feat.shape[-1])
        if adain:
            quant = adaptive_instance_norm(quant, lq_feat)
        out = self.decode(quant, enc_feats, w)
        if return_codes:
            return CodeFormerOutput(out, logits, lq_feat, code_idx)
        return out


def _fidelity(w: float | Tensor, batch: int, like: Tensor) -> float | Tensor | None:
    """``w`` as a python float or a (B, 1, 1, 1) tensor; None when no value is > 0 (fusion skipped).

    As in the reference (``if w > 0``), a fidelity <= 0 means no fusion: negative values count as 0."""
    if not isinstance(w, Tensor):
        w = float(w)
        return w if w > 0 else None
    if w.numel() == 1:
        value = float(w.reshape(()).item())
        return value if value > 0 else None
    if w.numel() != batch:
        raise ValueError(f"w has {w.numel()} values for a batch of {batch}")
    if not bool((w > 0).any()):
        return None
    return w.reshape(batch, 1, 1, 1).clamp(min=0).to(device=like.device, dtype=like.dtype)
