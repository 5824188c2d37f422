"""vae: CogVideoX's 3D causal VAE, random weights, B = 1. Decode of 13 latent frames at 480x720 and of 21 at
768x1360, encode of 49 frames at 480x720; ours (cogvideox.vae.CogVideoXVAE, fused kernels) vs diffusers'
AutoencoderKLCogVideoX, untiled, or with diffusers' own tiling (enable_tiling) when untiled runs out of memory.
Median time, peak memory, and TFLOP/s of the convolutions (bench/flops.py vae_flops, untiled count) against the
matmul ceiling. On a CPU: the tiny preset at small sizes.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import flops
from ..runner import Case, Context, Suite, Variant, _is_oom
from . import _build

# name -> (kind, input shape (B, C, T, H, W) full, small); small decodes have the tiny VAE's 4 latent channels.
JOBS = {
    "decode 480x720 13 latents": ("decode", (1, 16, 13, 60, 90), (1, 4, 3, 4, 6)),
    "decode 768x1360 21 latents": ("decode", (1, 16, 21, 96, 170), (1, 4, 5, 4, 8)),
    "encode 480x720 49 frames": ("encode", (1, 3, 49, 480, 720), (1, 3, 9, 32, 48)),
}


def _name(kind: str, shape, spatial: int) -> str:
    """The row's name, from the shape that runs: "decode 480x720 13 latents" at full size, "decode 32x48 3
    latents" at small size (JOBS' keys name the full shapes)."""
    _, _, T, H, W = shape
    f = spatial if kind == "decode" else 1
    return f"{kind} {H * f}x{W * f} {T} {'latents' if kind == 'decode' else 'frames'}"


def _widest_bytes(kind: str, shape, cfg, item: int) -> int:
    """The largest activation of one temporal chunk: the first block's channels at full resolution, 9 frames."""
    B, _, T, H, W = shape
    f = cfg.spatial_compression
    full_hw = H * W * (f * f if kind == "decode" else 1)
    return B * cfg.block_out_channels[0] * min(9, 4 * T - 3 if kind == "decode" else T) * full_hw * item


def _fall_back_to_tiling(vae, device: torch.device) -> None:
    """After an untiled diffusers call ran out of memory: free what it left in the allocator's cache, then switch
    the VAE to diffusers' own tiling (enable_tiling, its default tile sizes)."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    vae.enable_tiling()


def _case(name: str, ctx: Context) -> Case:
    kind, full, small = JOBS[name]
    shape = full if ctx.full else small
    cfg = _build.vae_config(ctx)
    item = torch.tensor([], dtype=ctx.dtype).element_size()
    params = 216_000_000 if ctx.full else 1_000_000

    def build() -> list[Variant]:
        g = torch.Generator(device=ctx.device).manual_seed(0)
        x = torch.randn(*shape, generator=g, device=ctx.device, dtype=ctx.dtype)
        state = {}

        def ours():
            vae_mod, = _build.require_cogvideox("vae")
            with _build.on_device(ctx):
                vae = vae_mod.CogVideoXVAE(cfg, use_kernels=None)
            vae = vae.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)
            state["ours_tiled"] = vae.plan(kind, x.shape, x.dtype, x.device)[1]

            def run():
                with torch.no_grad():
                    return vae.encode(x).mean if kind == "encode" else vae.decode(x)
            return run

        def theirs():
            from diffusers import AutoencoderKLCogVideoX
            from diffusers.utils import logging as diffusers_logging
            diffusers_logging.set_verbosity_error()   # its ".to() casts fp32-kept modules" notice, once per build
            with _build.on_device(ctx):
                vae = AutoencoderKLCogVideoX(**dataclasses.asdict(cfg))
            vae = vae.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)
            state["diffusers_tiled"] = False

            def call():
                with torch.no_grad():
                    if kind == "encode":
                        return vae.encode(x).latent_dist.mode()
                    return vae.decode(x).sample

            def run():
                if state["diffusers_tiled"]:
                    return call()
                oom = False
                try:
                    return call()
                except RuntimeError as e:   # torch.cuda.OutOfMemoryError, or cuDNN / cuBLAS reporting the same
                    if not _is_oom(e):
                        raise
                    oom = True
                if oom:
                    # What a diffusers user does when the untiled VAE does not fit: its own tiling. Retried after
                    # the except block: inside it, the traceback still holds the failed call's activations.
                    _fall_back_to_tiling(vae, ctx.device)
                    state["diffusers_tiled"] = True
                    return call()
            return run

        common = dict(pass_=kind, budget_s=max(ctx.budget_s, 5.0) if ctx.full else None, min_reps=2, max_reps=5,
                      flops=flops.vae_flops(cfg, kind, shape))
        return [Variant("ours", ours, backend="kernels" if ctx.device.type == "cuda" else "references (CPU)",
                        collect=lambda: {"tiled": state.get("ours_tiled")}, **common),
                Variant("diffusers", theirs, backend="diffusers 0.42.1",
                        collect=lambda: {"tiled": state.get("diffusers_tiled")}, **common)]

    est = params * item + 10 * _widest_bytes(kind, shape, cfg, item)
    return Case(f"vae {_name(kind, shape, cfg.spatial_compression)}", {"input": list(shape), "kind": kind}, build,
                est_bytes=est)


def cases(ctx: Context) -> list[Case]:
    _build.require_cogvideox("vae", "config")
    return [_case(name, ctx) for name in JOBS]


def notes(ctx: Context) -> list[str]:
    if ctx.device.type == "cuda":
        return []
    return ["CPU run: tiny VAE preset at small sizes; the released VAE at 480x720 / 768x1360 needs a GPU."]


SUITE = Suite("vae", "3D causal VAE decode (13 / 21 latents) and encode (49 frames), ours vs diffusers", cases, notes)
