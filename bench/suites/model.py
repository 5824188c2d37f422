"""model: one DiT forward step, B = 2 (one CFG step), random weights, 2B and 5B at 480x720x49 (latents 13x60x90,
S = 17,776): ours (fused kernels + compile_blocks), ours without compile, diffusers eager and diffusers compiled
(each block torch.compile'd, its regional-compile recipe). Median time, peak memory, and MFU = the step's GEMM +
attention FLOPs (bench/flops.py) per second over the measured bf16 matmul ceiling. On a CPU: the tiny preset.
"""
from __future__ import annotations

import torch

from .. import flops
from ..runner import Case, Context, Suite, Variant
from . import _build


def _case(model: str, ctx: Context) -> Case:
    cfg = _build.transformer_config(model, ctx)
    latent = _build.LATENT[ctx.size]
    s = flops.DiTShape.from_config(cfg, _build.BATCH, *latent)
    work = flops.dit_step_flops(s, "3d")
    gpu = ctx.device.type == "cuda"

    def build() -> list[Variant]:
        x, text, t = _build.step_inputs(cfg, ctx, latent)

        def ours(compile_):
            def make():
                m = _build.ours_transformer(cfg, ctx, "3d", compile_=compile_)

                def step():
                    with torch.no_grad():
                        return m(x, text, t)
                return step
            return make

        def theirs(compile_):
            def make():
                m = _build.diffusers_transformer(cfg, ctx, compile_=compile_)
                rotary = _build.diffusers_rotary(cfg, x)

                def step():
                    with torch.no_grad():
                        return m(hidden_states=x, encoder_hidden_states=text, timestep=t,
                                 image_rotary_emb=rotary, return_dict=False)[0]
                return step
            return make

        try:
            import diffusers  # noqa: F401
            why = None
        except ImportError as e:
            why = f"diffusers not importable: {e}"
        common = dict(pass_="step", flops=work, budget_s=max(ctx.budget_s, 3.0) if gpu else None, max_reps=20,
                      extra={"model": model, "mfu_basis": "measured matmul ceiling"})
        no_compile = ctx.no_compile_reason
        return [
            Variant("ours", ours(True), skip=no_compile, warmup=2,
                    backend="kernels + compile_blocks" if gpu else "references + compile_blocks", **common),
            Variant("ours-eager", ours(False), backend="kernels" if gpu else "references (CPU)", **common),
            Variant("diffusers", theirs(False), skip=why, backend="diffusers 0.42.1 eager", **common),
            Variant("diffusers-compile", theirs(True), skip=why or no_compile, warmup=2,
                    backend="diffusers + per-block torch.compile", **common),
        ]

    shape = {"B": _build.BATCH, "latent": list(latent), "seq_len": s.seq_len, "layers": cfg.num_layers,
             "dim": cfg.inner_dim, "heads": cfg.num_attention_heads}
    return Case(f"dit-step {model}", shape, build, est_bytes=_build.step_bytes(cfg, ctx, latent))


def cases(ctx: Context) -> list[Case]:
    _build.require_cogvideox("transformer", "config")
    return [_case(m, ctx) for m in ctx.models]


def notes(ctx: Context) -> list[str]:
    lines = ["MFU = (GEMM + attention FLOPs of the step) / time / measured matmul TFLOP/s (the % of ceiling column)."]
    if ctx.device.type != "cuda":
        lines.append("CPU run: tiny preset (latents 3x8x12); the 2B / 5B steps at 480x720x49 need a GPU.")
    return lines


SUITE = Suite("model", "one DiT forward step, ours (kernels + compile) vs diffusers eager / compiled, MFU",
              cases, notes)
