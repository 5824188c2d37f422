"""Samplers against diffusers 0.42.1 CogVideoXDDIMScheduler / CogVideoXDPMScheduler: bit-exact, same generator."""
import math

import pytest
import torch

from cogvideox import scheduler as S

diffusers = pytest.importorskip("diffusers", reason="diffusers (the test extra) is the oracle")
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler  # noqa: E402

# The released scheduler config (kijai configs/scheduler_config_{2b,5b}.json), shift varied per test.
CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
              steps_offset=0, timestep_spacing="trailing")


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_table_matches_diffusers(shift):
    ref = CogVideoXDDIMScheduler(**CONFIG, snr_shift_scale=shift).alphas_cumprod
    ours = S.alphas_cumprod(shift)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, ref)
    assert ours[-1].item() == 0.0
    # spot values quoted in the reference doc (section 5.1)
    expect = {3.0: (0.997454, 0.095970, 2.719e-5), 1.0: (0.99915, 0.242359, 8.579e-5)}[shift]
    for i, e in zip((0, 499, 979), expect):
        assert math.isclose(ours[i].item(), e, rel_tol=2e-4), (i, ours[i].item(), e)


def test_timesteps_match_diffusers():
    sched = CogVideoXDDIMScheduler(**CONFIG)
    for n in list(range(1, 61)) + [99, 250, 333, 999, 1000]:
        sched.set_timesteps(n)
        assert torch.equal(S.timesteps(n), sched.timesteps), n
    assert S.timesteps(50)[:3].tolist() == [999, 979, 959] and S.timesteps(50)[-1].item() == 19
    for bad in (0, -1, 1001, 2.5, True):
        with pytest.raises(ValueError):
            S.timesteps(bad)


def _latents(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 6, 5, generator=g).to(dtype)


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddim_every_step_matches(shift, dtype):
    n = 7  # does not divide 1000: the stride formula's quirk is reproduced too
    ref = CogVideoXDDIMScheduler(**CONFIG, snr_shift_scale=shift)
    ref.set_timesteps(n)
    table = S.alphas_cumprod(shift)
    x_ref = x = _latents(dtype, 0)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))  # fp32, as after CFG
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x = S.ddim_step(table, v, int(t), x, n)
        assert x.dtype == x_ref.dtype == torch.float32  # fp32 model output promotes x0 and x_prev
        assert torch.equal(x, x_ref), f"step {i} t={int(t)}"
        x_ref, x = x_ref.to(dtype), x.to(dtype)  # the pipeline re-rounds latents every step


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpm_every_step_matches(shift, dtype):
    n = 6
    ref = CogVideoXDPMScheduler(**CONFIG, snr_shift_scale=shift)
    ref.set_timesteps(n)
    table = S.alphas_cumprod(shift)
    ts = S.timesteps(n)
    g_ref, g = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_ref = x = _latents(dtype, 1)
    old_ref = old = None
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(200 + i))
        x_ref, old_ref = ref.step(v, old_ref, t, ref.timesteps[i - 1] if i else None, x_ref, generator=g_ref,
                                  return_dict=False)
        x, old = S.dpm_step(table, v, old, int(ts[i]), int(ts[i - 1]) if i else None, x, n, generator=g)
        assert torch.isfinite(x).all()
        assert torch.equal(x, x_ref) and torch.equal(old, old_ref), f"step {i} t={int(t)}"
        x_ref, x = x_ref.to(dtype), x.to(dtype)
    # both generators consumed the same number of draws
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=g_ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_and_v_target_match(dtype):
    ref = CogVideoXDDIMScheduler(**CONFIG, snr_shift_scale=1.0)
    table = S.alphas_cumprod(1.0)
    x0, noise = _latents(dtype, 2), _latents(dtype, 3)
    t = torch.tensor([0, 999], dtype=torch.int64)
    assert torch.equal(S.add_noise(table, x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(S.v_target(table, x0, noise, t), ref.get_velocity(x0, noise, t))
    # v-prediction identity in fp64: x0 = sqrt(a) x_t - sqrt(1 - a) v
    x0d, nd = x0.double(), noise.double()
    xt, v = S.add_noise(table, x0d, nd, t), S.v_target(table, x0d, nd, t)
    a = table[t].reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0d, rtol=0, atol=1e-12)


def test_dynamic_cfg_matches_pipeline_formula():
    n, s = 50, 6.0
    got = [S.dynamic_cfg_scale(s, int(t), n) for t in S.timesteps(n)]
    # diffusers pipeline_cogvideox.py, use_dynamic_cfg branch, written out with t.item() as it does
    ref = [1 + s * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2) for t in S.timesteps(n)]
    assert got == ref
    # the oscillating values quoted in the reference doc (section 5.4)
    assert [round(g, 2) for g in got[:8]] == [2.29, 2.54, 6.97, 6.42, 2.79, 4.27, 1.04, 4.17]


def test_randn_device_rule_on_cuda(monkeypatch):
    """diffusers' randn_tensor on CUDA (mocked): a CPU generator draws on the CPU and the noise is moved; a CUDA
    generator for a CPU tensor is an error; a generator on the target's device type draws there."""
    class Drawn:
        def __init__(self, device):
            self.device, self.moved = torch.device(device), None

        def to(self, device):
            self.moved = torch.device(device)
            return self

    monkeypatch.setattr(torch, "randn", lambda shape, generator=None, device=None, dtype=None: Drawn(device))
    out = S.randn((2, 3), torch.Generator(), "cuda", torch.bfloat16)
    assert out.device == torch.device("cpu") and out.moved == torch.device("cuda")
    cuda_gen = type("G", (), {"device": torch.device("cuda", 0)})()
    assert S.randn((2,), cuda_gen, "cuda:0", torch.float32).device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="generator"):
        S.randn((2,), cuda_gen, "cpu", torch.float32)
