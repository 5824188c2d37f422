"""The CogVideoX expert transformer (arXiv 2408.06072 §2.2), one joint sequence from patch embedding to the head.

    latents (B, F, C_in, H, W), text (B, L, 4096), timestep (B,)  ->  prediction (B, F, C_out, H, W)

The text and vision tokens form ONE sequence [text | vision] (B, S = L + N, D), built once after the patch
embedding and split once before the head: that is the single seam for sequence parallelism, and `attention()`
is the only function that sees all tokens. Each block is

    h      = LN1(x) * (1 + scale1[e]) + shift1[e]                   expert AdaLN: e = 0 text, 1 vision
    x, h   = x + gate1[e] * Attn(h),  LN2(x) * (1 + scale2[e]) + shift2[e]     (one fused op)
    x      = x + gate2[e] * FF(h)

with Attn = fused QKV -> per-head LayerNorm on q, k -> 3D RoPE on the vision tokens -> full attention -> out proj.
Positions: 2B adds a fixed 3D sincos table to the vision tokens; 5B-I2V adds a learned table to the joint
sequence (replaced by the sincos table when frames != sample_frames, as diffusers silently does) and uses RoPE;
5B and 1.5 use RoPE only (1.0: crop-region positions, fractional off the training aspect ratio; 1.5: integers).
`use_kernels` picks the fused ops in `kernels` (expert_adaln, expert_adaln_residual, rope3d) or their pure-torch
references `kernels.<op>_ref`, the readable definitions (None: kernels on CUDA, references on CPU).

Numerics follow diffusers 0.42.1 `CogVideoXTransformer3DModel` (../shared/reference/diffusers-cogvideox.md §2, §3).
Module names follow its checkpoint keys; the few re-layouts (fused QKV, modulation rows, patch conv -> Linear)
are done once in `weights.load_transformer`.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from kernels.rope3d import rope3d_positions

from . import parallel as cp
from .attention import attention
from .config import TransformerConfig


class Ops(NamedTuple):
    """The three fused ops a forward calls: the public kernel ops, or their pure-torch references."""
    expert_adaln: Callable
    expert_adaln_residual: Callable
    rope3d: Callable


KERNEL_OPS = Ops(kernels.expert_adaln, kernels.expert_adaln_residual, kernels.rope3d)
REFERENCE_OPS = Ops(kernels.expert_adaln_ref, kernels.expert_adaln_residual_ref, kernels.rope3d_ref)

# (start, step) of the vision tokens for kernels.rope3d, per axis (t, h, w): two fp32 (3,) tensors (the rows of
# one (2, 3) tensor built once per forward), or two float triples (as rope_positions returns them)
Rope = tuple


def timestep_sincos(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, shift=0): [cos(t w) | sin(t w)], w_j = 1e4^(-j/(dim/2)). fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]                        # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sincos_3d_table(dim: int, grid, spatial_scale: float, temporal_scale: float, device=None) -> torch.Tensor:
    """The 2B absolute 3D sincos table (N, dim) in fp64 (reference §2.7): per token (t, h, w), row-major,
    [sincos(dim/4, t/ts) | sincos(3dim/8, w/ss) | sincos(3dim/8, h/ss)], sincos(d, p) = [sin(p w) | cos(p w)]."""
    def sincos(d, n, scale):
        pos = torch.arange(n, dtype=torch.float32, device=device) / scale      # fp32 positions, as diffusers
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64, device=device) / (d / 2.0))
        angles = torch.outer(pos.double(), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)                    # (n, d)

    T, Hg, Wg = grid
    et = sincos(dim // 4, T, temporal_scale)
    ew, eh = sincos(dim // 8 * 3, Wg, spatial_scale), sincos(dim // 8 * 3, Hg, spatial_scale)
    return torch.cat([et[:, None, None].expand(T, Hg, Wg, -1), ew[None, None].expand(T, Hg, Wg, -1),
                      eh[None, :, None].expand(T, Hg, Wg, -1)], dim=-1).reshape(T * Hg * Wg, dim)


def resize_crop_region(grid_hw, base_w: int, base_h: int):
    """diffusers' get_resize_crop_region_for_grid: the grid's place in the training grid (Python round, half-even)."""
    h, w = grid_hw
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rh, rw = int(round(base_w / w * h)), base_w
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_positions(config: TransformerConfig, grid) -> Rope:
    """start/step per axis (t, h, w) reproducing the positions diffusers' pipelines build (reference §3).

    1.0: torch.linspace(crop_start, crop_end * (n - 1) / n, n) over the resize-crop region of the training grid
    (fractional positions away from the native aspect ratio). 1.5 ("slice"): integer positions 0..n-1; diffusers
    slices them from a table of sample_height/2 x sample_width/2 and fails beyond it, here any grid works.
    """
    T, Hg, Wg = grid
    if config.patch_size_t is not None:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    p = config.patch_size
    (top, left), (bottom, right) = resize_crop_region((Hg, Wg), config.sample_width // p, config.sample_height // p)

    def linspace(a, b, n):
        return float(a), ((b - a) / (n - 1) if n > 1 else 0.0)

    (sh, dh), (sw, dw) = linspace(top, bottom * (Hg - 1) / Hg, Hg), linspace(left, right * (Wg - 1) / Wg, Wg)
    return (0.0, sh, sw), (1.0, dh, dw)


def patchify(latents: torch.Tensor, p: int, pt: int) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, N, C*pt*p*p): tokens (f', h', w') row-major, features (c, dt, dy, dx)."""
    B, Fr, C, H, W = latents.shape
    x = latents.reshape(B, Fr // pt, pt, C, H // p, p, W // p, p)
    return x.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(B, -1, C * pt * p * p)


def unpatchify(x: torch.Tensor, grid, p: int, pt: int) -> torch.Tensor:
    """(B, N, C*pt*p*p) -> (B, F, C, H, W): the inverse of patchify."""
    B, T, Hg, Wg = x.shape[0], *grid
    x = x.reshape(B, T, Hg, Wg, -1, pt, p, p).permute(0, 1, 5, 4, 2, 6, 3, 7)
    return x.reshape(B, T * pt, -1, Hg * p, Wg * p)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """Text projection + patch projection (one Linear: the 1.0 conv is re-laid out as a Linear at load time)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.text_proj = nn.Linear(cfg.text_embed_dim, cfg.inner_dim)
        self.proj = nn.Linear(cfg.in_channels * cfg.patch_dim, cfg.inner_dim,
                              bias=cfg.patch_bias or cfg.patch_size_t is not None)
        if cfg.use_learned_positional_embeddings:
            # 5B-I2V: (1, L_max + N_sample, D), checkpoint values (text rows included); a buffer, as in diffusers.
            T = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            n = T * (cfg.sample_height // cfg.patch_size) * (cfg.sample_width // cfg.patch_size)
            self.register_buffer("pos_embedding", torch.zeros(1, cfg.max_text_seq_length + n, cfg.inner_dim))

    def forward(self, text, patches, cfg: TransformerConfig, grid, text_len: int, start: int = 0):
        """text (B, l, text_embed_dim) and patches (B, n, C_in * patch_dim): the rows [start, start + l + n) of the
        joint [text | vision] sequence whose text is text_len long (all of it, or one rank's shard: every op here is
        per token) -> (B, l + n, D), positional tables added."""
        x = torch.cat([self.text_proj(text), self.proj(patches)], dim=1)      # (B, l + n, D)
        if cfg.use_rotary_positional_embeddings and not cfg.use_learned_positional_embeddings:
            return x
        L, stop = text_len, start + x.shape[1]
        frames = (grid[0] - 1) * cfg.temporal_compression_ratio + 1
        if cfg.use_learned_positional_embeddings and frames == cfg.sample_frames:
            if L != cfg.max_text_seq_length:
                raise ValueError(f"the learned positional table covers {cfg.max_text_seq_length} text tokens, "
                                 f"got {L}")
            return x + self.pos_embedding[:, start:stop].to(x.dtype)           # text rows too
        # 2B sincos, and diffusers' silent fallback for the learned table when frames != sample_frames. The table's
        # text rows are zero, so adding it to the vision rows alone is the same sum.
        table = sincos_3d_table(cfg.inner_dim, grid, cfg.spatial_interpolation_scale,
                                cfg.temporal_interpolation_scale, x.device).to(x.dtype)
        n_text = text.shape[1]
        return torch.cat([x[:, :n_text], x[:, n_text:] + table[max(start - L, 0):max(stop - L, 0)]], dim=1)


class ExpertAdaLN(nn.Module):
    """diffusers' CogVideoXLayerNormZero: one LayerNorm, and per-expert shift/scale/gate from the time embedding.

    `linear`'s 6D output rows are [text shift, scale, gate | vision shift, scale, gate] (diffusers stores vision
    first; weights.py swaps the halves) so that each modulation is a (B, E=2, D) view, expert 0 = text.
    """

    def __init__(self, cond_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, emb):
        mod = self.linear(F.silu(emb)).unflatten(1, (2, 3, -1))              # (B, E, 3, D)
        return mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]                        # shift, scale, gate: (B, E, D)

    def affine(self):
        return dict(weight=self.norm.weight, bias=self.norm.bias, eps=self.norm.eps)


class Attention(nn.Module):
    """Fused QKV -> LayerNorm(head_dim) on q, k (eps 1e-6, shared by heads) -> 3D RoPE -> attention() -> out."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)                       # rows [q | k | v]
        self.norm_q = nn.LayerNorm(dim // heads, eps=1e-6)
        self.norm_k = nn.LayerNorm(dim // heads, eps=1e-6)
        self.to_out = nn.Linear(dim, dim)

    def qkv(self, h, text_len, grid, rope: Rope | None, ops: Ops, offset: int | None = None, segments=None):
        """h (B, S, D) -> q, k, v (B, S, H, Dh); q, k normed (all tokens) and rotated (vision tokens).
        offset: h is the shard of the joint sequence starting at that token (context parallelism).
        segments: h is a packed (1, N, D) sequence (kernels.Segments), each segment rotated by its own grid and
        positions (held by the segments; rope is then only "RoPE or not")."""
        qkv = self.to_qkv(h).unflatten(-1, (3, self.heads, -1))                # (B, S, 3, H, Dh)
        # q and k in ONE rope3d launch: their slices of the QKV output are one strided (B, S, 2H, Dh) view (the
        # dims (2, H) merge), heads [0, H) normed with norm_q's affine, [H, 2H) with norm_k's ((2, Dh) weights).
        qk, v = qkv[:, :, :2].flatten(2, 3), qkv[:, :, 2]
        affine = dict(weight=torch.stack([self.norm_q.weight, self.norm_k.weight]),
                      bias=torch.stack([self.norm_q.bias, self.norm_k.bias]), eps=self.norm_q.eps)
        if rope is None:
            # No RoPE (2B): the q/k LayerNorm alone, through rope3d with every token "text" (nothing rotates): one
            # pass over the strided slices, where torch's LayerNorm would first copy them contiguous. Its output
            # is in the input's dtype, also under autocast (as v, which SDPA needs).
            none = torch.zeros(3, device=qk.device)    # start, step: unused without vision tokens
            qk = ops.rope3d(qk, qk.shape[1], (0, 0, 0), none, none, **affine)
        elif segments is not None:
            qk = ops.rope3d(qk, None, None, segments=segments, **affine)
        else:
            qk = ops.rope3d(qk, text_len, grid, *rope, offset=offset, **affine)
        q, k = qk.unflatten(2, (2, self.heads)).unbind(2)                      # (B, S, H, Dh) each
        return q, k, v

    def forward(self, h, text_len, grid, rope, ops, offset=None, seq_len=None, parallel=None, segments=None):
        q, k, v = self.qkv(h, text_len, grid, rope, ops, offset, segments)
        out = attention(q, k, v, parallel=parallel, seq_len=seq_len, segments=segments)      # (B, S, H, Dh)
        return self.to_out(out.flatten(2))                                                    # (B, S, D)


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D); `net` indices match diffusers' keys (net.0.proj, net.2)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 4 * dim)
        self.net = nn.ModuleList([proj, nn.Dropout(dropout), nn.Linear(4 * dim, dim)])

    def forward(self, h):
        fc1 = self.net[0].proj
        if _gelu_epilogue(h, fc1):
            # cuBLASLt applies the GELU in the GEMM's epilogue: the (B, S, 4D) FC1 output is written once, already
            # activated, instead of written, read and written again (8 x B*S*D*2 bytes a block). torch's CUDA
            # _addmm_activation(use_gelu=True) uses the tanh approximation (in the epilogue and in its fallback,
            # aten/src/ATen/native/cuda/Blas.cpp), as CogVideoX's FF does; on CPU it is the erf GELU, so the CPU
            # keeps the plain path. It has no autograd formula (and the epilogue keeps no pre-activation for the
            # backward), so only inference takes it.
            z = torch._addmm_activation(fc1.bias, h.flatten(0, -2), fc1.weight.t(), use_gelu=True)
            z = z.unflatten(0, h.shape[:-1])
        else:
            z = F.gelu(fc1(h), approximate="tanh")
        return self.net[2](self.net[1](z))


def _gelu_epilogue(h: torch.Tensor, fc1: nn.Module) -> bool:
    """Whether FeedForward can use the GEMM's GELU epilogue: CUDA, no autograd graph to record, a plain Linear
    (not a LoRA wrapper) in h's dtype (no autocast: the fused op has no autocast rule), h not empty."""
    return (h.is_cuda and type(fc1) is nn.Linear and fc1.bias is not None and h.dtype == fc1.weight.dtype
            and h.numel() > 0 and not torch.is_autocast_enabled(h.device.type)
            and not (torch.is_grad_enabled() and (h.requires_grad or fc1.weight.requires_grad)))


class Residual(NamedTuple):
    """A block's feed-forward residual, not yet added: the block's output is x + gate[e] * y."""
    y: torch.Tensor      # (B, S, D) feed-forward output
    gate: torch.Tensor   # (B, E, D) per-expert gate


class CogVideoXBlock(nn.Module):
    """One expert transformer block on the joint sequence (see the module docstring).

    attention_layout "2d+1d" (the paper's ablation, Table 8) replaces Attn by a spatial then a temporal stage:

        h  = n1(x)                       n1 = LN1 modulated by (shift1, scale1), as in "3d"
        x  = x + gate1 * Spatial(h)      attn1: each frame attends over [text | that frame's tokens]; a text
                                         token's output is the mean over frames of its per-frame outputs
        h  = n1(x)                       (same norm and modulation again)
        x  = x + gate1 * Temporal(h)     attn_temporal: the vision tokens at one (h, w) attend across frames;
                                         text rows get 0
        then norm2 / FF as in "3d".
    Both stages rotate q, k with the token's full 3D position (as in "3d"). attn_temporal has its own fused QKV,
    q/k norms and out projection; its out projection starts at zero, so a fresh 2d+1d block is spatial-only.
    """

    def __init__(self, cfg: TransformerConfig, attention_layout: str = "3d"):
        super().__init__()
        D = cfg.inner_dim
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, D, cfg.norm_eps)
        self.attn1 = Attention(D, cfg.num_attention_heads, cfg.attention_bias)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, D, cfg.norm_eps)
        self.ff = FeedForward(D, cfg.dropout)
        self.attn_temporal = None
        if attention_layout == "2d+1d":
            self.attn_temporal = Attention(D, cfg.num_attention_heads, cfg.attention_bias)
            nn.init.zeros_(self.attn_temporal.to_out.weight)
            nn.init.zeros_(self.attn_temporal.to_out.bias)

    def forward(self, x, emb, text_len: int, grid, rope: Rope | None, ops: Ops, offset: int = 0,
                seq_len: int | None = None, parallel=None, residual: Residual | None = None,
                segments=None) -> tuple:
        """x (B, S, D) joint sequence, emb (B, time_embed_dim) -> (x, Residual(ff, gate2)): the block's output is
        x + gate2 * ff, left unsummed so that the next op (the next block's first norm, or the final norm) adds it
        in the same pass as its LayerNorm (`expert_adaln_residual`): the sum is never a separate kernel.
        residual: the previous block's pending (ff, gate2), added to x here.

        Context parallelism: x is this rank's shard, tokens [offset, offset + S) of a joint sequence of seq_len
        tokens; every op but attention is per token and takes the offset, attention() sees `parallel`.
        Packing: x is a packed (1, N, D) sequence laid out by `segments` (kernels.Segments), emb (n, ...) one row
        per segment; every op takes the segments (text_len and grid are then None)."""
        shift1, scale1, gate1 = self.norm1(emb)                                # (B, 2, D) each
        shift2, scale2, gate2 = self.norm2(emb)
        if residual is None:
            h = ops.expert_adaln(x, shift1, scale1, text_len, offset=offset, segments=segments,
                                 **self.norm1.affine())                                            # (B, S, D)
        else:
            x, h = ops.expert_adaln_residual(x, residual.y, residual.gate, shift1, scale1, text_len, offset=offset,
                                             segments=segments, **self.norm1.affine())
        if self.attn_temporal is None:
            rope_offset = offset if parallel is not None else None
            a = self.attn1(h, text_len, grid, rope, ops, rope_offset, seq_len, parallel, segments)
        else:
            a = self.spatial_attention(h, text_len, grid, rope, ops)
            x, h = ops.expert_adaln_residual(x, a, gate1, shift1, scale1, text_len, **self.norm1.affine())
            a = self.temporal_attention(h, text_len, grid, rope, ops)
        x, h = ops.expert_adaln_residual(x, a, gate1, shift2, scale2, text_len, offset=offset, segments=segments,
                                         **self.norm2.affine())
        return x, Residual(self.ff(h), gate2)

    def spatial_attention(self, h, text_len, grid, rope, ops):
        """2d+1d stage 1: (B, S, D) -> (B, S, D); per frame, [text | frame tokens] attend to each other."""
        B, S, D = h.shape
        T, M = grid[0], grid[1] * grid[2]
        q, k, v = self.attn1.qkv(h, text_len, grid, rope, ops)               # (B, S, H, Dh)

        def per_frame(t):                                                      # -> (B*T, L + M, H, Dh)
            text = t[:, None, :text_len].expand(B, T, text_len, *t.shape[2:])
            return torch.cat([text, t[:, text_len:].unflatten(1, (T, M))], dim=2).flatten(0, 1)

        o = attention(per_frame(q), per_frame(k), per_frame(v)).unflatten(0, (B, T))   # (B, T, L + M, H, Dh)
        o = torch.cat([o[:, :, :text_len].mean(dim=1), o[:, :, text_len:].flatten(1, 2)], dim=1)   # (B, S, H, Dh)
        return self.attn1.to_out(o.flatten(2))

    def temporal_attention(self, h, text_len, grid, rope, ops):
        """2d+1d stage 2: (B, S, D) -> (B, S, D); vision tokens at one spatial position attend across frames."""
        B, S, D = h.shape
        T, M = grid[0], grid[1] * grid[2]
        q, k, v = self.attn_temporal.qkv(h[:, text_len:], 0, grid, rope, ops)   # (B, N, H, Dh)

        def per_position(t):                                                   # -> (B*M, T, H, Dh)
            return t.unflatten(1, (T, M)).transpose(1, 2).flatten(0, 1)

        o = attention(per_position(q), per_position(k), per_position(v))       # (B*M, T, H, Dh)
        o = o.unflatten(0, (B, M)).transpose(1, 2).flatten(1, 2)                # (B, N, H, Dh)
        return torch.cat([h.new_zeros(B, text_len, D), self.attn_temporal.to_out(o.flatten(2))], dim=1)


