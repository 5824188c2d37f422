"""vae_parallel: the VAE decode split over processes (CogVideoXVAE.decode(parallel=)), against one process, with a
cost model that predicts the split time from one process's per-layer times and a link bandwidth.

    torchrun --nproc-per-node N -m bench vae_parallel
    python -m bench vae_parallel                          # one process: its rows and the predictions for 2, 4, 8
Under torchrun every rank runs the suite and rank 0 prints and writes (bench/cli.py).

Cases: decode of 13 latents at 480x720 and of 21 at 768x1360, B = 1, random weights (on a CPU: the tiny preset at
small sizes, gloo). Variants: "1 process" (this rank decodes the whole video alone) and "split N" (the decode split
over the N ranks, the layout chosen by split_layout; every rank gets the whole video). Time and peak memory are
per rank (rank 0's row; every rank's bytes sent and, on CUDA, peak memory are in the split row's extras). Row
extras: layout, bytes sent, the link bandwidth used, "predicted_ms" (the cost model), the predicted scaling
efficiency (one-process time / (N x split time)); the printed row ends with "predicted ... ms".

Cost model (`predict`). Input: a one-process profile (`profile_decode`: per chunk, the time of every causal conv
and upsampler and that layer's input shape). Ranks run in lock-step rounds (chunk i on temporal rank i % t); a rank
with rows split over s ranks does its largest share of every layer (rows split in latent rows, so the same share at
every level). Each round costs the slowest chunk's compute plus, per layer, latency + halo bytes / bandwidth
(temporal: the k_t - 1 = 2 frames of the layer's input; spatial: one row above and one below of the time-padded
input; upsamplers: one row each way). Then the all-gather of the video: (N - 1) / N of its bytes over the link.
Not modelled: overlap of transfers with compute (there is none: each exchange is waited for), GroupNorm statistic
messages (a few hundred bytes each, latency only: counted), kernel-launch effects of smaller layers. The
bandwidth is measured in the run (a rank 0 <-> 1 ping-pong) under torchrun, else BENCH_LINK_GBPS (default 100:
a rough NVLink-class point-to-point figure, not a measurement).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from ..runner import Case, Context, Suite, SuiteSkipped, Variant
from . import _build
from . import vae as vae_suite

# name -> (latent shape (B, C, F, h, w) full, small)
JOBS = {
    "decode 480x720 13 latents": ((1, 16, 13, 60, 90), (1, 16, 5, 4, 6)),
    "decode 768x1360 21 latents": ((1, 16, 21, 96, 170), (1, 16, 9, 4, 6)),
}
DEFAULT_GBPS, LATENCY_S = 100.0, 20e-6
STATS_BYTES = 32 * 3 * 8      # one rank's GroupNorm statistics per sample: (G = 32, 3) fp64


@dataclass
class Profile:
    """One process's decode, layer by layer. chunks[i]: [(seconds, kind, shape (B, C, T, H, W))] in order, kind
    "conv" (a causal conv with k > 1, its norm included; its input's shape) or "up" (an upsampler; its output's
    shape); rest_s[i]: the chunk's
    other time (pointwise convs, shortcuts, adds). rows: latent rows; out_bytes: the video's size."""
    chunks: list
    rest_s: list
    rows: int
    out_bytes: int
    item: int


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_decode(vae, z: torch.Tensor) -> Profile:
    """Time every causal conv (k > 1) and upsampler of one untiled decode of z, per chunk (forward hooks)."""
    from cogvideox.vae import CausalConv3d, Upsample3D
    chunks, rest, marks = [], [], {}
    device = z.device

    def chunk_start(module, args):
        _sync(device)
        chunks.append([])
        rest.append(-time.perf_counter())

    def pre(module, args):
        _sync(device)
        marks[module] = (time.perf_counter(), tuple(args[0].shape))

    def post(module, args, out):
        _sync(device)
        t0, shape = marks.pop(module)
        up = isinstance(module, Upsample3D)             # an upsampler's halo is taken on its output's rows
        chunks[-1].append((time.perf_counter() - t0, "up" if up else "conv", tuple(out.shape) if up else shape))

    def chunk_end(module, args, out):
        _sync(device)
        rest[-1] += time.perf_counter() - sum(t for t, _, _ in chunks[-1])

    handles = [vae.decoder.register_forward_pre_hook(chunk_start), vae.decoder.register_forward_hook(chunk_end)]
    for m in vae.decoder.modules():
        if isinstance(m, Upsample3D) or (isinstance(m, CausalConv3d) and m.kernel_size > 1):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            out = vae.decode(z, tiling=False)
    finally:
        for h in handles:
            h.remove()
    return Profile(chunks, rest, z.shape[3], out.numel() * out.element_size(), z.element_size())


