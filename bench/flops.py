"""FLOP and byte formulas: the one place every suite takes its work counts from (tests/test_bench.py checks them
against hand-computed values).

FLOPs count a multiply-add as 2. GEMM (M, K) @ (K, N): 2 M K N. Attention forward, non-causal:
QK^T and PV are 2 * (2 B H Sq Sk Dh), so 4 B H Sq Sk Dh (the FlashAttention papers' convention; softmax excluded).

Bytes are the minimum a kernel must move: every input read once plus every output written once, at the tensors'
element sizes. Memory-bound rows report GB/s against these bytes, whatever the implementation really moved, so an
implementation that moves more (an eager chain, a cat) shows up as lower effective bandwidth.
Backward: the incoming output gradients and the forward tensors the gradient formulas need are read once, and one
gradient per differentiable input is written once (each op's docstring lists them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

TEXT_LEN = 226  # T5 tokens in front of the vision tokens (diffusers max_text_seq_length)


def gemm_flops(m: int, k: int, n: int, batch: int = 1) -> int:
    return 2 * batch * m * k * n


def attention_flops(batch: int, heads: int, seq_q: int, head_dim: int, seq_k: int | None = None) -> int:
    """softmax(q k^T) v forward: 4 B H Sq Sk Dh."""
    seq_k = seq_q if seq_k is None else seq_k
    return 4 * batch * heads * seq_q * seq_k * head_dim


@dataclass(frozen=True)
class DiTShape:
    """What a DiT forward step's work depends on. `frames` are latent frames, `height`/`width` latent pixels."""
    batch: int
    frames: int
    height: int
    width: int
    num_layers: int
    heads: int
    head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    patch_size_t: int = 1
    text_len: int = TEXT_LEN
    text_embed_dim: int = 4096
    time_embed_dim: int = 512

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T, Hg, Wg): the vision tokens' 3D grid after patchifying."""
        return (math.ceil(self.frames / self.patch_size_t), self.height // self.patch_size,
                self.width // self.patch_size)

    @property
    def vision_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def seq_len(self) -> int:
        return self.text_len + self.vision_tokens

    @classmethod
    def from_config(cls, cfg, batch: int, frames: int, height: int, width: int) -> "DiTShape":
        """cfg: cogvideox.config.TransformerConfig (or anything with diffusers' config field names)."""
        return cls(batch=batch, frames=frames, height=height, width=width, num_layers=cfg.num_layers,
                   heads=cfg.num_attention_heads, head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels,
                   out_channels=cfg.out_channels, patch_size=cfg.patch_size,
                   patch_size_t=cfg.patch_size_t or 1, text_len=cfg.max_text_seq_length,
                   text_embed_dim=cfg.text_embed_dim, time_embed_dim=cfg.time_embed_dim)


LAYOUTS = ("3d", "2d+1d")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def dit_gemm_flops(s: DiTShape, layout: str = "3d") -> int:
    """Every GEMM of one forward step (diffusers-cogvideox.md section 2): embeddings, per block the two modulation
    linears, q/k/v/out projections on the joint sequence and the 4x feed-forward, then the output head.
    "2d+1d" blocks add the temporal stage's own q/k/v/out projections over the vision tokens."""
    _check_layout(layout)
    B, D, S, N, te = s.batch, s.dim, s.seq_len, s.vision_tokens, s.time_embed_dim
    patch_in = s.in_channels * s.patch_size_t * s.patch_size ** 2
    patch_out = s.out_channels * s.patch_size_t * s.patch_size ** 2
    embed = (gemm_flops(B, D, te) + gemm_flops(B, te, te)            # time embedding: linear_1, linear_2
             + gemm_flops(B * N, patch_in, D)                        # patch embedding (conv as GEMM)
             + gemm_flops(B * s.text_len, s.text_embed_dim, D))      # text_proj
    block = (2 * gemm_flops(B, te, 6 * D)                            # norm1.linear, norm2.linear
             + 4 * gemm_flops(B * S, D, D)                           # to_q, to_k, to_v, to_out
             + gemm_flops(B * S, D, 4 * D) + gemm_flops(B * S, 4 * D, D))  # feed-forward
    if layout == "2d+1d":
        block += 4 * gemm_flops(B * N, D, D)                         # attn_temporal: to_qkv, to_out
    head = gemm_flops(B, te, 2 * D) + gemm_flops(B * N, D, patch_out)  # norm_out.linear, proj_out
    return embed + s.num_layers * block + head


def dit_attention_flops(s: DiTShape, layout: str = "3d") -> int:
    """Attention FLOPs of one forward step.

    "3d": every block attends over the joint sequence, text included: 4 B H S^2 Dh per block.
    "2d+1d": every block runs a spatial attention inside each frame (the text tokens joined to every frame, so
    T sequences of text + Hg Wg tokens) and a temporal attention along each spatial position (Hg Wg sequences of
    T tokens, vision only). This is how cogvideox/transformer.py builds its "2d+1d" layout.
    """
    _check_layout(layout)
    B, H, Dh = s.batch, s.heads, s.head_dim
    if layout == "3d":
        per_block = attention_flops(B, H, s.seq_len, Dh)
    else:
        t, h, w = s.grid
        per_block = (attention_flops(B * t, H, s.text_len + h * w, Dh)   # spatial: one sequence per frame
                     + attention_flops(B * h * w, H, t, Dh))             # temporal: one sequence per position
    return s.num_layers * per_block


def dit_step_flops(s: DiTShape, layout: str = "3d") -> int:
    """GEMM + attention FLOPs of one DiT forward step (elementwise and norm work excluded: a few percent)."""
    return dit_gemm_flops(s, layout) + dit_attention_flops(s, layout)


# ---- minimum bytes per kernel ---------------------------------------------------------------------------------

def nbytes(shape, itemsize: int) -> int:
    return math.prod(shape) * itemsize


def min_bytes(reads, writes, itemsize: int) -> int:
    """Inputs read once + outputs written once; reads/writes are lists of shapes of one element size."""
    return sum(nbytes(s, itemsize) for s in reads) + sum(nbytes(s, itemsize) for s in writes)


def _fwd_bwd(inputs, outputs, grad_outputs, bwd_reads, grads, itemsize):
    fwd = min_bytes(inputs, outputs, itemsize)
    bwd = min_bytes(list(grad_outputs) + list(bwd_reads), grads, itemsize)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def expert_adaln_bytes(B: int, S: int, D: int, E: int = 2, itemsize: int = 2) -> dict[str, int]:
    """x (B,S,D), shift/scale (B,E,D), weight/bias (D,) -> out (B,S,D).
    Backward reads d_out, x, scale, weight (shift and bias do not enter any gradient) and writes 5 gradients."""
    x, m, w = (B, S, D), (B, E, D), (D,)
    inputs = [x, m, m, w, w]
    return _fwd_bwd(inputs, [x], [x], [x, m, w], inputs, itemsize)


def expert_adaln_residual_bytes(B: int, S: int, D: int, E: int = 2, itemsize: int = 2) -> dict[str, int]:
    """x, y (B,S,D), gate/shift/scale (B,E,D), weight/bias (D,) -> x_new, out (B,S,D).
    Backward reads d_x_new, d_out, x_new (the LayerNorm input), y, gate, scale, weight; writes 7 gradients."""
    x, m, w = (B, S, D), (B, E, D), (D,)
    inputs = [x, x, m, m, m, w, w]
    return _fwd_bwd(inputs, [x, x], [x, x], [x, x, m, m, w], inputs, itemsize)


def rope3d_bytes(B: int, S: int, H: int, Dh: int, itemsize: int = 2) -> dict[str, int]:
    """x (B,S,H,Dh), qk-norm weight/bias (Dh,) -> out (B,S,H,Dh). The cos/sin table is computed on the fly, so it
    moves no bytes. Backward reads d_out, x, weight; writes d_x, d_weight, d_bias."""
    x, w = (B, S, H, Dh), (Dh,)
    return _fwd_bwd([x, w, w], [x], [x], [x, w], [x, w, w], itemsize)


def causal_pad3d_bytes(B: int, C: int, T: int, H: int, W: int, kernel_t: int = 3, pad_hw=(1, 1),
                       itemsize: int = 2) -> dict[str, int]:
    """x (B,C,T,H,W) -> out (B,C,T+kt-1,H+2ph,W+2pw), cache (B,C,kt-1,H,W). Backward: d_out -> d_x; only the
    interior of d_out's frames (T+kt-1 of H x W) feeds d_x, the zero border's gradient is discarded unread."""
    ph, pw = pad_hw
    x = (B, C, T, H, W)
    out = (B, C, T + kernel_t - 1, H + 2 * ph, W + 2 * pw)
    return _fwd_bwd([x], [out, (B, C, kernel_t - 1, H, W)], [(B, C, T + kernel_t - 1, H, W)], [], [x], itemsize)


def group_norm_silu_pad_bytes(B: int, C: int, T: int, H: int, W: int, kernel_t: int = 3, pad_hw=(1, 1),
                              zq: bool = False, itemsize: int = 2, fits: bool = False) -> dict[str, int]:
    """x (B,C,T,H,W), weight/bias (C,), with zq also zq_scale/zq_shift (B,C,T,H,W) -> out, cache as causal_pad3d.

    What the fastest implementation must move. Forward: x twice (a group's statistics, C/G x T x H x W elements,
    25 MB in the VAE's 480 x 720 chunk, must be complete before any output and no group stays on chip), zq once,
    out and the cache once. Backward: the group means of dxhat and dxhat * xhat must be complete before any d_x,
    so d_out (the interior of its T+kt-1 frames), x and zq are read twice (keeping dL/da between the passes
    instead would cost an fp32 write and read of x's size, more than the re-reads); it writes one gradient per
    input. fits: a (b, group) chunk fits one program's registers (small layers, see kernels.group_norm_silu_pad's
    fused_blocks): every tensor is then read once, the cache's gradient gathered in the same pass."""
    ph, pw = pad_hw
    x = (B, C, T, H, W)
    params = [(C,), (C,)]
    zqs = [x, x] if zq else []
    out = (B, C, T + kernel_t - 1, H + 2 * ph, W + 2 * pw)
    dout = (B, C, T + kernel_t - 1, H, W)
    reads = 1 if fits else 2
    fwd = min_bytes([x] * reads + params + zqs, [out, (B, C, kernel_t - 1, H, W)], itemsize)
    bwd = min_bytes(reads * ([dout, x] + zqs) + params, [x] + params + zqs, itemsize)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


# ---- VAE convolution FLOPs -------------------------------------------------------------------------------------

def conv_flops(c_in: int, c_out: int, kernel: int, out_numel: int) -> int:
    """A convolution with kernel**dims taps (pass kt*kh*kw), out_numel output positions per channel, bias ignored."""
    return 2 * c_in * c_out * kernel * out_numel


def _chunks(frames: int, size: int) -> list[int]:
    """diffusers' temporal batching: max(T // size, 1) chunks, the remainder joins the first one."""
    n = max(frames // size, 1)
    return [size + frames % size if frames >= size else frames] + [size] * (n - 1)


def vae_flops(cfg, kind: str, shape) -> int:
    """Convolution FLOPs of one AutoencoderKLCogVideoX encode or decode (untiled; diffusers-cogvideox.md section 4).

    cfg: anything with block_out_channels, layers_per_block, latent_channels, in_channels, out_channels and
    temporal_compression_ratio (cogvideox.config.VAEConfig). shape: the input, (B, C, T, H, W). Frames are processed
    in diffusers' temporal chunks (encode 8 frames, decode 2 latents, the remainder in the first), which decides how
    many frames every layer sees. Norms, activations, pooling and interpolation are not counted (no FLOPs in the
    GEMM sense); tests/test_bench.py checks this count against torch's FlopCounterMode on diffusers' model.
    """
    if kind not in ("encode", "decode"):
        raise ValueError(f"kind must be 'encode' or 'decode', got {kind!r}")
    B, _, T, H, W = shape
    chans = list(cfg.block_out_channels)
    levels = int(math.log2(cfg.temporal_compression_ratio))
    total = 0
    if kind == "encode":
        for t in _chunks(T, 8):
            h, w = H, W
            total += conv_flops(cfg.in_channels, chans[0], 27, t * h * w)                     # conv_in
            c_in = chans[0]
            for i, c in enumerate(chans):
                for j in range(cfg.layers_per_block):                                          # resnets
                    ci = c_in if j == 0 else c
                    total += conv_flops(ci, c, 27, t * h * w) + conv_flops(c, c, 27, t * h * w)
                    if ci != c:
                        total += conv_flops(ci, c, 1, t * h * w)                               # 1x1x1 shortcut
                c_in = c
                if i < len(chans) - 1:                                                         # downsample
                    if i < levels:
                        t = (t + 1) // 2 if t % 2 else t // 2
                    h, w = h // 2, w // 2
                    total += conv_flops(c, c, 9, t * h * w)                                    # 3x3, stride 2
            total += 2 * 2 * conv_flops(chans[-1], chans[-1], 27, t * h * w)                   # mid: 2 resnets
            total += conv_flops(chans[-1], 2 * cfg.latent_channels, 27, t * h * w)             # conv_out
        return B * total
    up = chans[::-1]
    zq = cfg.latent_channels
    for t in _chunks(T, 2):
        h, w = H, W

        def resnet(ci, c, n):
            f = 2 * conv_flops(zq, ci, 1, n) + 2 * conv_flops(zq, c, 1, n)   # SpatialNorm3D: conv_y, conv_b, x2
            f += conv_flops(ci, c, 27, n) + conv_flops(c, c, 27, n)           # conv1, conv2
            return f + (conv_flops(ci, c, 1, n) if ci != c else 0)           # 1x1x1 shortcut

        total += conv_flops(zq, up[0], 27, t * h * w)                                          # conv_in
        total += 2 * resnet(up[0], up[0], t * h * w)                                           # mid block
        c_in = up[0]
        for i, c in enumerate(up):
            for j in range(cfg.layers_per_block + 1):
                total += resnet(c_in if j == 0 else c, c, t * h * w)
            c_in = c
            if i < len(up) - 1:                                                                # upsample
                if i < levels and t > 1:
                    t = 2 * t - 1 if t % 2 else 2 * t
                h, w = 2 * h, 2 * w
                total += conv_flops(c, c, 9, t * h * w)                                        # 3x3 per frame
        total += 2 * conv_flops(zq, up[-1], 1, t * h * w)                                      # norm_out
        total += conv_flops(up[-1], cfg.out_channels, 27, t * h * w)                           # conv_out
    return B * total
