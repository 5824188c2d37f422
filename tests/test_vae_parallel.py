"""The VAE split over processes (CogVideoXVAE.split_run) against one process, in real gloo process groups on CPU.

Every worker builds the same tiny VAE (same seed, weights perturbed so GroupNorm's ones and zeros hide nothing) and
the same inputs, runs the one-process untiled encode / decode, then the split one, and compares on every rank.
- Temporal-only layouts run exactly the arithmetic of one process (the same per-chunk statistics, the halo is the
  cache), so they must match bit for bit.
- Layouts that merge GroupNorm statistics over ranks (rows split, or whole-video statistics) sum in another order:
  fp32, relative error (max |diff| / max |ref|) <= 1e-5. Measured (CPU, fp32, these shapes): up to 1.8e-6, the size
  of one process's own fp32 error against its fp64 run (1.1e-6 on the tiny encode of 17 frames).
Backward (training under the split): encode's and decode's input gradient and every parameter's (summed over the
ranks) equal one process's, temporal, spatial and both.
Shapes are tiny and odd (latent rows 3, columns 5; rows that do not divide by the degree), many cases per spawn;
the one-process results are computed once, in the test process, and handed to the workers.
"""
import pytest
import torch

from cogvideox import parallel as cp
from cogvideox.config import VAEConfig
from cogvideox.vae import CogVideoXVAE
from distributed import run_workers

TOL = 1e-5
LATENT = VAEConfig.preset("tiny").latent_channels


def _vae(seed=0):
    torch.manual_seed(seed)
    vae = CogVideoXVAE(VAEConfig.preset("tiny")).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def _input(kind, B, T, h, w, seed=1):
    shape = (B, LATENT, T, h, w) if kind == "decode" else (B, 3, T, 8 * h, 8 * w)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return (a.double() - b.double()).abs().max().item() / b.double().abs().max().item()


def _run(vae, kind, x, **kwargs):
    if kind == "decode":
        return vae.decode(x, **kwargs)
    out = vae.encode(x, **kwargs)
    return None if out is None else torch.cat([out.mean, out.logvar], dim=1)


@torch.no_grad()
def _reference(case):
    kind, B, T, h, w, _, exact, _ = case
    return _run(_vae(), kind, _input(kind, B, T, h, w), tiling=False, exact_groupnorm=exact)


def _forward_case(vae, pm, case, ref):
    """case: (kind, B, T, h, w, layout, exact, bit_exact) -> asserts the split output equals one process's, ref."""
    kind, B, T, h, w, layout, exact, bit_exact = case
    x = _input(kind, B, T, h, w)
    out = _run(vae, kind, x, parallel=pm, layout=layout, exact_groupnorm=exact)
    assert out.shape == ref.shape, f"{case}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = _rel(out, ref)
    if bit_exact:
        assert torch.equal(out, ref), f"{case}: not bit-exact, relative error {err:.2e}"
    assert err <= TOL, f"{case}: relative error {err:.2e} > {TOL}"
    return vae.last_split


def _grads(vae, kind, T, h, w, pm=None, layout=None):
    """encode's or decode's forward with autograd and its backward: {"out": the output (posterior mean | logvar,
    or video), "input": dL/dinput, parameter name: dL/dparameter} for the encoder's or decoder's parameters, L a
    random projection of the output; split over pm's ranks (parameter gradients summed over them) when pm is
    given."""
    vae.train()
    vae.zero_grad(set_to_none=True)
    x = _input(kind, 1, T, h, w).requires_grad_(True)
    split = {} if pm is None else {"parallel": pm, "layout": layout}
    if kind == "encode":
        post = vae.encode(x, tiling=False, **split)
        out = torch.cat([post.mean, post.logvar], dim=1)
    else:
        out = vae.decode(x, tiling=False, **split)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
    cp.reduce_vae_gradients(vae.parameters(), pm)
    vae.eval()
    net = vae.encoder if kind == "encode" else vae.decoder
    return {"out": out.detach(), "input": x.grad, **{k: p.grad for k, p in net.named_parameters()}}


def _backward_case(vae, pm, case, ref):
    """Backward under the split: the input's gradient (whole on every rank) and every parameter's (summed over the
    VAE group) equal one process's, ref. case: (kind, layout, frames, latent rows, latent columns)."""
    kind, layout, T, h, w = case
    got = _grads(vae, kind, T, h, w, pm, layout)
    bad = {k: _rel(got[k], r) for k, r in ref.items() if not _rel(got[k], r) <= TOL}
    assert not bad, f"{kind} backward, layout {layout}, {T} frames: relative errors above {TOL}: {bad}"