class CogVideoXTransformer(nn.Module):
    """CogVideoX expert transformer. forward(latents, text, timestep, ofs=None) -> (B, F, C_out, H, W).

    use_kernels: None = fused kernels on CUDA, pure-torch references on CPU; True = the public `kernels` ops;
    False = the references. attention_layout: "3d" (CogVideoX) or "2d+1d" (ablation; see CogVideoXBlock).
    checkpointing: activation checkpointing while grad is enabled; 0 = off, k = blocks 0, k, 2k, ... recompute
    their activations in backward (1 = every block; torch.utils.checkpoint, use_reentrant=False, RNG state
    replayed: the same computation, bitwise the same gradients in the CPU tests). An attribute: it can change
    between steps.
    """

    def __init__(self, config: TransformerConfig, use_kernels: bool | None = None, attention_layout: str = "3d",
                 checkpointing: int = 0):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        if attention_layout not in ("3d", "2d+1d"):
            raise ValueError(f"attention_layout must be '3d' or '2d+1d', got {attention_layout!r}")
        if use_kernels not in (None, True, False):
            raise TypeError(f"use_kernels must be None, True or False, got {use_kernels!r}")
        if isinstance(checkpointing, bool) or not isinstance(checkpointing, int) or checkpointing < 0:
            raise ValueError(f"checkpointing must be an int >= 0 (0 off, k every k-th block), got {checkpointing!r}")
        self.config, self.use_kernels, self.attention_layout = config, use_kernels, attention_layout
        self.checkpointing = checkpointing
        cfg, D = config, config.inner_dim
        self.patch_embed = PatchEmbed(cfg)
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.time_embedding = TimestepEmbedding(D, cfg.time_embed_dim)
        self.ofs_embedding = TimestepEmbedding(cfg.ofs_embed_dim, cfg.ofs_embed_dim) if cfg.ofs_embed_dim else None
        self.transformer_blocks = nn.ModuleList(CogVideoXBlock(cfg, attention_layout) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.norm_out = nn.Module()                                            # diffusers' AdaLayerNorm
        self.norm_out.linear = nn.Linear(cfg.time_embed_dim, 2 * D)           # rows [shift | scale]
        self.norm_out.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.proj_out = nn.Linear(D, cfg.patch_dim * cfg.out_channels)

    def forward(self, latents, text, timestep, ofs=None, parallel: cp.ParallelMesh | None = None):
        """latents (B, F, C_in, H, W), text (B, L, text_embed_dim), timestep (B,), ofs (B,) or (1,) for
        1.5-I2V -> (B, F, C_out, H, W), in the model's dtype.

        parallel: a `cogvideox.parallel.ParallelMesh` (context parallelism): every rank of its sequence group passes
        the same inputs and gets the whole output; the joint sequence is split once into contiguous token shards
        (any length: uneven shards), each rank runs the blocks on its shard (attention() exchanges what it needs),
        and the per-token head's output is gathered once before unpatchify.

        Multi-resolution frame packing (paper §3): latents a list of n videos (F_i, C_in, H_i, W_i) of any lengths
        and sizes, text a list of n (L_i, text_embed_dim), timestep (n,) (ofs (n,) for 1.5-I2V) -> a list of n
        predictions (F_i, C_out, H_i, W_i): see `_forward_packed`."""
        if isinstance(latents, (list, tuple)):
            if parallel is not None:
                raise ValueError("packed inputs (lists of videos) and context parallelism do not combine")
            return self._forward_packed(latents, text, timestep, ofs)
        cfg = self.config
        timestep, ofs = self._check_inputs(latents, text, timestep, ofs)
        if parallel is not None and self.attention_layout != "3d":
            raise ValueError("context parallelism supports attention_layout '3d' (the 2d+1d ablation runs on one rank)")
        ops = self._ops(latents.device)
        B, Fr, _, H, W = latents.shape
        p, pt, L = cfg.patch_size, cfg.patch_size_t or 1, text.shape[1]
        grid = (Fr // pt, H // p, W // p)
        S = L + grid[0] * grid[1] * grid[2]
        emb = self._embed_time(timestep, ofs, latents.dtype)                  # (B, E_t)
        patches = patchify(latents, p, pt)                                      # (B, N, C_in * patch_dim)
        start, stop = parallel.shard_range(S) if parallel is not None else (0, S)
        # The split, before the (per-token) embedding: this rank's rows [start, stop) of [text | vision].
        text, patches = (cp.shard(text, parallel, min(start, L), min(stop, L)),
                         cp.shard(patches, parallel, max(start - L, 0), max(stop - L, 0)))
        x = self.embedding_dropout(self.patch_embed(text, patches, cfg, grid, L, start))   # (B, s, D)
        rope = None
        if cfg.use_rotary_positional_embeddings:
            # As tensors, built here once (one host-to-device copy), outside the blocks: compiled blocks then take
            # the positions as data, and 1.0's fractional positions, new at every aspect ratio, do not recompile.
            rope = rope3d_positions(*rope_positions(cfg, grid), device=latents.device)   # (3,), (3,) fp32
        x, residual = self._blocks(x, emb, L, grid, rope, ops, offset=start, seq_len=S, parallel=parallel)
        # The head on the vision rows only (the text stream is discarded).
        v0 = max(L - start, 0)                                                  # first vision row of the shard
        if residual is not None:
            residual = Residual(residual.y[:, v0:], residual.gate)
        x = self._norm_final(x[:, v0:], residual, ops, L, offset=start + v0)  # (B, n, D)
        x = self._norm_out(x, emb, ops, 0)                                      # (B, n, C_out * patch_dim)
        if parallel is not None:   # the gather: every rank's vision rows, in order
            ranges = cp.shard_ranges(S, parallel.settings.seq)
            x = cp.gather(x, parallel, [max(b - max(a, L), 0) for a, b in ranges])
        return unpatchify(x, grid, p, pt)                                      # (B, F, C_out, H, W)

    def _forward_packed(self, latents, text, timestep, ofs=None) -> list[torch.Tensor]:
        """The n videos as ONE packed sequence [text_0 | vision_0 | text_1 | vision_1 | ...] of (1, N, D): every
        per-token op runs once over all of it with the layout in a `kernels.Segments` (each video's text length,
        grid, RoPE positions, and its own timestep's modulation), attention keeps each video's tokens to their own
        video (a variable-length attention backend), so video i's prediction equals
        self(latents[i][None], text[i][None], timestep[i:i + 1])[0]. Only the embedding and the last unpatchify
        are per video (a Linear and a reshape each; positional tables depend on the video's grid)."""
        cfg = self.config
        if self.attention_layout != "3d":
            raise ValueError("packed inputs support attention_layout '3d' (the 2d+1d ablation runs unpacked)")
        if not isinstance(text, (list, tuple)) or len(text) != len(latents) or not latents:
            raise ValueError(f"packed inputs need as many text tensors as videos (at least one), got "
                             f"{len(latents)} videos and {len(text) if isinstance(text, (list, tuple)) else text}")
        n = len(latents)
        if isinstance(timestep, torch.Tensor) and timestep.dim() == 0 or isinstance(timestep, (int, float)):
            timestep = [timestep] * n
        timestep = torch.as_tensor(timestep).reshape(-1)
        if timestep.shape != (n,):
            raise ValueError(f"packed inputs need one timestep per video ({n}), got shape {tuple(timestep.shape)}")
        ofs_all = None if ofs is None else torch.as_tensor(ofs).reshape(-1).expand(n)
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        grids, pieces, steps = [], [], []
        for i, (lat, txt) in enumerate(zip(latents, text)):
            if not isinstance(lat, torch.Tensor) or lat.dim() != 4 or not isinstance(txt, torch.Tensor) \
                    or txt.dim() != 2:
                raise ValueError(f"packed video {i}: latents must be (F, C, H, W) and text (L, D) tensors, got "
                                 f"{getattr(lat, 'shape', lat)} and {getattr(txt, 'shape', txt)}")
            t_i, o_i = self._check_inputs(lat[None], txt[None], timestep[i:i + 1],
                                          None if ofs_all is None else ofs_all[i:i + 1])
            steps.append((t_i, o_i))
            grid = (lat.shape[0] // pt, lat.shape[2] // p, lat.shape[3] // p)
            grids.append(grid)
            pieces.append(self.patch_embed(txt[None], patchify(lat[None], p, pt), cfg, grid, txt.shape[0]))
        device, dtype = latents[0].device, latents[0].dtype
        if any(lat.device != device for lat in latents):
            raise ValueError("packed videos must all be on one device")
        ops = self._ops(device)
        rope, start, step = None, None, None
        if cfg.use_rotary_positional_embeddings:
            positions = [rope_positions(cfg, g) for g in grids]
            rope, start, step = True, [s0 for s0, _ in positions], [s1 for _, s1 in positions]
        text_lens = [txt.shape[0] for txt in text]
        segments = kernels.Segments(text_lens, grids, start, step, device=device)
        x = self.embedding_dropout(torch.cat(pieces, dim=1))                   # (1, N, D)
        t = torch.cat([t_i for t_i, _ in steps])                               # (n,)
        o = None if self.ofs_embedding is None else torch.cat([o_i.expand(1) for _, o_i in steps])
        emb = self._embed_time(t, o, dtype)                                    # (n, E_t): one row per video
        x, residual = self._blocks(x, emb, None, None, rope, ops, segments=segments)
        x = self._norm_final(x, residual, ops, None, segments=segments)       # all rows: per-row, as forward's
        # The head on the vision rows only: each video's, end to end, as segments without text.
        x = torch.cat([x[:, a + L:b] for (a, b), L in zip(segments.ranges(), text_lens)], dim=1)   # (1, N_v, D)
        vision = kernels.Segments([0] * n, grids, device=device)
        x = self._norm_out(x, emb, ops, None, segments=vision)                 # (1, N_v, C_out * patch_dim)
        return [unpatchify(x[:, a:b], g, p, pt)[0] for (a, b), g in zip(vision.ranges(), grids)]

    def _ops(self, device: torch.device) -> Ops:
        """The fused kernels or their pure-torch references, as use_kernels says (None: kernels on CUDA)."""
        use = device.type == "cuda" if self.use_kernels is None else self.use_kernels
        return KERNEL_OPS if use else REFERENCE_OPS

    def _embed_time(self, timestep, ofs, dtype) -> torch.Tensor:
        """(B,) timesteps, and ofs for 1.5-I2V -> (B, time_embed_dim): one row per sample (packed: per video)."""
        cfg = self.config
        emb = self.time_embedding(timestep_sincos(timestep, cfg.inner_dim).to(dtype))
        if self.ofs_embedding is not None:
            emb = emb + self.ofs_embedding(timestep_sincos(ofs, cfg.ofs_embed_dim).to(dtype))
        return emb

    def _blocks(self, x, emb, text_len, grid, rope, ops, offset=0, seq_len=None, parallel=None,
                segments=None) -> tuple:
        """Every block in turn, every k-th checkpointed while grad is enabled (self.checkpointing = k) -> (x, the
        last block's pending Residual, None without blocks). offset / seq_len / parallel: context parallelism;
        segments: packing (as CogVideoXBlock takes them)."""
        k = self.checkpointing if torch.is_grad_enabled() else 0
        residual = None
        for i, block in enumerate(self.transformer_blocks):
            args = (x, emb, text_len, grid, rope, ops, offset, seq_len, parallel, residual, segments)
            x, residual = checkpoint(block, *args, use_reentrant=False) if k and i % k == 0 else block(*args)
        return x, residual

    def _norm_final(self, x, residual, ops, text_len, **layout) -> torch.Tensor:
        """The last block's pending residual and norm_final in one pass: expert_adaln_residual with zero modulation
        is LN(x + gate * y) with norm_final's affine. layout: offset, or segments."""
        if residual is None:                                                    # a model with no blocks
            return self.norm_final(x)
        zero = residual.gate.new_zeros(residual.gate.shape)
        return ops.expert_adaln_residual(x, residual.y, residual.gate, zero, zero, text_len,
                                         weight=self.norm_final.weight, bias=self.norm_final.bias,
                                         eps=self.norm_final.eps, **layout)[1]

    def _norm_out(self, x, emb, ops, text_len, **layout) -> torch.Tensor:
        """norm_out's AdaLN (one expert: shift and scale per sample, or per video with segments), then proj_out:
        (B, n, D) vision rows -> (B, n, C_out * patch_dim)."""
        shift, scale = self.norm_out.linear(F.silu(emb)).unflatten(1, (2, 1, -1)).unbind(1)   # (B, 1, D) each
        # The modulation in x's dtype: the residual stream's, or fp32 from norm_final under CUDA autocast when the
        # model has no blocks (the Linear gives bf16 there).
        x = ops.expert_adaln(x, shift.to(x.dtype), scale.to(x.dtype), text_len, weight=self.norm_out.norm.weight,
                             bias=self.norm_out.norm.bias, eps=self.norm_out.norm.eps, **layout)
        return self.proj_out(x)

    def _check_inputs(self, latents, text, timestep, ofs):
        cfg = self.config
        dtype = self.proj_out.weight.dtype
        for name, t, nd in (("latents", latents, 5), ("text", text, 3)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != nd:
                raise ValueError(f"{name} must be {nd}-D, got shape {tuple(t.shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but the model's parameters are {dtype}")
        B, Fr, C, H, W = latents.shape
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        if B == 0:
            raise ValueError(f"latents has an empty batch (B = 0), shape {tuple(latents.shape)}")
        if C != cfg.in_channels:
            raise ValueError(f"latents must be (B, F, C={cfg.in_channels}, H, W) (frames before channels), "
                             f"got {tuple(latents.shape)}")
        if H % p or W % p or Fr % pt or Fr == 0:
            raise ValueError(f"latent H, W must be multiples of patch_size {p} and F a positive multiple of "
                             f"patch_size_t {pt}, got F={Fr}, H={H}, W={W}")
        if cfg.use_learned_positional_embeddings and (H, W) != (cfg.sample_height, cfg.sample_width):
            raise ValueError(f"a learned positional table (5B-I2V) only fits latents of {cfg.sample_height} x "
                             f"{cfg.sample_width}, got {H} x {W} (diffusers refuses this too)")
        if text.shape[0] != B or text.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"text must be (B={B}, L, {cfg.text_embed_dim}), got {tuple(text.shape)}")
        numbers = timestep if isinstance(timestep, (list, tuple)) else [timestep]
        if not isinstance(timestep, torch.Tensor) and not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) for t in numbers):
            raise TypeError(f"timestep must be a number or a tensor of numbers, got {type(timestep).__name__}")
        if not isinstance(timestep, torch.Tensor) and not all(math.isfinite(t) for t in numbers):
            raise ValueError(f"timestep must be finite, got {timestep}")
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(B)
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be a scalar or (B={B},), got {tuple(timestep.shape)}")
        if (ofs is None) != (self.ofs_embedding is None):
            raise ValueError("ofs is required by (and only by) models with ofs_embed_dim (1.5-I2V)")
        if ofs is not None:
            ofs = torch.as_tensor(ofs, device=latents.device).reshape(-1)
            if ofs.shape[0] not in (1, B):
                raise ValueError(f"ofs must be a scalar, (1,) or (B={B},), got {tuple(ofs.shape)}")
        return timestep, ofs


def compile_blocks(model: CogVideoXTransformer, **compile_kwargs) -> CogVideoXTransformer:
    """torch.compile each block in place with fullgraph=True (state_dict keys unchanged); returns the model.

    dynamic=True by default: the sequence length and the grid are symbolic from the first trace, and the RoPE
    start/step (fractional and new at every aspect ratio for 1.0 checkpoints) reach the blocks as fp32 tensors,
    with the kernels and with the references alike, so new resolutions reuse the graph. A size of 1 (one latent
    frame, one patch row) is specialized by Dynamo and costs one recompilation. The blocks share
    one code object and therefore their compiled graphs. Extra kwargs (backend, mode, dynamic) go to torch.compile.
    """
    if not isinstance(model, CogVideoXTransformer):
        raise TypeError(f"compile_blocks takes a CogVideoXTransformer, got {type(model).__name__}")
    compile_kwargs.setdefault("dynamic", True)
    for block in model.transformer_blocks:
        block.compile(fullgraph=True, **compile_kwargs)
    return model
