"""CogVideoX's 3D causal VAE (paper §3.1), numerically the same as diffusers 0.42.1's AutoencoderKLCogVideoX.

Video (B, 3, T, H, W) in [-1, 1] <-> latents (B, 16, F, H/8, W/8), F = (T - 1) / 4 + 1 for T = 4k + 1.
Everything that parity depends on is in ../shared/reference/diffusers-cogvideox.md §4:
- every k=3 conv is causal in time: the T axis is padded in front with two copies of frame 0, or, in a later
  temporal chunk, with the last two frames the same conv saw in the previous chunk (its cache); H and W are
  zero-padded by 1. The frames in front are prepended by `kernels.causal_pad3d`, or, when a norm + SiLU comes
  first (almost always), by `kernels.group_norm_silu_pad`, which writes the normalised activation straight into
  the temporally padded conv input. H and W are padded inside the conv (padding=(0, 1, 1)), as diffusers' does:
  a spatially padded copy would move 0.7% more bytes at 480 x 720 and its 722-element rows defeat 16-byte
  vector accesses (kernels._static, `python -m bench kernels --static`);
- frames are processed in temporal chunks (encode 9, 8, 8, ...; decode 3, 2, 2, ... latents) and GroupNorm
  statistics span one chunk. This is semantic, not a memory trick: it changes the output. `exact_groupnorm=True`
  runs every frame as one chunk instead, i.e. whole-video statistics (the paper's context-parallel training);
- spatial tiling uses diffusers' tile sizes, overlaps and linear blending; here it is switched on automatically
  when one untiled chunk would not fit the memory budget.
- across ranks (`parallel=`, `split_run`): chunks run round-robin on temporal ranks in lock-step, each causal
  conv's cache arriving from the rank of the previous chunk; rows split over spatial ranks with row halos and
  GroupNorm statistics merged over them. The collectives are in cogvideox/parallel.py.
Module names follow the checkpoint keys, so `load_vae` loads a diffusers directory as is.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import causal_pad3d, causal_pad3d_ref, group_norm_silu_pad, group_norm_silu_pad_ref

from . import parallel as cp
from .config import VAEConfig
from .scheduler import randn
from .weights import assign_state, check_dtype, check_state_dict, parse_config, read_config, read_state_dict

log = logging.getLogger(__name__)

# diffusers' num_sample_frames_batch_size and num_latent_frames_batch_size: the chunking the VAE was trained with.
ENCODE_CHUNK, DECODE_CHUNK = 8, 2
# A conv input above 2^30 elements is split along time: cuDNN indexes with int32 (diffusers' CogVideoXSafeConv3d).
_CONV_SPLIT_NUMEL = 2 ** 30
# Activations alive at once at the widest layer, in units of that layer's activation: the residual input, the
# padded conv input, the conv output, SpatialNorm's scale and shift, conv workspace. The pure-torch references add
# fp32 temporaries (upcast, normalised, modulated, SiLU) before the cast and the pad, hence twice as many.
_LIVE_ACTIVATIONS = {"kernels": 8, "reference": 16}


def _conv3d(x, weight, bias, stride=(1, 1, 1), padding=(0, 0, 0)):
    """F.conv3d, split along time for huge inputs. Exact: each part reads k_t - 1 frames of the next."""
    parts = x.numel() // _CONV_SPLIT_NUMEL + 1
    if parts == 1:
        return F.conv3d(x, weight, bias, stride, padding)
    kt, t_out = weight.shape[2], x.shape[2] - weight.shape[2] + 1   # time stride is always 1 here
    parts = min(parts, t_out)
    bounds = [t_out * i // parts for i in range(parts + 1)]
    outs = [F.conv3d(x[:, :, a:b + kt - 1], weight, bias, stride, padding) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=2)


class _Chunk:
    """One temporal chunk's state: the causal-conv caches carried in from the previous chunk (nothing is kept after
    the last one), the latents the decoder's SpatialNorms condition on, and the padding ops to run. In a run split
    over ranks, `split` is this rank's place (cogvideox.parallel.VAESplit) and `link` the chunk's temporal
    neighbours (_Link); both None in one process."""
    split = None
    link = None

    def __init__(self, caches: dict, last: bool, use_kernels, zq=None):
        self.caches, self.last, self.zq = caches, last, zq
        self.pad, self.norm_pad = ((causal_pad3d_ref, group_norm_silu_pad_ref) if use_kernels is False
                                   else (causal_pad3d, group_norm_silu_pad))
        self._zq_at = {}   # zq resized per activation size: every SpatialNorm at that size shares it

    def zq_like(self, f):
        """The chunk's latents resized (nearest) to f's (T, H, W); for odd T > 1, frame 0 maps to frame 0 alone."""
        size = tuple(f.shape[2:])
        if size not in self._zq_at:
            if size[0] > 1 and size[0] % 2 == 1:
                first = F.interpolate(self.zq[:, :, :1], size=(1, *size[1:]))
                rest = F.interpolate(self.zq[:, :, 1:], size=(size[0] - 1, *size[1:]))
                self._zq_at[size] = torch.cat([first, rest], dim=2)
            else:
                self._zq_at[size] = F.interpolate(self.zq, size=size)
        return self._zq_at[size]


class CausalConv3d(nn.Module):
    """diffusers' CogVideoXCausalConv3d (pad mode "first"): causal in time, zero-padded in H and W."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size)

    def forward(self, x, chunk: _Chunk, norm=None):
        """x: (B, Cin, T, H, W) -> (B, Cout, T, H, W). `norm` (GroupNorm or SpatialNorm3D) + SiLU run first."""
        k = self.kernel_size
        if k == 1:   # pointwise (SpatialNorm's conv_y, conv_b): nothing to pad, nothing to cache
            return _conv3d(x, self.conv.weight, self.conv.bias)
        if chunk.split is not None:
            x, padding = _split_pad(self, x, chunk, norm)
            return _conv3d(x, self.conv.weight, self.conv.bias, padding=padding)
        pad, cache = (k - 1) // 2, chunk.caches.pop(self, None)
        pad_hw = (0, 0)                                       # H and W are padded by the conv
        if norm is None:
            x, cache = chunk.pad(x, k, cache, pad_hw, "first")
        else:
            gn, scale, shift = norm, None, None
            if isinstance(norm, SpatialNorm3D):
                gn, (scale, shift) = norm.norm_layer, norm.modulation(x, chunk)
            x, cache = chunk.norm_pad(x, gn.num_groups, gn.weight, gn.bias, gn.eps, k, cache, pad_hw, scale, shift)
            del scale, shift                                  # free before the conv allocates its output
        if not chunk.last:
            chunk.caches[self] = cache
        return _conv3d(x, self.conv.weight, self.conv.bias, padding=(0, pad, pad))   # x: (B, Cin, T + k - 1, H, W)