def _worker(rank, world, forward_cases, backward_cases, checks):
    pm = cp.init_parallel(cp.Parallel(ulysses=world, vae=world))
    vae = _vae()
    with torch.no_grad():                       # inference, as the pipeline runs it
        for case, ref in forward_cases:
            _forward_case(vae, pm, case, ref)
        for check in checks:
            globals()[check](rank, world, vae, pm)
    for case, ref in backward_cases:
        _backward_case(vae, pm, case, ref)


def _spawn(world, forward_cases, backward_cases, checks):
    """One spawn of `world` ranks for every case; the one-process results are computed here, once, on one thread
    like the workers (a different thread count may block the convolutions differently: not the same bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forward = [(c, _reference(c)) for c in forward_cases]
        backward = [(c, _grads(_vae(), c[0], *c[2:])) for c in backward_cases]
    finally:
        torch.set_num_threads(threads)
    run_workers(_worker, world, forward, backward, checks)


# ---- errors and the no-op ------------------------------------------------------------------------------------------
def _check_errors(rank, world, vae, pm):
    z = _input("decode", 1, 5, 3, 5)
    with pytest.raises(ValueError, match="spatial ranks, but the frame has only 1 latent rows"):
        vae.decode(_input("decode", 1, 1, 1, 4), parallel=pm)          # one latent frame, one row: nothing to split
    with pytest.raises(ValueError, match="2 temporal ranks, but decode of 3 frames splits into at most 1"):
        vae.decode(_input("decode", 1, 3, 2, 2), parallel=pm, layout=(2, 1))
    with pytest.raises(ValueError, match="does not match the 2 VAE ranks"):
        vae.decode(z, parallel=pm, layout=(2, 2))
    with pytest.raises(ValueError, match="layout must be"):
        vae.decode(z, parallel=pm, layout=(2.0, 1))
    with pytest.raises(ValueError, match="tiling=True cannot be combined"):
        vae.decode(z, parallel=pm, tiling=True)
    with pytest.raises(TypeError, match="parallel must be a ParallelMesh"):
        vae.decode(z, parallel="ulysses=2")
    # ranks that disagree fail on every rank with a message instead of hanging
    mismatched = _input("decode", 1, 5, 3, 5 + rank)
    with pytest.raises(cp.ParallelError, match="VAE ranks disagree"):
        vae.decode(mismatched, parallel=pm)
    with pytest.raises(cp.ParallelError, match="VAE ranks disagree"):
        vae.decode(z, parallel=pm, exact_groupnorm=rank == 0)
    # only rank 0 gets the video when asked
    out, ref = vae.decode(z, parallel=pm, everywhere=False), vae.decode(z, tiling=False)
    if rank == 0:
        assert torch.equal(out, ref)
    else:
        assert out is None


def _check_broken_halo(rank, world, vae, pm):
    """Zeroed halos (the exchange sends zeros): the comparisons above must then fail, for both kinds of split."""
    real = cp.exchange

    def zeros(carrier, split, sends=(), recvs=()):
        return real(carrier, split, [(d, torch.zeros_like(t)) for d, t in sends], recvs)

    cp.exchange = zeros
    try:
        for case in [("decode", 1, 5, 3, 5, (2, 1), False, True), ("decode", 1, 5, 3, 5, (1, 2), False, False),
                     ("encode", 1, 17, 2, 3, (2, 1), False, True), ("encode", 1, 9, 3, 2, (1, 2), False, False)]:
            with pytest.raises(AssertionError):
                _forward_case(vae, pm, case, _reference(case))
    finally:
        cp.exchange = real


def _check_outside_group(rank, world, vae, pm):
    """vae=2 of 3 ranks: the third rank's call is a no-op returning None; the two others split and agree."""
    pm2 = cp.init_parallel(cp.Parallel(ulysses=world, vae=2))
    z = _input("decode", 1, 5, 3, 5)
    out = vae.decode(z, parallel=pm2)
    if rank < 2:
        assert torch.equal(out, vae.decode(z, tiling=False))
    else:
        assert out is None and vae.encode(_input("encode", 1, 9, 2, 2), parallel=pm2) is None