def predict(profile: Profile, layout: tuple, gbps: float, latency_s: float = LATENCY_S) -> dict:
    """The split decode's time per the cost model (module docstring) -> {"seconds", "compute_s", "comm_s",
    "sent_bytes" (by the busiest rank), "one_process_s"}."""
    from cogvideox.parallel import shard_sizes
    t, s = layout
    n, bw = t * s, gbps * 1e9
    share = max(shard_sizes(profile.rows, s)) / profile.rows
    compute = comm = sent = 0.0
    for k in range(0, len(profile.chunks), t):
        chunk_ids = range(k, min(k + t, len(profile.chunks)))
        compute += max((sum(sec for sec, _, _ in profile.chunks[i]) + profile.rest_s[i]) * share for i in chunk_ids)
        round_comm = round_sent = 0.0
        for layer in zip(*(profile.chunks[i] for i in chunk_ids)):      # layer j of every chunk in the round
            b = 0.0
            for _, kind, (B, C, T, H, W) in layer:
                halo = 0.0
                if kind == "conv" and t > 1:     # the last 2 input frames of this rank's rows, to the next chunk
                    halo += 2 * B * C * math.ceil(H * share) * W * profile.item
                if s > 1 and kind == "conv":     # a row up and a row down of the time-padded input; statistics
                    halo += 2 * B * C * (T + 2) * W * profile.item + (s - 1) * B * STATS_BYTES
                elif s > 1:                      # upsampler (its output shape): a row up and a row down
                    halo += 2 * B * C * T * W * profile.item
                b = max(b, halo)
            if b:
                round_comm += latency_s + b / bw
                round_sent += b
        comm += round_comm
        sent += round_sent
    gather = profile.out_bytes * (n - 1) / n / bw
    one = sum(sum(sec for sec, _, _ in c) + r for c, r in zip(profile.chunks, profile.rest_s))
    return {"seconds": compute + comm + gather, "compute_s": compute, "comm_s": comm + gather,
            "sent_bytes": sent, "one_process_s": one}


_STATE = {}


