"""Building what the model-level suites time: configs per size, random-weight models made directly on the device in
the run's dtype (no slow CPU init of a 5B model, no fp32 copy), step inputs, and memory estimates for the fit check.

Our models come from cogvideox (CogVideoXTransformer, compile_blocks, CogVideoXVAE); the baselines from diffusers
0.42.1 (CogVideoXTransformer3DModel, AutoencoderKLCogVideoX), configured with the same field values (our configs
use diffusers' key names).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..runner import Context, SuiteSkipped

# Full: the paper's 480x720x49 video -> latents (F, H, W) = (13, 60, 90). Small: the tiny preset's 3 x 8 x 12.
LATENT = {"full": (13, 60, 90), "small": (3, 8, 12)}
BATCH = 2           # one CFG step: [negative | positive]


def require_cogvideox(*names: str):
    """Import cogvideox modules or skip the suite with the reason."""
    import importlib
    mods = []
    for n in names:
        try:
            mods.append(importlib.import_module(f"cogvideox.{n}"))
        except ImportError as e:
            raise SuiteSkipped(f"cogvideox.{n} is not importable: {e}") from None
    return mods


def transformer_config(model: str, ctx: Context, **small_overrides):
    """The 2b / 5b preset, or on small runs the tiny preset with the family difference that matters to the work
    (5B: 3D RoPE instead of the sincos table) and `small_overrides`."""
    (config,) = require_cogvideox("config")
    if ctx.full:
        return config.TransformerConfig.preset(model)
    return config.TransformerConfig.preset("tiny", use_rotary_positional_embeddings=(model == "5b"),
                                           **small_overrides)


def vae_config(ctx: Context):
    (config,) = require_cogvideox("config")
    return config.VAEConfig.preset("released" if ctx.full else "tiny")


@contextlib.contextmanager
def on_device(ctx: Context):
    """Parameters are created directly on ctx.device in ctx.dtype (random init on the GPU is fast; no fp32 copy)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            yield
    finally:
        torch.set_default_dtype(old)


def ours_transformer(cfg, ctx: Context, layout: str = "3d", compile_: bool = False):
    transformer, = require_cogvideox("transformer")
    with on_device(ctx):
        model = transformer.CogVideoXTransformer(cfg, use_kernels=None, attention_layout=layout)
    model = model.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)
    if compile_:
        torch._dynamo.reset()
        transformer.compile_blocks(model)
    return model


def diffusers_transformer(cfg, ctx: Context, compile_: bool = False):
    from diffusers import CogVideoXTransformer3DModel
    with on_device(ctx):
        model = CogVideoXTransformer3DModel(**dataclasses.asdict(cfg))
    # .to(device) only: diffusers keeps the 2B sincos table in fp64 and casts it at use, as in its pipelines.
    model = model.to(ctx.device).eval().requires_grad_(False)
    if compile_:
        torch._dynamo.reset()
        # diffusers' regional compile (its recommended way): every repeated block compiled, shared graphs.
        if getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(fullgraph=True)
        else:
            for block in model.transformer_blocks:
                block.compile()
    return model


def step_inputs(cfg, ctx: Context, latent=None, batch: int = BATCH):
    """latents (B, F, C, H, W), text (B, L, text_embed_dim), timestep (B,): one CFG step's transformer inputs."""
    F_, H, W = latent or LATENT[ctx.size]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    latents = torch.randn(batch, F_, cfg.in_channels, H, W, generator=g, device=ctx.device, dtype=ctx.dtype)
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g, device=ctx.device,
                       dtype=ctx.dtype)
    timestep = torch.full((batch,), 999, dtype=torch.int64, device=ctx.device)
    return latents, text, timestep


def diffusers_rotary(cfg, latents: torch.Tensor):
    """The (cos, sin) table diffusers' pipeline passes as image_rotary_emb (None for the 2B's sincos table).
    Built with our rope3d_table at the positions diffusers uses (cogvideox.transformer.rope_positions; the
    transformer tests check both against diffusers)."""
    if not cfg.use_rotary_positional_embeddings:
        return None
    from cogvideox.transformer import rope_positions
    from kernels.rope3d import default_axes_dim, rope3d_table
    pt = cfg.patch_size_t or 1
    grid = (latents.shape[1] // pt, latents.shape[3] // cfg.patch_size, latents.shape[4] // cfg.patch_size)
    start, step = rope_positions(cfg, grid)
    return rope3d_table(grid, start, step, 10000.0, default_axes_dim(cfg.attention_head_dim), device=latents.device)


def transformer_params(cfg, layout: str = "3d") -> int:
    """Parameter count (close: every Linear and norm of the block, embeddings, head)."""
    D, te = cfg.inner_dim, cfg.time_embed_dim
    block = 12 * D * D + 13 * D + 2 * (te * 6 * D + 6 * D) + 4 * D + 4 * cfg.attention_head_dim
    if layout == "2d+1d":
        block += 4 * D * D + 4 * D
    embed = cfg.text_embed_dim * D + cfg.in_channels * cfg.patch_dim * D + D * te + te * te
    head = te * 2 * D + D * cfg.patch_dim * cfg.out_channels
    return cfg.num_layers * block + embed + head


def step_bytes(cfg, ctx: Context, latent, layout: str = "3d", models: int = 1) -> int:
    """Device memory of `models` models plus one forward's live activations (the FF's 4D hidden dominates)."""
    item = torch.tensor([], dtype=ctx.dtype).element_size()
    F_, H, W = latent
    S = cfg.max_text_seq_length + (F_ // (cfg.patch_size_t or 1)) * (H // cfg.patch_size) * (W // cfg.patch_size)
    act = 16 * BATCH * S * cfg.inner_dim * item
    if layout == "2d+1d":   # the text rows are copied into every frame's spatial sequence
        act += 6 * BATCH * F_ * cfg.max_text_seq_length * cfg.inner_dim * item
    return models * transformer_params(cfg, layout) * item + act