# ---- the spawns: many cases each ------------------------------------------------------------------------------------
# (kind, batch, frames, latent rows, latent columns, layout (temporal, spatial) or None = auto, exact_groupnorm,
#  bit-exact expected)
TWO = [
    ("decode", 1, 1, 3, 5, None, False, False),         # one latent frame: auto layout is spatial (1, 2)
    ("decode", 2, 3, 3, 5, None, False, False),         # one chunk, batch 2
    ("decode", 2, 5, 3, 5, (2, 1), False, True),        # chunks 3, 2 on two ranks
    ("decode", 1, 13, 2, 3, (2, 1), False, True),       # six chunks, three rounds
    ("decode", 1, 5, 3, 5, (1, 2), False, False),
    ("decode", 1, 5, 3, 5, (2, 1), True, False),        # whole-video statistics, spans 3 | 2
    ("decode", 1, 13, 3, 2, (1, 2), True, False),
    ("encode", 1, 1, 3, 2, None, False, False),
    ("encode", 1, 9, 3, 5, (1, 2), False, False),
    ("encode", 2, 17, 2, 3, (2, 1), False, True),
    ("encode", 1, 49, 1, 2, (2, 1), False, True),
    ("encode", 1, 17, 2, 2, (2, 1), True, False),       # spans 9 | 8
    ("encode", 1, 17, 3, 2, (1, 2), True, False),
]
THREE = [
    ("decode", 1, 13, 2, 3, (3, 1), False, True),       # six chunks, two rounds
    ("decode", 2, 5, 3, 5, None, False, False),         # two chunks on three ranks: auto layout is spatial (1, 3)
    ("decode", 1, 1, 4, 3, (1, 3), False, False),       # 4 rows on 3 ranks: 2, 1, 1
    ("decode", 1, 13, 2, 3, (3, 1), True, False),       # spans 5 | 4 | 4
    ("encode", 1, 49, 1, 2, (3, 1), False, True),
    ("encode", 1, 17, 3, 2, (1, 3), False, False),
    ("encode", 1, 49, 3, 1, (3, 1), True, False),
]
FOUR = [
    ("decode", 1, 13, 3, 5, (2, 2), False, False),      # temporal x spatial
    ("decode", 1, 13, 2, 3, (4, 1), False, True),       # six chunks on four ranks: two idle in the second round
    ("decode", 2, 5, 3, 5, None, False, False),         # two chunks: auto layout (2, 2)
    ("decode", 1, 1, 5, 3, (1, 4), False, False),
    ("decode", 1, 13, 3, 2, (2, 2), True, False),
    ("encode", 1, 17, 3, 2, (2, 2), False, False),
    ("encode", 1, 49, 1, 2, (4, 1), False, True),
    ("encode", 1, 49, 2, 2, (2, 2), True, False),
    ("encode", 2, 9, 5, 1, (1, 4), False, False),
]


def test_two_ranks():
    _spawn(2, TWO, [("encode", (2, 1), 17, 2, 2), ("encode", (1, 2), 9, 3, 2), ("decode", (2, 1), 5, 3, 5),
                    ("decode", (1, 2), 3, 3, 5)], ["_check_errors", "_check_broken_halo"])


def test_three_ranks():
    _spawn(3, THREE, [("encode", (1, 3), 9, 3, 2)], ["_check_outside_group"])


def test_four_ranks():
    _spawn(4, FOUR, [("encode", (2, 2), 17, 2, 2), ("decode", (2, 2), 5, 3, 5)], [])


def test_layout_rules():
    """split_layout on one process: auto layouts, exact_groupnorm spans, and the errors."""
    vae = CogVideoXVAE(VAEConfig.preset("tiny"))
    # 13 latents = chunks 3, 2, 2, 2, 2, 2: the largest temporal degree dividing 8 is 4, the rest splits rows
    assert vae.split_layout("decode", (1, LATENT, 13, 60, 90), 8)[:2] == ((4, 2), [(0, 3), (3, 5), (5, 7), (7, 9),
                                                                                (9, 11), (11, 13)])
    assert vae.split_layout("decode", (1, LATENT, 21, 96, 170), 8)[0] == (8, 1)
    assert vae.split_layout("decode", (1, LATENT, 1, 60, 90), 4)[0] == (1, 4)
    assert vae.split_layout("encode", (1, 3, 49, 480, 720), 4)[:2] == ((4, 1), [(0, 9), (9, 17), (17, 25), (25, 33),
                                                                                (33, 41), (41, 49)])
    assert vae.split_layout("decode", (1, LATENT, 13, 4, 4), 3, exact_groupnorm=True)[1] == [(0, 5), (5, 9), (9, 13)]
    assert vae.split_layout("encode", (1, 3, 49, 8, 8), 2, exact_groupnorm=True)[1] == [(0, 25), (25, 49)]
    with pytest.raises(ValueError, match="at most 6 temporal chunks"):
        vae.split_layout("decode", (1, LATENT, 13, 4, 4), 8, layout=(8, 1))
    with pytest.raises(ValueError, match="ranks must be a positive int"):
        vae.split_layout("decode", (1, LATENT, 13, 4, 4), 0)


