"""CogVideoX samplers as plain functions: the noise table, trailing timesteps, DDIM and DPM-Solver++(2M) steps,
training targets and the dynamic CFG scale.

Everything mirrors diffusers 0.42.1 `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler` as configured by the
released checkpoints (../shared/reference/diffusers-cogvideox.md section 5): scaled-linear betas in fp64, an SNR
shift (3.0 for 2B, 1.0 for 5B), the zero-terminal-SNR rescale (arXiv 2305.08891, Algorithm 1), "trailing"
timesteps and v-prediction. The dtype behaviour is reproduced on purpose (section 6.11): table values are 0-dim
fp64 tensors, which do not promote a bf16 latent (so `sqrt(a_t) * x_t` stays bf16, computed with the scalar in
fp32), while the fp32 model output makes x0 and x_prev fp32. The pipeline then rounds the latents back to its
dtype after every step.
"""
from __future__ import annotations

import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
# set_alpha_to_one=True: the step after the last one sees alpha_bar = 1. diffusers stores it as an fp32 0-dim
# tensor (torch.tensor(1.0)); kept so that the last step's mixed fp32/fp64 arithmetic is the same.
FINAL_ALPHA_CUMPROD = torch.tensor(1.0)
SNR_SHIFT = {"2b": 3.0, "5b": 1.0}  # the converter's comment: "2B 3.0, 5B 1.0"; 1.5 and I2V follow 5B


def alphas_cumprod(snr_shift_scale: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                   beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1, fp64 on CPU: scaled-linear betas, SNR shift, then zero-terminal-SNR rescale."""
    if isinstance(snr_shift_scale, bool) or not isinstance(snr_shift_scale, (int, float)) \
            or not math.isfinite(snr_shift_scale) or snr_shift_scale <= 0:   # NaN would pass `<= 0`
        raise ValueError(f"snr_shift_scale must be a finite number > 0, got {snr_shift_scale!r}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    # SNR shift: SNR_t -> SNR_t / s. Applied before the rescale, as diffusers does.
    abar = abar / (snr_shift_scale + (1 - snr_shift_scale) * abar)
    # Zero terminal SNR: shift and stretch sqrt(alpha_bar) so that alpha_bar[T-1] = 0 and alpha_bar[0] is kept.
    s = abar.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    return s**2


def timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """"trailing" spacing (arXiv 2305.08891 Table 2): round(arange(T, 0, -T/N)) - 1, int64.
    50 steps: 999, 979, ..., 19."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_train_timesteps}], got {num_steps!r}")
    # numpy on purpose: np.arange with a float step fills start + i * (second - first), which can differ by an ulp
    # from start + i * step and then round differently; diffusers uses exactly this expression.
    t = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1
    return torch.from_numpy(t)


def _prev_timestep(t: int, num_steps: int, num_train_timesteps: int) -> int:
    # diffusers' stride formula t - T // N; exact only when N divides T (diffusers PR #13125). Kept for parity.
    return t - num_train_timesteps // num_steps


def _abar(table: torch.Tensor, t: int) -> torch.Tensor:
    return table[t] if t >= 0 else FINAL_ALPHA_CUMPROD


def randn(shape, generator: torch.Generator | None, device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' `randn_tensor`: a CPU generator draws on the CPU (in `dtype`) and the result is moved."""
    device = torch.device(device)
    rand_device = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {generator.device} generator")
        rand_device = torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def ddim_step(table: torch.Tensor, v: torch.Tensor, t: int, x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0) from v-prediction v at timestep t; returns x_{t_prev}.

    table: `alphas_cumprod(...)`; v: model output (fp32 after CFG); x: latents (B, F, C, H, W).
    """
    t = int(t)
    a_t = table[t]
    a_prev = _abar(table, _prev_timestep(t, num_steps, table.numel()))
    x0 = (a_t**0.5) * x - ((1 - a_t) ** 0.5) * v  # v-prediction: x0 = sqrt(a) x - sqrt(1 - a) v
    a = ((1 - a_prev) / (1 - a_t)) ** 0.5
    b = a_prev**0.5 - a_t**0.5 * a
    return a * x + b * x0


def dpm_step(table: torch.Tensor, v: torch.Tensor, x0_old: torch.Tensor | None, t: int, t_back: int | None,
             x: torch.Tensor, num_steps: int, generator: torch.Generator | None = None):
    """One stochastic DPM-Solver++(2M) step (diffusers' CogVideoXDPMScheduler). Returns (x_prev, x0).

    x0_old: the previous step's x0 (None on the first step); t_back: the previous loop timestep (None first).
    Draws noise in x's dtype from `generator`: once on the first and last steps, twice otherwise (the first draw
    is discarded), exactly as diffusers does, so that runs sharing a generator stay in lockstep.
    """
    t = int(t)
    prev_t = _prev_timestep(t, num_steps, table.numel())
    a_t = table[t]
    a_prev = _abar(table, prev_t)
    x0 = (a_t**0.5) * x - ((1 - a_t) ** 0.5) * v

    def lam(a):  # half log-SNR
        return ((a / (1 - a)) ** 0.5).log()

    # At t = T-1, a_t = 0: lam = -inf, h = +inf, so m1 = 0 and the step is first order; no NaN arises.
    h = lam(a_prev) - lam(a_t)
    m1 = ((1 - a_prev) / (1 - a_t)) ** 0.5 * (-h).exp()
    m2 = (-2 * h).expm1() * a_prev**0.5
    sigma = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
    noise = randn(x.shape, generator, x.device, x.dtype)
    x_prev = m1 * x - m2 * x0 + sigma * noise
    if x0_old is None or t_back is None or prev_t < 0:
        return x_prev, x0
    r = (lam(a_t) - lam(table[int(t_back)])) / h
    m3, m4 = 1 + 1 / (2 * r), 1 / (2 * r)
    d = m3 * x0 - m4 * x0_old  # second-order multistep correction
    noise = randn(x.shape, generator, x.device, x.dtype)
    return m1 * x - m2 * d + sigma * noise, x0


def _per_sample(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor):
    # diffusers casts the table to the sample dtype before the square roots (add_noise / get_velocity).
    a = table.to(device=like.device, dtype=like.dtype)[t.to(like.device)].flatten()
    shape = (-1,) + (1,) * (like.dim() - 1)
    return (a**0.5).reshape(shape), ((1 - a) ** 0.5).reshape(shape)


def add_noise(table: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward diffusion for training: sqrt(a_t) x0 + sqrt(1 - a_t) noise; t (B,) int64, x0 (B, ...)."""
    sa, sb = _per_sample(table, t, x0)
    return sa * x0 + sb * noise


def v_target(table: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The v-prediction training target (diffusers' get_velocity(x0, noise, t)): sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    sa, sb = _per_sample(table, t, x0)
    return sa * noise - sb * x0


def dynamic_cfg_scale(guidance_scale: float, t: int, num_steps: int) -> float:
    """diffusers' use_dynamic_cfg: 1 + s (1 - cos(pi ((N - t) / N)^5)) / 2 with t the timestep VALUE (999..19),
    not the step index, which makes the scale oscillate ("wave-like", CogVideo #267). Kept as diffusers computes it."""
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    return 1 + guidance_scale * ((1 - math.cos(math.pi * ((num_steps - int(t)) / num_steps) ** 5.0)) / 2)
