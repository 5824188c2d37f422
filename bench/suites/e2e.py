"""e2e: the whole text-to-video pipeline (cogvideox.pipeline.generate), random weights, precomputed prompt
embeddings (T5 is not timed), CFG (transformer batch 2), 50 DDIM steps, then the VAE decode. 2B and 5B at
480x720x49 frames, and 768x1360 (41 frames, the paper's 5 s) when it fits. The time is split into transformer,
VAE and the rest (scheduler, CFG, casts), measured by timing the transformer's and the VAE's calls inside the
same run. Beside ours: the paper's Table 7 (H800) and the official repository's H100 times.
On a CPU: tiny presets, 3 steps, a 9-frame 32x48 video.
"""
from __future__ import annotations

import time

import torch

from .. import flops, paper
from ..harness import quantile, synchronize
from ..runner import Case, Context, Suite, Variant
from . import _build

# resolution -> (frames, height, width): Table 7's two settings; small: the tiny presets' size.
FULL = {"480x720x6s": (49, 480, 720), "768x1360x5s": (41, 768, 1360)}
SMALL = {"480x720x6s": (9, 32, 48)}
STEPS = {"full": 50, "small": 3}
SNR_SHIFT = {"2b": 3.0, "5b": 1.0}
SCALING = {"2b": 1.15258426, "5b": 0.7}


class _Timed:
    """Wraps a model so the time inside its calls is summed (device synchronized around each call: the calls
    are long, a step is hundreds of ms on a GPU, so the sync costs nothing measurable)."""

    def __init__(self, inner, device, method: str | None = None):
        self.inner, self.device, self.method, self.seconds = inner, device, method, 0.0
        self.config = getattr(inner, "config", None)

    def _timed(self, fn, *args, **kwargs):
        synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    def __call__(self, *args, **kwargs):
        return self._timed(self.inner, *args, **kwargs)

    def decode(self, *args, **kwargs):
        return self._timed(self.inner.decode, *args, **kwargs)


def _case(model: str, res: str, ctx: Context) -> Case:
    frames, height, width = (FULL if ctx.full else SMALL)[res]
    steps = STEPS[ctx.size]
    vcfg = _build.vae_config(ctx)
    # the pipeline needs the transformer's channels to be the VAE's latent channels (the presets agree; kept explicit)
    cfg = _build.transformer_config(model, ctx, in_channels=vcfg.latent_channels, out_channels=vcfg.latent_channels)
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    gpu = ctx.device.type == "cuda"
    compile_ = ctx.compile

    def build() -> list[Variant]:
        pipeline, = _build.require_cogvideox("pipeline")
        vae_mod, = _build.require_cogvideox("vae")
        calls = []   # (total, transformer, VAE) seconds of every timed generate() call

        def make():
            transformer = _build.ours_transformer(cfg, ctx, "3d", compile_=compile_)
            with _build.on_device(ctx):
                vae = vae_mod.CogVideoXVAE(vcfg, use_kernels=None)
            vae = vae.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)
            g = torch.Generator(device=ctx.device).manual_seed(0)
            pos, neg = (torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g, device=ctx.device,
                                    dtype=ctx.dtype) for _ in range(2))
            factors = pipeline.VaeFactors(spatial=vcfg.spatial_compression,
                                          temporal=vcfg.temporal_compression_ratio, scaling_factor=SCALING[model])

            def generate(n_steps):
                t, v = _Timed(transformer, ctx.device), _Timed(vae, ctx.device)
                synchronize(ctx.device)
                t0 = time.perf_counter()
                pipeline.generate(t, pos, neg, num_frames=frames, height=height, width=width, steps=n_steps,
                                  guidance_scale=6.0, sampler="ddim", snr_shift_scale=SNR_SHIFT[model],
                                  generator=torch.Generator().manual_seed(0), vae=v, factors=factors,
                                  progress=False)
                synchronize(ctx.device)
                calls.append((time.perf_counter() - t0, t.seconds, v.seconds))

            # Warm-up outside the timing: two steps compile the blocks and run the VAE once at this size.
            generate(min(2, steps))
            calls.clear()
            return lambda: generate(steps)

        def split() -> dict:
            """The split of the call whose total is the median, scaled to sum to the median: the row's time is a
            median, and one call's parts (the last call's, before) could exceed it (a VAE time above the total)."""
            timed = calls[1:] if len(calls) > 1 else calls   # measure(): the first call is the timing estimate
            median = quantile([c[0] for c in timed], 0.5)
            total, tr, va = min(timed, key=lambda c: abs(c[0] - median))
            k = median / total
            return {"transformer_s": tr * k, "vae_s": va * k, "scheduler_s": (total - tr - va) * k, "steps": steps}

        ref = paper.TABLE7.get((model, res)) if ctx.full else None
        work = (steps * flops.dit_step_flops(flops.DiTShape.from_config(cfg, 2, *latent), "3d")
                + flops.vae_flops(vcfg, "decode", (1, vcfg.latent_channels, *latent)))
        return [Variant("ours", make, pass_="generate", flops=work, warmup=0, min_reps=1, max_reps=1 if ctx.full else 2,
                        budget_s=1.0, backend=("kernels" if gpu else "references (CPU)")
                        + (" + compile_blocks" if compile_ else ", eager"),
                        collect=split,
                        extra={"model": model, "resolution": res, "frames": frames, "steps": steps},
                        paper=({"table7_h800_s": ref[0], "table7_h800_gb": ref[1],
                                "official_h100_s": paper.OFFICIAL_H100_SECONDS.get(model)
                                if res == "480x720x6s" else None} if ref else None))]

    est = _build.step_bytes(cfg, ctx, latent) + 216_000_000 * 2 + 10 * 128 * 9 * height * width * 2
    shape = {"frames": frames, "height": height, "width": width, "latent": list(latent), "steps": steps,
             "cfg_batch": 2}
    # at small size the name gives what ran (frames x height x width), not the resolution it stands for
    return Case(f"e2e {model} {res if ctx.full else f'{frames}x{height}x{width}'}", shape, build, est_bytes=est)


def cases(ctx: Context) -> list[Case]:
    _build.require_cogvideox("pipeline", "transformer", "vae", "config")
    return [_case(m, res, ctx) for res in (FULL if ctx.full else SMALL) for m in ctx.models]


def notes(ctx: Context) -> list[str]:
    lines = [f"Paper Table 7 ({paper.TABLE7_DEVICE}): "
             + ", ".join(f"{m} {r}: {s} s / {gb} GB" for (m, r), (s, gb) in paper.TABLE7.items())
             + f"; official H100 (480x720x49): 2B ~{paper.OFFICIAL_H100_SECONDS['2b']} s, "
               f"5B ~{paper.OFFICIAL_H100_SECONDS['5b']} s."]
    if ctx.device.type != "cuda":
        frames, h, w = SMALL["480x720x6s"]
        lines.append(f"CPU run: tiny presets, {STEPS['small']} steps, {frames} frames at {h}x{w}; the 50-step "
                     "480x720 / 768x1360 runs need a GPU.")
    return lines


SUITE = Suite("e2e", "the whole pipeline (50 steps + VAE), split into transformer / scheduler / VAE, vs Table 7",
              cases, notes)