# ---- the benchmark's cost model and the suite under two processes ---------------------------------------------------
def test_cost_model():
    """bench/suites/vae_parallel.predict on a hand-made profile: the documented formula, term by term."""
    from bench.suites.vae_parallel import LATENCY_S, STATS_BYTES, Profile, predict
    layer = (1.0, "conv", (1, 4, 2, 8, 8))                 # 1 s, input (B, C, T, H, W), fp32
    prof = Profile(chunks=[[layer], [layer], [layer]], rest_s=[0.5, 0.5, 0.5], rows=8, out_bytes=3000, item=4)
    bw = 1e9                                               # 1 GB/s
    one = predict(prof, (1, 1), 1.0)
    assert one["seconds"] == pytest.approx(4.5) and one["comm_s"] == 0 and one["one_process_s"] == pytest.approx(4.5)
    temporal_halo = 2 * 1 * 4 * 8 * 8 * 4                 # the last 2 frames of the conv input
    p = predict(prof, (3, 1), 1.0)                         # one round of three chunks
    assert p["compute_s"] == pytest.approx(1.5)
    assert p["comm_s"] == pytest.approx(LATENCY_S + temporal_halo / bw + 3000 * 2 / 3 / bw)
    p = predict(prof, (2, 1), 1.0)                         # rounds [0, 1], [2]
    assert p["compute_s"] == pytest.approx(3.0) and p["sent_bytes"] == 2 * temporal_halo
    spatial_halo = 2 * 1 * 4 * (2 + 2) * 8 * 4 + STATS_BYTES
    p = predict(prof, (1, 2), 1.0)                         # half the rows each, three rounds
    assert p["compute_s"] == pytest.approx(2.25)
    assert p["comm_s"] == pytest.approx(3 * (LATENCY_S + spatial_halo / bw) + 3000 / 2 / bw)
    p = predict(prof, (1, 3), 1.0)                         # 8 rows on 3 ranks: the busiest does 3 of 8
    assert p["compute_s"] == pytest.approx(3 * 1.5 * 3 / 8)


def test_profile_decode():
    """The profile of the tiny VAE: one entry per decode chunk, a time and shape per causal conv and upsampler."""
    from bench.suites.vae_parallel import predict, profile_decode
    from cogvideox.vae import CausalConv3d, Upsample3D
    vae = _vae()
    z = _input("decode", 1, 5, 2, 3)
    prof = profile_decode(vae, z)
    layers = sum(isinstance(m, Upsample3D) or (isinstance(m, CausalConv3d) and m.kernel_size > 1)
                 for m in vae.decoder.modules())
    assert len(prof.chunks) == 2 and all(len(c) == layers for c in prof.chunks)        # chunks of 3 and 2 latents
    assert prof.chunks[0][0][2] == (1, LATENT, 3, 2, 3) and prof.chunks[1][0][2] == (1, LATENT, 2, 2, 3)   # conv_in
    assert prof.out_bytes == 3 * 17 * 16 * 24 * 4 and prof.rows == 2
    assert all(t > 0 for c in prof.chunks for t, _, _ in c) and min(prof.rest_s) >= 0
    p = predict(prof, (2, 1), 10.0)
    assert 0 < p["compute_s"] < p["one_process_s"] and p["sent_bytes"] > 0


def _bench_worker(rank, world, out):
    from bench.cli import main
    # small size: the 480x720 job runs 5 latents of 4 x 6, so its row is "decode 32x48 5 latents"
    assert main(["vae_parallel", "--filter", "32x48 5", "--out", out, "--no-plots", "--budget", "0.01"]) == 0


def test_bench_suite_two_processes(tmp_path):
    """`python -m bench vae_parallel` as torchrun runs it, on 2 gloo processes: rows for one process and the split,
    each with its predicted time; rank 0 writes."""
    import json
    run_workers(_bench_worker, 2, str(tmp_path), timeout=300)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["case"] for r in rows} == {"vae_parallel decode 32x48 5 latents"}, rows
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"1 process", "split 2"}, by_impl.keys()
    assert all(r["status"] == "ok" and r["extra"]["predicted_ms"] > 0 and "predicted" in r["extra"]["summary"]
               for r in rows), rows
    split = by_impl["split 2"]["extra"]
    assert split["layout"] == [2, 1] and split["link_gbps"] > 0
    # chunks 3 | 2: rank 0 sends its halos, rank 1 (the last chunk) none; the model counts the busiest rank's
    assert split["sent_bytes_per_rank"] == [split["predicted_sent_bytes"], 0]