def _mesh():
    """The process group torchrun describes (every rank in the VAE group), built once; None without torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if "pm" not in _STATE:
        from cogvideox import parallel as cp
        world = int(os.environ["WORLD_SIZE"])
        _STATE["pm"] = cp.init_parallel(cp.Parallel(ulysses=world, vae=world))
    return _STATE["pm"]


def link_gbps(pm, device, nbytes: int) -> float:
    """Point-to-point bandwidth rank 0 <-> rank 1 (ping-pong, best of 3, one way), in GB/s; every rank joins."""
    import torch.distributed as dist
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    best = math.inf
    for _ in range(3):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        if pm.rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif pm.rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 2)
    times = [None] * dist.get_world_size()
    dist.all_gather_object(times, best)
    return nbytes / times[0] / 1e9


def _case(name: str, ctx: Context) -> Case:
    full, small = JOBS[name]
    cfg = _build.vae_config(ctx)
    shape = full if ctx.full else (small[0], cfg.latent_channels, *small[2:])   # the tiny preset's latent channels
    pm = _mesh()
    n = 1 if pm is None else pm.settings.vae

    def build() -> list[Variant]:
        vae_mod, = _build.require_cogvideox("vae")
        g = torch.Generator(device=ctx.device).manual_seed(0)
        z = torch.randn(*shape, generator=g, device=ctx.device, dtype=ctx.dtype)
        with _build.on_device(ctx):
            vae = vae_mod.CogVideoXVAE(cfg, use_kernels=None)
        vae = vae.to(device=ctx.device, dtype=ctx.dtype).eval().requires_grad_(False)
        state = {}
        env = float(os.environ.get("BENCH_LINK_GBPS", DEFAULT_GBPS))
        gbps = env if pm is None or "BENCH_LINK_GBPS" in os.environ else link_gbps(
            pm, ctx.device, (64 << 20) if ctx.full else (4 << 20))

        def one():
            state["profile"] = profile_decode(vae, z)

            def run():
                with torch.no_grad():
                    return vae.decode(z, tiling=False)
            return run

        def one_extra():
            prof = state["profile"]
            # predicted_ms: the model for one process, i.e. the profile's sum (a check of the profile itself)
            out = {"ranks": 1, "link_gbps": gbps, "link_measured": pm is not None and "BENCH_LINK_GBPS" not in
                   os.environ, "predicted_ms": predict(prof, (1, 1), gbps)["seconds"] * 1e3}
            out["summary"] = f"predicted {out['predicted_ms']:.3f} ms (the profile's sum)"
            for k in (2, 4, 8):   # what the model predicts for k ranks from this one process's profile
                layout = vae.split_layout("decode", z.shape, k)[0]
                p = predict(prof, layout, gbps)
                out[f"predicted_{k}_ranks"] = {"ms": p["seconds"] * 1e3, "layout": list(layout),
                                               "sent_bytes": p["sent_bytes"],
                                               "efficiency": p["one_process_s"] / (k * p["seconds"])}
                if pm is None or pm.rank == 0:
                    print(f"[vae_parallel]   predicted {k} ranks (layout {layout[0]}x{layout[1]}, link {gbps:.3g} "
                          f"GB/s): {p['seconds'] * 1e3:.3f} ms, efficiency "
                          f"{p['one_process_s'] / (k * p['seconds']):.2f}, {p['sent_bytes'] / 2 ** 20:.2f} MiB sent",
                          flush=True)
            return out

        def split():
            def run():
                with torch.no_grad():
                    return vae.decode(z, parallel=pm)
            return run

        def split_extra():
            import torch.distributed as dist
            layout = vae.last_split.temporal, vae.last_split.spatial
            p = predict(state["profile"], layout, gbps)
            mine = (vae.last_split.sent, torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda"
                    else None)
            every = [None] * n
            dist.all_gather_object(every, mine)                      # every rank runs collect: same calls
            return {"ranks": n, "layout": list(layout), "sent_bytes": vae.last_split.sent, "link_gbps": gbps,
                    "sent_bytes_per_rank": [e[0] for e in every], "peak_mem_bytes_per_rank": [e[1] for e in every],
                    "predicted_ms": p["seconds"] * 1e3, "predicted_sent_bytes": p["sent_bytes"],
                    "predicted_efficiency": p["one_process_s"] / (n * p["seconds"]),
                    "summary": f"predicted {p['seconds'] * 1e3:.3f} ms (layout {layout[0]}x{layout[1]}, link "
                               f"{gbps:.3g} GB/s, efficiency {p['one_process_s'] / (n * p['seconds']):.2f}), "
                               f"rank 0 sent {vae.last_split.sent / 2 ** 20:.2f} MiB"}

        # Fixed repetitions (never the time budget): every rank must call the split decode equally often.
        common = dict(pass_="decode", min_reps=3, max_reps=3, warmup=1) if ctx.full else dict(
            pass_="decode", min_reps=2, max_reps=2, warmup=0)
        variants = [Variant("1 process", one, backend="kernels" if ctx.device.type == "cuda" else "references (CPU)",
                            collect=one_extra, **common)]
        if pm is not None:
            backend = "nccl" if ctx.device.type == "cuda" else "gloo"
            variants.append(Variant(f"split {n}", split, backend=f"{n} ranks, {backend}", collect=split_extra,
                                    **common))
        return variants

    item = torch.tensor([], dtype=ctx.dtype).element_size()
    est = 16 * cfg.block_out_channels[0] * min(9, 4 * shape[2] - 3) * shape[3] * shape[4] * 64 * item
    # named by the shape that runs (JOBS' keys name the full shapes)
    return Case(f"vae_parallel {vae_suite._name('decode', shape, cfg.spatial_compression)}",
                {"input": list(shape), "ranks": n}, build, est_bytes=est)


def cases(ctx: Context) -> list[Case]:
    _build.require_cogvideox("vae", "config", "parallel")
    if ctx.device.type == "cuda" and _mesh() is not None and ctx.device.index != int(os.environ.get("LOCAL_RANK", "0")):
        raise SuiteSkipped(f"this rank runs on {ctx.device}, not cuda:LOCAL_RANK")
    return [_case(name, ctx) for name in JOBS]


def notes(ctx: Context) -> list[str]:
    out = ["multi-GPU times are predictions (cost model in bench/suites/vae_parallel.py) unless run under torchrun "
           "on GPUs"]
    if ctx.device.type != "cuda":
        out.append("CPU run: tiny VAE preset at small sizes; under torchrun the ranks are gloo processes sharing "
                   "this machine's cores, so split times say nothing about GPUs")
    return out


SUITE = Suite("vae_parallel", "VAE decode split over torchrun ranks vs one process, with predicted N-GPU times",
              cases, notes)
