"""attention: the paper's Table 8. For each resolution (256x384x6s = 13x16x24 = 4,992, 480x720x6s = 13x30x45 =
17,550, 768x1360x5s = 11x48x85 = 44,880 vision tokens, + 226 text) and the 2B and 5B configs at B = 2:

- one full DiT forward step of our transformer (kernels, blocks compiled on a GPU) with attention_layout "3d"
  and "2d+1d" (rows `step`), reported beside the paper's H800 seconds with the 3D / 2D+1D ratio;
- the attention op alone (cogvideox.attention.attention) for every backend of its registry, TFLOP/s at
  4 B H S^2 Dh: the 3d joint sequence, and the two 2d+1d stages (per-frame spatial, per-position temporal).
  Backends that cannot run here are reported as skipped with the registry's reason.
On a CPU: the tiny preset at three small grids.
"""
from __future__ import annotations

import torch

from .. import flops, paper
from ..runner import Case, Context, Suite, Variant
from . import _build

SMALL_LATENTS = {"256x384x6s": (3, 8, 12), "480x720x6s": (3, 12, 16), "768x1360x5s": (3, 16, 24)}


def _label(res: str, ctx: Context) -> str:
    """The shape a row's name gives: the paper's resolution at full size; at small size the latent grid that ran
    (a small row must not name a resolution it did not run)."""
    return res if ctx.full else "latent " + "x".join(map(str, SMALL_LATENTS[res]))


def _latent(res: str, ctx: Context) -> tuple[int, int, int]:
    if not ctx.full:
        return SMALL_LATENTS[res]
    frames, h, w = paper.TABLE8_SHAPES[res]
    return (frames - 1) // 4 + 1, h // 8, w // 8


def _step_case(model: str, layout: str, ctx: Context) -> Case:
    cfg = _build.transformer_config(model, ctx)
    compile_ = ctx.compile
    variants_spec = []
    for res in paper.TABLE8_SHAPES:
        latent = _latent(res, ctx)
        s = flops.DiTShape.from_config(cfg, _build.BATCH, *latent)
        variants_spec.append((res, latent, s))
    largest = max(variants_spec, key=lambda v: v[2].seq_len)[1]

    def build() -> list[Variant]:
        holder = {}

        def make_for(latent):
            def make():
                if "model" not in holder:
                    holder["model"] = _build.ours_transformer(cfg, ctx, layout, compile_=compile_)
                m = holder["model"]
                x, text, t = _build.step_inputs(cfg, ctx, latent)

                def step():
                    with torch.no_grad():
                        return m(x, text, t)
                return step
            return make

        return [Variant("ours", make_for(latent), pass_="step", label=_label(res, ctx),
                        flops=flops.dit_step_flops(s, layout),
                        backend=("kernels" if ctx.device.type == "cuda" else "references (CPU)")
                        + (" + compile_blocks" if compile_ else ", eager"),
                        budget_s=max(ctx.budget_s, 3.0) if ctx.full else None, min_reps=3,
                        max_reps=20, warmup=2 if compile_ else 1,
                        shape={"latent": list(latent), "seq_len": s.seq_len, "resolution": res},
                        extra={"resolution": res, "model": model, "layout": layout, "seq_len": s.seq_len},
                        paper={"table8_h800_s": paper.TABLE8_SECONDS[layout][res]} if ctx.full else None)
                for res, latent, s in variants_spec]

    shape = {"B": _build.BATCH, "layers": cfg.num_layers, "heads": cfg.num_attention_heads,
             "head_dim": cfg.attention_head_dim, "layout": layout}
    return Case(f"step {model} {layout}", shape, build,
                est_bytes=_build.step_bytes(cfg, ctx, largest, layout))


def _op_case(model: str, res: str, stage: str, ctx: Context) -> Case:
    """stage: "3d" (joint sequence), "2d+1d spatial" or "2d+1d temporal"."""
    cfg = _build.transformer_config(model, ctx)
    s = flops.DiTShape.from_config(cfg, _build.BATCH, *_latent(res, ctx))
    T, Hg, Wg = s.grid
    B, H, Dh = s.batch, s.heads, s.head_dim
    batch, seq = {"3d": (B, s.seq_len), "2d+1d spatial": (B * T, s.text_len + Hg * Wg),
                  "2d+1d temporal": (B * Hg * Wg, T)}[stage]
    item = torch.tensor([], dtype=ctx.dtype).element_size()
    qkv_bytes = 4 * batch * seq * H * Dh * item          # q, k, v, out

    def build() -> list[Variant]:
        attention, = _build.require_cogvideox("attention")
        g = torch.Generator(device=ctx.device).manual_seed(0)
        q, k, v = (torch.randn(batch, seq, H, Dh, generator=g, device=ctx.device, dtype=ctx.dtype) for _ in range(3))
        free = _free(ctx)
        out = []
        for name in attention.PREFERENCE:
            reason = attention.BACKENDS[name].unavailable(q.device, q.dtype, Dh)
            scores = batch * H * seq * seq * 4 * 2          # fp32 scores + probabilities, materialized
            if reason is None and name == "sdpa-math" and free is not None and scores > 0.8 * free:
                reason = f"the math backend materializes the S x S scores: about {scores / 2**30:.0f} GiB"

            def make(name=name):
                def run():
                    with torch.no_grad():
                        return attention.attention(q, k, v, backend=name)
                return run
            out.append(Variant(name, make, pass_="fwd", skip=reason, flops=flops.attention_flops(batch, H, seq, Dh),
                               backend=name, extra={"resolution": res, "model": model, "stage": stage}))
        return out

    shape = {"B": batch, "S": seq, "H": H, "Dh": Dh, "resolution": res}
    return Case(f"attention-op {model} {_label(res, ctx)} {stage}", shape, build, est_bytes=2 * qkv_bytes)


def _free(ctx: Context):
    from ..harness import free_device_memory
    return free_device_memory(ctx.device)


def cases(ctx: Context) -> list[Case]:
    _build.require_cogvideox("attention", "transformer", "config")
    out = []
    for model in ctx.models:
        for layout in ("3d", "2d+1d"):
            out.append(_step_case(model, layout, ctx))
    for model in ctx.models:
        for res in paper.TABLE8_SHAPES:
            for stage in ("3d", "2d+1d spatial", "2d+1d temporal"):
                out.append(_op_case(model, res, stage, ctx))
    return out


def notes(ctx: Context) -> list[str]:
    lines = [f"Paper Table 8: {paper.TABLE8_DEVICE}; 2D+1D {list(paper.TABLE8_SECONDS['2d+1d'].values())} s, "
             f"3D {list(paper.TABLE8_SECONDS['3d'].values())} s at {', '.join(paper.TABLE8_SHAPES)}."]
    if ctx.device.type != "cuda":
        lines.append("CPU run: tiny preset at small grids "
                     f"{', '.join('x'.join(map(str, v)) for v in SMALL_LATENTS.values())} (latent F x H x W), "
                     "the paper's shapes need a GPU.")
    return lines


SUITE = Suite("attention", "Table 8: DiT step with 3d vs 2d+1d attention, and every attention backend (TFLOP/s)",
              cases, notes)