class SpatialNorm3D(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq) (arXiv 2209.09002), zq = the chunk's latents resized to f."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6)   # diffusers hard-codes 1e-6 here
        self.conv_y = CausalConv3d(zq_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, channels, kernel_size=1)

    def modulation(self, f, chunk: _Chunk):
        """f: (B, C, T, H, W) -> scale, shift: (B, C, T, H, W)."""
        zq = chunk.zq_like(f)
        return self.conv_y(zq, chunk), self.conv_b(zq, chunk)


@dataclass
class _Link:
    """A chunk's temporal neighbours in a run split over ranks (global ranks, None: none). send_to: the rank of the
    next chunk, which gets this chunk's last k_t - 1 conv input frames at every causal conv (what the cache would
    hold). recv_from: the rank that sends them here. recv_now: they are this chunk's front frames (the previous
    chunk ran in the same round), else they are the next round's (the first temporal rank receives, during round
    k, the front frames of its round k + 1 chunk) and kept in `stored`, keyed by conv."""
    send_to: int | None
    recv_from: int | None
    recv_now: bool
    stored: dict


def _norm_silu(x, norm, chunk: _Chunk):
    """SiLU(GroupNorm(x)) (SpatialNorm: modulated first) with statistics merged over chunk.split.peers, in fp32 like
    group_norm_silu_pad_ref, cast back to x's dtype. x: (B, C, T, h, W) -> same."""
    gn, scale, shift = norm, None, None
    if isinstance(norm, SpatialNorm3D):
        gn, (scale, shift) = norm.norm_layer, norm.modulation(x, chunk)
    B, C, G = x.shape[0], x.shape[1], gn.num_groups
    mean, rstd = cp.group_stats(x, G, gn.eps, chunk.split)                           # (B, G) each
    # ATen's GroupNorm arithmetic: x * (rstd * weight) + (bias - mean * rstd * weight), per (sample, channel)
    a = (rstd.repeat_interleave(C // G, dim=1) * gn.weight.float()).view(B, C, 1, 1, 1)
    b = (gn.bias.float() - mean.repeat_interleave(C // G, dim=1) * a.view(B, C)).view(B, C, 1, 1, 1)
    h = x.float() * a + b
    if scale is not None:
        h = h * scale.float() + shift.float()
    return F.silu(h).to(x.dtype)


def _split_pad(conv: CausalConv3d, x, chunk: _Chunk, norm):
    """CausalConv3d's input in a run split over ranks -> (input (B, Cin, T + k - 1, h', W), the conv's padding):
    temporally padded as in one process; H and W are padded by the conv, as in one process, except where rows
    are split (h' = h + k - 1 with the halo rows, and the conv pads W alone).

    Temporal split: the pad runs as in a first chunk, then its front frames are replaced by the previous chunk's
    last k_t - 1 (normalised) input frames, received from its rank, and this chunk's go to the next chunk's rank:
    the same tensor a one-process chunked run pads with its cache, so GroupNorm stays per chunk and exact.
    Spatial split (rows over ranks): statistics merged over the ranks that share the chunk (or over every rank for
    whole-video statistics), then the time-padded input gets a halo of the conv's reach in rows from the ranks above
    and below (zeros at the frame's edge)."""
    k, split, link = conv.kernel_size, chunk.split, chunk.link
    kt, p = k - 1, (k - 1) // 2
    cache = chunk.caches.pop(conv, None)
    if norm is not None and split.peers is None:           # statistics local: the fused kernel
        gn, scale, shift = norm, None, None
        if isinstance(norm, SpatialNorm3D):
            gn, (scale, shift) = norm.norm_layer, norm.modulation(x, chunk)
        a, tail = chunk.norm_pad(x, gn.num_groups, gn.weight, gn.bias, gn.eps, k, cache, (0, 0), scale, shift)
        del scale, shift
    else:
        a, tail = chunk.pad(x if norm is None else _norm_silu(x, norm, chunk), k, cache, (0, 0), "first")
    if not chunk.last:
        chunk.caches[conv] = tail
    if link is not None:
        if x.shape[2] < kt:   # the cache would then hold front frames too; chunks of a split run are longer
            raise ValueError(f"a temporally split chunk needs at least {kt} frames at every causal conv, got "
                             f"{x.shape[2]}")
        front = None if link.recv_now else link.stored.pop(conv, None)
        sends = [(link.send_to, tail)] if link.send_to is not None else []
        recvs = [(link.recv_from, tuple(tail.shape))] if link.recv_from is not None else []
        a, got = cp.exchange(a, split, sends, recvs)
        if got and link.recv_now:
            front = got[0]
        elif got:
            link.stored[conv] = got[0]
        if front is not None:
            if torch.is_grad_enabled() and (a.requires_grad or front.requires_grad):
                a = torch.cat([front, a[:, :, kt:]], dim=2)
            else:
                a[:, :, :kt] = front
    if split.spatial > 1:
        return cp.halo_rows(a, split, p, p), (0, 0, p)
    return a, (0, p, p)


class ResnetBlock3D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1x1 shortcut where channels change.
    No time embedding, and dropout is 0 in every CogVideoX config."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float, zq_channels: int | None = None):
        super().__init__()
        def norm(c):
            return nn.GroupNorm(groups, c, eps) if zq_channels is None else SpatialNorm3D(c, zq_channels, groups)
        self.norm1, self.conv1 = norm(cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = norm(cout), CausalConv3d(cout, cout)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x, chunk: _Chunk):
        h = self.conv1(x, chunk, norm=self.norm1)                       # (B, Cout, T, H, W)
        h = self.conv2(h, chunk, norm=self.norm2)
        if self.conv_shortcut is not None:
            x = _conv3d(x, self.conv_shortcut.weight, self.conv_shortcut.bias)
        return h.add_(x)


class Downsample3D(nn.Module):
    """diffusers' CogVideoXDownsample3D: optional time halving (odd T keeps frame 0, then averages pairs), then a
    zero pad on the right and bottom and a per-frame stride-2 3x3 conv (checkpoint: a Conv2d)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x, chunk=None):   # (B, C, T, H, W) -> (B, C, T', H/2, W/2); T' = (T + 1) // 2 if compress_time
        # Pair means written out: the same bits as diffusers' avg_pool1d (halving is exact), no permute copies.
        if self.compress_time and x.shape[2] % 2 == 1:
            x = torch.cat([x[:, :, :1], (x[:, :, 1::2] + x[:, :, 2::2]) * 0.5], dim=2) if x.shape[2] > 1 else x
        elif self.compress_time:
            x = (x[:, :, 0::2] + x[:, :, 1::2]) * 0.5
        if chunk is not None and chunk.split is not None and chunk.split.spatial > 1:
            x = F.pad(cp.halo_rows(x, chunk.split, 0, 1), (0, 1))   # the row below is the next rank's first
        else:
            x = F.pad(x, (0, 1, 0, 1))
        # A per-frame Conv2d is a conv3d with a 1x3x3 kernel: no (B, C, T) -> (B*T, C) permute copies.
        return _conv3d(x, self.conv.weight[:, :, None], self.conv.bias, stride=(1, 2, 2))


class Upsample3D(nn.Module):
    """diffusers' CogVideoXUpsample3D: nearest 2x in H, W (and in time when compress_time and T > 1: odd T keeps
    frame 0 single, 2T - 1 frames), then a per-frame 3x3 conv (checkpoint: a Conv2d)."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, chunk=None):   # (B, C, T, H, W) -> (B, C, T', 2H, 2W)
        # Nearest upsampling is a gather. Time: an index map giving the frames diffusers' split, interpolate and cat
        # give (odd T: 0, 1, 1, 2, 2, ...; even T: 0, 0, 1, 1, ...). H, W: a broadcast copy, which unlike
        # upsample_nearest3d has no INT_MAX output limit (pytorch#144855; 2.4e9 elements at 768 x 1360).
        T = x.shape[2]
        if self.compress_time and T > 1:
            t_out = torch.arange(2 * T - T % 2, device=x.device)
            x = x.index_select(2, (t_out + 1) // 2 if T % 2 else t_out // 2)
        B, C, T, H, W = x.shape
        x = x[:, :, :, :, None, :, None].expand(B, C, T, H, 2, W, 2).reshape(B, C, T, 2 * H, 2 * W)
        if chunk is not None and chunk.split is not None and chunk.split.spatial > 1:   # rows split over ranks
            x = cp.halo_rows(x, chunk.split, 1, 1)
            return _conv3d(x, self.conv.weight[:, :, None], self.conv.bias, padding=(0, 0, 1))
        return _conv3d(x, self.conv.weight[:, :, None], self.conv.bias, padding=(0, 1, 1))


class DownBlock3D(nn.Module):
    def __init__(self, resnets, downsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(self, x, chunk):
        for resnet in self.resnets:
            x = resnet(x, chunk)
        return x if self.downsamplers is None else self.downsamplers[0](x, chunk)


class UpBlock3D(nn.Module):
    def __init__(self, resnets, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, x, chunk):
        for resnet in self.resnets:
            x = resnet(x, chunk)
        return x if self.upsamplers is None else self.upsamplers[0](x, chunk)


class Encoder3D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G, eps, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps, len(cfg.block_out_channels)
        levels = int(math.log2(cfg.temporal_compression_ratio))   # the first `levels` blocks also halve time
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList(
            DownBlock3D([ResnetBlock3D(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], G, eps)
                         for j in range(cfg.layers_per_block)],
                        Downsample3D(ch[i], i < levels) if i < n - 1 else None)
            for i in range(n))
        self.mid_block = DownBlock3D([ResnetBlock3D(ch[-1], ch[-1], G, eps) for _ in range(2)])
        self.norm_out = nn.GroupNorm(G, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x, chunk: _Chunk):   # (B, 3, T, H, W) -> (B, 2 * latent, F, H/8, W/8)
        x = self.conv_in(x, chunk)
        for block in self.down_blocks:
            x = block(x, chunk)
        x = self.mid_block(x, chunk)
        return self.conv_out(x, chunk, norm=self.norm_out)


class Decoder3D(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G, eps, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps, len(cfg.block_out_channels)
        zq, levels = cfg.latent_channels, int(math.log2(cfg.temporal_compression_ratio))
        self.conv_in = CausalConv3d(zq, ch[0])
        self.mid_block = DownBlock3D([ResnetBlock3D(ch[0], ch[0], G, eps, zq) for _ in range(2)])
        self.up_blocks = nn.ModuleList(
            UpBlock3D([ResnetBlock3D(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], G, eps, zq)
                       for j in range(cfg.layers_per_block + 1)],
                      Upsample3D(ch[i], i < levels) if i < n - 1 else None)
            for i in range(n))
        self.norm_out = SpatialNorm3D(ch[-1], zq, G)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z, chunk: _Chunk):   # (B, 16, F, h, w) -> (B, 3, T, 8h, 8w); chunk.zq is z
        x = self.conv_in(z, chunk)
        x = self.mid_block(x, chunk)
        for block in self.up_blocks:
            x = block(x, chunk)
        return self.conv_out(x, chunk, norm=self.norm_out)


@dataclass
class DiagonalGaussian:
    """The encoder's posterior. mean, logvar: (B, 16, F, h, w); logvar is clamped to [-30, 20] as in diffusers."""
    mean: torch.Tensor
    logvar: torch.Tensor

    def __post_init__(self):
        self.logvar = self.logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is drawn by diffusers' randn_tensor rule (scheduler.randn): a CPU generator
        draws on the CPU and the noise is moved, a CUDA generator draws on the mean's CUDA device."""
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)


@dataclass(frozen=True)
class Tiling:
    """diffusers' tile settings (enable_tiling): tile size in pixels and the overlap fractions."""
    sample_height: int
    sample_width: int
    overlap_height: float = 1 / 6
    overlap_width: float = 1 / 5


def _frame_spans(T: int, size: int, whole: bool) -> list[tuple[int, int]]:
    """diffusers' temporal chunks: [0, size + T % size), then `size` at a time (49 -> 9, 8, 8, 8, 8, 8)."""
    if whole:
        return [(0, T)]
    n, rem = max(T // size, 1), T % size
    return [(0 if i == 0 else size * i + rem, min(size * (i + 1) + rem, T)) for i in range(n)]


def _blend(a, b, extent: int, dim: int) -> None:
    """diffusers' blend_v / blend_h, in place on b, row by row (same arithmetic, so the same bits in any dtype)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        b.select(dim, y).copy_(a.select(dim, a.shape[dim] - extent + y) * (1 - y / extent)
                               + b.select(dim, y) * (y / extent))


def free_memory(device: torch.device) -> int:
    """Bytes that new activations can use: free device memory plus PyTorch's cached, unused blocks (CUDA), or
    MemAvailable (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 2 ** 62


class CogVideoXVAE(nn.Module):
    """AutoencoderKLCogVideoX. use_kernels, as in CogVideoXTransformer: None = the `kernels` ops on CUDA and the
    pure-torch references on CPU; True = the `kernels` ops (Triton on CUDA; on CPU the references unless
    kernels/_dispatch.py's environment selects the interpreter); False = the references. Eval mode (what
    `load_vae` returns) only means no dropout: encode and decode build an autograd graph whenever grad is
    enabled, so a latent-space loss gets gradients (run inference under torch.no_grad, as the pipeline does)."""

    def __init__(self, config: VAEConfig, use_kernels: bool | None = None, tiling: Tiling | None = None):
        super().__init__()
        self.config, self.use_kernels = config, use_kernels
        self.tiling = tiling or Tiling(config.sample_height // 2, config.sample_width // 2)
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    def encode(self, video: torch.Tensor, tiling: bool | None = None, memory_budget: int | None = None,
               exact_groupnorm: bool = False, parallel: cp.ParallelMesh | None = None,
               layout: tuple[int, int] | None = None, everywhere: bool = True) -> DiagonalGaussian | None:
        """video: (B, 3, T, H, W) in [-1, 1], H and W multiples of 8 -> posterior over (B, 16, F, H/8, W/8).

        tiling: None = only when one untiled chunk would exceed `memory_budget` (bytes; default: free memory of
        video's device); True = whenever the frame is larger than a tile (diffusers' enable_tiling); False = never.
        exact_groupnorm: GroupNorm statistics over all frames instead of per chunk (holds every frame at once;
        when tiled, over all frames of one tile).
        parallel: a ParallelMesh: the work is split over its VAE group (`split_run`; layout and everywhere are
        its arguments); ranks outside the group return None at once.
        """
        x = self._check(video, "video", self.config.in_channels, spatial_multiple=self.config.spatial_compression)
        if parallel is not None:
            h = self.split_run("encode", x, parallel, layout, exact_groupnorm, tiling, memory_budget, everywhere)
            if h is None:
                return None
        else:
            h = self._run("encode", x, tiling, memory_budget, exact_groupnorm)
        mean, logvar = h.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, latents: torch.Tensor, tiling: bool | None = None, memory_budget: int | None = None,
               exact_groupnorm: bool = False, parallel: cp.ParallelMesh | None = None,
               layout: tuple[int, int] | None = None, everywhere: bool = True) -> torch.Tensor | None:
        """latents: (B, 16, F, h, w), unscaled (divide by scaling_factor first) -> video (B, 3, T, 8h, 8w),
        T = 4F - 3 for odd F. Arguments as in `encode`."""
        z = self._check(latents, "latents", self.config.latent_channels)
        if parallel is not None:
            return self.split_run("decode", z, parallel, layout, exact_groupnorm, tiling, memory_budget, everywhere)
        return self._run("decode", z, tiling, memory_budget, exact_groupnorm)

    def _check(self, x, name, channels, spatial_multiple=1):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != channels or 0 in x.shape:
            raise ValueError(f"{name} must be (B, {channels}, T, H, W) with no empty dimension, got {tuple(x.shape)}")
        if x.shape[3] % spatial_multiple or x.shape[4] % spatial_multiple:
            raise ValueError(f"{name} height and width must be multiples of {spatial_multiple}, "
                             f"got {tuple(x.shape[3:])}")
        weight = self.encoder.conv_in.conv.weight
        if x.device != weight.device:
            raise ValueError(f"{name} is on {x.device} but the VAE is on {weight.device}")
        return x.to(weight.dtype)

    def _geometry(self, kind):
        """Tile size in the input's units, tile size in the output's units, temporal chunk, net."""
        if kind not in ("encode", "decode"):
            raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")
        f, t = self.config.spatial_compression, self.tiling
        sample, latent = (t.sample_height, t.sample_width), (int(t.sample_height / f), int(t.sample_width / f))
        if kind == "encode":
            return sample, latent, ENCODE_CHUNK, self.encoder
        return latent, sample, DECODE_CHUNK, self.decoder

    def plan(self, kind: str, shape, dtype: torch.dtype, device, tiling: bool | None = None,
             memory_budget: int | None = None, exact_groupnorm: bool = False) -> tuple[bool, bool]:
        """(per_sample, tiled): whether encode ("encode") or decode ("decode") of an input of `shape` splits the
        batch and tiles the frame. Arguments as in `encode`."""
        tile_in = self._geometry(kind)[0]
        B, _, T, H, W = shape
        larger = H > tile_in[0] or W > tile_in[1]   # tiling cannot help a frame that fits in one tile
        if tiling is not None:
            return False, bool(tiling) and larger
        budget = free_memory(torch.device(device)) if memory_budget is None else memory_budget
        need = self.activation_bytes(kind, shape, dtype, exact_groupnorm)
        # Splitting the batch changes nothing numerically (every op is per sample), so it comes before tiling.
        per_sample = B > 1 and need > budget
        need = need // B if per_sample else need
        tiled = larger and need > budget
        if tiled:
            tile_shape = (1 if per_sample else B, 0, T, min(H, tile_in[0]), min(W, tile_in[1]))
            need = self.activation_bytes(kind, tile_shape, dtype, exact_groupnorm)
        if need > budget:
            log.warning("VAE %s of %s: about %.1f GiB of activations per %s, over the %.1f GiB budget",
                        kind, tuple(shape), need / 2 ** 30, "tile" if tiled else "chunk", budget / 2 ** 30)
        return per_sample, tiled

    def _run(self, kind, x, tiling, memory_budget, exact_groupnorm):
        per_sample, tiled = self.plan(kind, x.shape, x.dtype, x.device, tiling, memory_budget, exact_groupnorm)
        if per_sample:
            return torch.cat([self._spatial(kind, s, tiled, exact_groupnorm) for s in x.split(1)])
        return self._spatial(kind, x, tiled, exact_groupnorm)

    def _temporal(self, net, x, chunk, exact_groupnorm):
        """Chunk by chunk through `net`, each causal conv's cache carried to the next chunk."""
        caches, spans, outs = {}, _frame_spans(x.shape[2], chunk, exact_groupnorm), []
        for n, (a, b) in enumerate(spans):
            part = x[:, :, a:b]
            kernels = part.is_cuda if self.use_kernels is None else self.use_kernels
            outs.append(net(part, _Chunk(caches, n == len(spans) - 1, kernels,
                                         zq=part if net is self.decoder else None)))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def split_layout(self, kind: str, shape, ranks: int, layout=None, exact_groupnorm: bool = False):
        """How `ranks` ranks split encode ("encode") or decode ("decode") of an input of `shape`:
        -> ((temporal, spatial), frame spans [(a, b)], row unit). Chunk i runs on temporal rank i % temporal (round
        i // temporal); spatial ranks split the rows (latent rows for both, so every level stays aligned: the
        encoder's stride-2 downsamplers and the decoder's 2x upsamplers see whole rows at every resolution).

        layout None: the largest temporal degree dividing `ranks` that the chunks allow, the remainder spatial.
        With exact_groupnorm the frames form one span per temporal rank instead of diffusers' chunks: the first
        T % m + a multiple of m frames, the others multiples of m (m = 2 latents for decode, the temporal
        compression for encode), which keeps the time resamplers' pairing that of the whole video. ValueError when
        a degree exceeds what the input can split."""
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks must be a positive int, got {ranks!r}")
        _, _, size, _ = self._geometry(kind)
        B, _, T, H, _ = shape
        unit = 1 if kind == "decode" else self.config.spatial_compression
        m = 2 if kind == "decode" else self.config.temporal_compression_ratio
        rows = H // unit
        most_t = max(T // m, 1) if exact_groupnorm else len(_frame_spans(T, size, False))
        if layout is None:
            t = max(d for d in range(1, ranks + 1) if ranks % d == 0 and d <= most_t)
            layout = (t, ranks // t)
        if (not isinstance(layout, (tuple, list)) or len(layout) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in layout)):
            raise ValueError(f"layout must be (temporal, spatial) positive ints, got {layout!r}")
        t, s = layout
        if t * s != ranks:
            raise ValueError(f"layout {t} x {s} does not match the {ranks} VAE ranks")
        if t > most_t:
            raise ValueError(f"layout: {t} temporal ranks, but {kind} of {T} frames splits into at most {most_t} "
                             f"temporal {'spans' if exact_groupnorm else 'chunks'}")
        if s > rows:
            raise ValueError(f"layout: {s} spatial ranks, but the frame has only {rows} latent rows to split")
        if not exact_groupnorm:
            spans = _frame_spans(T, size, False)
        elif t == 1:
            spans = [(0, T)]
        else:
            units, first = cp.shard_sizes(T // m, t), T % m
            bounds = [0]
            for i, u in enumerate(units):
                bounds.append(bounds[-1] + u * m + (first if i == 0 else 0))
            spans = list(zip(bounds, bounds[1:]))
        return (t, s), spans, unit

    def split_run(self, kind: str, x, pm: cp.ParallelMesh, layout=None, exact_groupnorm: bool = False,
                  tiling: bool | None = None, memory_budget: int | None = None, everywhere: bool = True):
        """encode's or decode's network output over the ranks of pm.vae_group (degree pm.settings.vae), equal to
        one process's untiled run (the same per-chunk statistics and caches; merged statistics where rows split).

        Every rank of the group passes the same whole input and joins; a rank outside the group returns None at
        once (a no-op, so a pipeline may call it on every rank). everywhere: every group rank gets the whole
        output (differentiable: encode can be trained split, gradients as in `cogvideox.parallel`: the input's is
        whole on every rank, parameters' are partial, sum them over the group); else only rank 0, the others None.
        Tiling: a split run is untiled on every rank (splitting is what cuts its memory), so tiling=True raises
        instead of silently giving the untiled result; None and False run untiled. With vae=1 the one VAE rank
        runs the one-process code, tiling rules included. After the call,
        `self.last_split` is this rank's cogvideox.parallel.VAESplit (layout, bytes sent)."""
        if not isinstance(pm, cp.ParallelMesh):
            raise TypeError(f"parallel must be a ParallelMesh (cogvideox.parallel.init_parallel), got "
                            f"{type(pm).__name__}")
        if pm.vae_group is None:
            return None
        n = pm.settings.vae
        if n == 1:   # one VAE rank: the one-process run, tiling rules included
            return self._run(kind, x, tiling, memory_budget, exact_groupnorm)
        if tiling:
            raise ValueError("tiling=True cannot be combined with parallel=: a split run is untiled on every rank; "
                             "pass tiling=None or False (the result is the untiled one)")
        (t, s), spans, unit = self.split_layout(kind, x.shape, n, layout, exact_groupnorm)
        ti, si = divmod(pm.rank, s)
        peers = tuple(range(n)) if exact_groupnorm else (tuple(ti * s + j for j in range(s)) if s > 1 else None)
        split = cp.VAESplit(t, s, ti, si, pm.vae_group, peers)
        cp.check_same_vae(split, "the VAE call", (kind, tuple(x.shape), str(x.dtype), (t, s), exact_groupnorm,
                                                  everywhere))
        self.last_split = split
        _, _, _, net = self._geometry(kind)
        r0, r1 = cp.shard_ranges(x.shape[3] // unit, s)[si]
        mine = list(range(ti, len(spans), t))                         # round-robin: chunk i on temporal rank i % t
        kernels = x.is_cuda if self.use_kernels is None else self.use_kernels       # as _temporal
        pieces = cp.split_input(x, [(*spans[i], r0 * unit, r1 * unit) for i in mine], split)
        caches, stored, outs = {}, {}, []
        for i, part in zip(mine, pieces):
            chunk = _Chunk(caches, t > 1 or i == len(spans) - 1, kernels, zq=part if kind == "decode" else None)
            chunk.split = split
            if t > 1:
                nxt = split.rank_of((ti + 1) % t, si) if i + 1 < len(spans) else None
                if ti > 0:
                    chunk.link = _Link(nxt, split.rank_of(ti - 1, si), True, stored)
                else:
                    chunk.link = _Link(nxt, split.rank_of(t - 1, si) if i + t < len(spans) else None, False, stored)
            outs.append(net(part, chunk))
        return cp.gather_pieces(outs, [(i, si) for i in mine], split, everywhere)

    def tile_grid(self, kind: str):
        """diffusers' tile geometry for `kind`: tile size and stride in the input's units, blend extent and kept
        size in the output's units. Raises ValueError for settings where the kept part of a tile is not the stride
        (diffusers then returns a wrongly sized output); the default tiles (240 x 360 px) are fine."""
        tile_in, tile_out, _, _ = self._geometry(kind)
        t, f = self.tiling, self.config.spatial_compression
        stride = (int(tile_in[0] * (1 - t.overlap_height)), int(tile_in[1] * (1 - t.overlap_width)))
        blend = (int(tile_out[0] * t.overlap_height), int(tile_out[1] * t.overlap_width))
        keep = (tile_out[0] - blend[0], tile_out[1] - blend[1])
        scale = f if kind == "decode" else 1 / f
        if min(stride) < 1 or any(k != s * scale for k, s in zip(keep, stride)):
            raise ValueError(f"tiling {t} does not tile evenly: the kept part of a tile {keep} must equal the tile "
                             f"stride {stride} x {scale}")
        return tile_in, stride, blend, keep

    def _spatial(self, kind, x, tiled, exact_groupnorm):
        """diffusers' tiled_encode / tiled_decode: overlapping tiles, each chunked in time, blended linearly."""
        _, _, chunk, net = self._geometry(kind)
        if not tiled:
            return self._temporal(net, x, chunk, exact_groupnorm)
        tile_in, stride, blend, keep = self.tile_grid(kind)
        rows = [[self._temporal(net, x[:, :, :, i:i + tile_in[0], j:j + tile_in[1]], chunk, exact_groupnorm)
                 for j in range(0, x.shape[4], stride[1])] for i in range(0, x.shape[3], stride[0])]
        out_rows = []
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                if i > 0:
                    _blend(rows[i - 1][j], tile, blend[0], dim=3)
                if j > 0:
                    _blend(row[j - 1], tile, blend[1], dim=4)
            out_rows.append(torch.cat([tile[:, :, :, :keep[0], :keep[1]] for tile in row], dim=4))
        return torch.cat(out_rows, dim=3)

    def activation_bytes(self, kind: str, shape, dtype: torch.dtype, exact_groupnorm: bool = False) -> int:
        """Rough peak activation memory of one temporal chunk of an untiled encode ("encode": shape is the video's)
        or decode ("decode": the latents'): the widest layer's activation x _LIVE_ACTIVATIONS."""
        B, _, T, H, W = shape
        cfg, levels = self.config, int(math.log2(self.config.temporal_compression_ratio))
        t = max(b - a for a, b in _frame_spans(T, ENCODE_CHUNK if kind == "encode" else DECODE_CHUNK, exact_groupnorm))
        chans = list(cfg.block_out_channels) if kind == "encode" else list(cfg.block_out_channels[::-1])
        widest = 0
        for i, c in enumerate(chans):   # block i: input channels chans[i-1], output chans[i]
            widest = max(widest, max(c, chans[max(i - 1, 0)]) * t * H * W)
            if i < len(chans) - 1:       # the resampler's output is the next block's input
                if kind == "encode":
                    t, H, W = ((t + 1) // 2 if i < levels else t), H // 2, W // 2
                else:
                    t, H, W = ((2 * t - t % 2 if t > 1 else t) if i < levels else t), H * 2, W * 2
        live = _LIVE_ACTIVATIONS["reference" if self.use_kernels is False else "kernels"]
        return B * widest * live * torch.empty((), dtype=dtype).element_size()


def load_vae(path: str, dtype: torch.dtype | None = None, device=None, use_kernels: bool | None = None) -> CogVideoXVAE:
    """A diffusers-format AutoencoderKLCogVideoX directory (config.json + safetensors) -> CogVideoXVAE in eval mode.

    dtype None keeps the checkpoint's dtype when all its tensors share one, else float32 (as load_transformer).
    Every missing, unexpected or mis-shaped key, or an unreadable file, is reported in one CheckpointError.
    """
    check_dtype(dtype)
    config = parse_config(path, read_config(path), VAEConfig.from_diffusers_config)   # before the tensors
    state = read_state_dict(path)
    with torch.device("meta"):
        model = CogVideoXVAE(config, use_kernels)
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, path)
    return assign_state(model, state, dtype, device)
