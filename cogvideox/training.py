"""Training utilities as plain functions: the v-prediction losses, timestep sampling, and one training step.

The noise table is `cogvideox.scheduler.alphas_cumprod(snr_shift)` (abar_t, t = 0..T-1, T = 1000). With noise
eps ~ N(0, I), clean latents x0 and x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (`scheduler.add_noise`), the
model predicts the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (`scheduler.v_target`). Two losses:

- `cogvideox_loss` (what CogVideoX's released fine-tuning optimizes: diffusers' examples/cogvideo/
  train_cogvideox_lora.py and CogVideo's finetune/ trainer, which both call the scheduler's
  `get_velocity(model_output, noisy_latents, t)`): the prediction is turned into x0 with the velocity formula
      x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat
  and the loss is  mean_b [ mean_elements( w_t (x0_hat - x0)^2 ) ],  w_t = 1 / (1 - abar_t).
  Since x0_hat - x0 = -sqrt(1 - abar_t) (v_hat - v), this equals mean_b mean (v_hat - v)^2: the weighted x0 loss
  and the plain v-MSE are the same number up to rounding; the weight exactly undoes the x0 error's sqrt(1 - abar_t)
  scale. (At t with abar_t = 1 the weight would be infinite; the zero-terminal-SNR table has abar_0 < 1.)
- `v_mse_loss`: mean (v_hat - v)^2, the textbook v-prediction loss (Salimans & Ho 2022, arXiv 2202.00512).

Both compute in fp32 whatever the prediction's dtype (bf16 squares of small differences lose bits).

Timesteps: `uniform_timesteps` (diffusers' example: torch.randint(0, T)), and `explicit_uniform_timesteps`, the
paper's Explicit Uniform Sampling (arXiv 2408.06072 §3.3 / §4, Fig. 10d): [1, T] is divided into n intervals, one
per data-parallel rank, and each rank draws uniformly inside its own interval, so every step covers the whole
range once across ranks and the loss curve fluctuates less.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import scheduler


def _check_t(t: torch.Tensor, table: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"t must be an int64 tensor of timesteps, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.shape != (batch,):
        raise ValueError(f"t must be (B={batch},), got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= table.numel()):
        raise ValueError(f"t must lie in [0, {table.numel() - 1}], got [{int(t.min())}, {int(t.max())}]")
    return t


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def x0_from_v(table: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v: the scheduler's get_velocity(v, x_t, t), computed in fp32."""
    a = table.to(device=x_t.device, dtype=torch.float32)[t.to(x_t.device)]
    return _per_sample(a.sqrt(), x_t) * x_t.float() - _per_sample((1 - a).sqrt(), x_t) * v.float()


def cogvideox_loss(table: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """CogVideoX's fine-tuning loss (module docstring): the prediction pred (B, ...) as x0 via the velocity
    formula, weighted by 1 / (1 - abar_t), MSE against the clean latents x0; mean per sample, then over the batch.
    -> fp32 scalar."""
    _check_same("pred", pred, "x0", x0)
    _check_same("x_t", x_t, "x0", x0)
    t = _check_t(t, table, x0.shape[0])
    a = table.to(device=x0.device, dtype=torch.float32)[t.to(x0.device)]
    weight = _per_sample(1 / (1 - a), x0)
    err = weight * (x0_from_v(table, x_t, pred, t) - x0.float()) ** 2
    return err.reshape(x0.shape[0], -1).mean(dim=1).mean()


def v_mse_loss(table: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
    """mean (pred - v)^2 with v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (fp32). -> fp32 scalar."""
    _check_same("pred", pred, "x0", x0)
    _check_same("noise", noise, "x0", x0)
    t = _check_t(t, table, x0.shape[0])
    v = scheduler.v_target(table.float(), x0.float(), noise.float(), t)
    return (pred.float() - v).pow(2).mean()


def _check_same(name, t, ref_name, ref):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")


LOSSES = {"cogvideox": cogvideox_loss, "v-mse": v_mse_loss}


# ---- timesteps ---------------------------------------------------------------------------------------------

def uniform_timesteps(batch: int, generator: torch.Generator | None = None,
                      num_train_timesteps: int = scheduler.NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """(batch,) int64 on the CPU, uniform over 0..T-1 (diffusers' example: torch.randint(0, T, (B,)))."""
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator)


def timestep_interval(rank: int, world_size: int, num_train_timesteps: int = scheduler.NUM_TRAIN_TIMESTEPS):
    """Rank `rank`'s interval [lo, hi) of the 0-based timesteps 0..T-1 (the paper's [1, T]) under Explicit Uniform
    Sampling: floor(r T / n) .. floor((r + 1) T / n); the n intervals tile 0..T-1 exactly."""
    if not isinstance(world_size, int) or not 1 <= world_size <= num_train_timesteps:
        raise ValueError(f"world_size must be an int in [1, {num_train_timesteps}], got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    return rank * num_train_timesteps // world_size, (rank + 1) * num_train_timesteps // world_size


def explicit_uniform_timesteps(batch: int, rank: int, world_size: int, generator: torch.Generator | None = None,
                               num_train_timesteps: int = scheduler.NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The paper's Explicit Uniform Sampling (§3.3): (batch,) int64 on the CPU, uniform in this rank's interval
    `timestep_interval(rank, world_size)`. world_size 1 is plain uniform sampling over 0..T-1."""
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    lo, hi = timestep_interval(rank, world_size, num_train_timesteps)
    return torch.randint(lo, hi, (batch,), generator=generator)


# ---- one step ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepResult:
    loss: float                  # the step's loss (fp32) before the update
    grad_norm: float | None      # total gradient norm before clipping (None when max_grad_norm is None)
    timesteps: torch.Tensor      # (B,) the timesteps drawn


def train_step(model, batch: dict, optimizer: torch.optim.Optimizer, table: torch.Tensor, *,
               generator: torch.Generator | None = None,
               sample_timesteps: Callable[[int, torch.Generator | None], torch.Tensor] = uniform_timesteps,
               loss: str = "cogvideox", max_grad_norm: float | None = None,
               autocast_dtype: torch.dtype | None = None) -> StepResult:
    """One optimizer step of text-to-video fine-tuning on precomputed latents.

    batch: {"latents": (B, F, C, h, w) clean latents already multiplied by the VAE's scaling_factor,
            "prompt_embeds": (B, L, D) T5 embeddings}, in the model's dtype and device; for image-to-video
            models also "image_latents" (B, F, C, h, w) (`image_condition`) and, for 1.5-I2V, "ofs" (1,). Packed
            (multi-resolution frame packing): "latents", "prompt_embeds" (and "image_latents") lists of
            (F_i, C, h_i, w_i) / (L_i, D) per video: one packed sequence through the model, the loss the mean of
            the videos' losses.
    generator: a CPU generator for the timesteps and the noise (a saved generator state resumes bit-exactly).
    sample_timesteps(B, generator=g) -> (B,) int64: `uniform_timesteps`, or e.g.
        functools.partial(explicit_uniform_timesteps, rank=r, world_size=n) under data parallelism.
    autocast_dtype: run the forward under torch.autocast in this dtype (mixed precision with fp32 weights).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    x0, text = batch["latents"], batch["prompt_embeds"]
    packed = isinstance(x0, (list, tuple))
    videos = [v[None] for v in x0] if packed else [x0]         # each packed video as a batch of one
    device = videos[0].device
    t = sample_timesteps(len(videos) if packed else x0.shape[0], generator=generator).to(device)     # (B,)
    ts = list(t.split(1)) if packed else [t]
    noise = [scheduler.randn(v.shape, generator, device, v.dtype) for v in videos]   # (B, F, C, h, w)
    x_t = [scheduler.add_noise(table, v, e, tt) for v, e, tt in zip(videos, noise, ts)]
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    cond = batch.get("image_latents")          # I2V: from image_condition, concatenated on channels as inference
    conds = [None] * len(videos) if cond is None else [c[None] for c in cond] if packed else [cond]
    inputs = [xt if c is None else torch.cat([xt, c], dim=2) for xt, c in zip(x_t, conds)]   # (B, F, C_in, h, w)
    extra = {"ofs": batch["ofs"]} if "ofs" in batch else {}
    with amp:
        pred = ([p[None] for p in model([x[0] for x in inputs], list(text), t, **extra)] if packed
                else [model(inputs[0], text, t, **extra)])                             # (B, F, C, h, w) each
    # packed: the mean of the videos' losses (for videos of one shape, the loss of the unpacked batch)
    losses = [cogvideox_loss(table, p, v, xt, tt) if loss == "cogvideox" else v_mse_loss(table, p, v, e, tt)
              for p, v, xt, e, tt in zip(pred, videos, x_t, noise, ts)]
    value = torch.stack(losses).mean()
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    norm = None
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # a DTensor under FSDP2
    optimizer.step()
    return StepResult(float(value.detach()), norm, t.cpu())


# ---- LoRA --------------------------------------------------------------------------------------------------

# Our Linear names for CogVideoX's LoRA targets (its finetune code and diffusers' example adapt to_q, to_k, to_v,
# to_out.0): here q, k, v are one fused Linear, so one rank-r adapter covers all three (diffusers: three rank-r).
LORA_TARGETS = ("to_qkv", "to_out")


def add_lora(model, rank: int = 128, alpha: float | None = None, targets=LORA_TARGETS):
    """In place: peft LoRA adapters (optional package `peft`, the `train` extra) on the Linear layers whose name
    ends in one of `targets`; every other parameter is frozen. rank 128, alpha = rank by default (CogVideoX's
    finetune: rank 128, alpha 64). The adapters' B starts at zero, so the output is unchanged. Returns model."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError(f"add_lora needs peft (pip install peft, or the 'train' extra): {e}") from None
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=True,
                        target_modules=list(targets))
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)      # adapters are created trainable
    return model


def lora_state(model) -> dict:
    """The adapters' tensors only (peft's lora_A / lora_B keys): what a LoRA checkpoint needs besides the base."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def merged_state(model) -> dict:
    """The model's state dict with every LoRA adapter merged into its base weight (W + scale B A) and peft's key
    prefixes removed: the keys and shapes of the plain model, ready for export.save_transformer."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)   # (out, in)
            out[f"{name}.weight"] = module.base_layer.weight.detach() + delta.to(module.base_layer.weight.dtype)
            if module.base_layer.bias is not None:
                out[f"{name}.bias"] = module.base_layer.bias.detach()
    for k, v in model.state_dict().items():
        if ".lora_" in k or ".base_layer." in k:
            continue
        out[k] = v
    return out


# ---- progressive resolution and buckets ---------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage of progressive training: `steps` optimizer steps on videos of at most height x width pixels and
    `frames` frames (4k + 1), `batch_size` videos per step (the global batch)."""
    steps: int
    height: int
    width: int
    frames: int
    batch_size: int

    def __post_init__(self):
        for name in ("steps", "height", "width", "frames", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Stage.{name} must be a positive int, got {value!r}")
        if (self.frames - 1) % 4:
            raise ValueError(f"Stage.frames must be 4k + 1 (the VAE's temporal compression), got {self.frames}")


def paper_stages(fps: int = 8) -> tuple[Stage, ...]:
    """The paper's progressive schedule (arXiv 2408.06072, appendix table "Training Stage"): max resolution
    256x384, 480x720, 768x1360, 768x1360 (high-quality fine-tuning); max duration 6, 6, 10, 10 s; batch 2000, 1000,
    250, 100; 400k, 220k, 120k, 10k steps. Durations become frames at `fps` (8: 49 and 81 frames, 4k + 1)."""
    def frames(seconds):
        return 4 * round(seconds * fps / 4) + 1

    return (Stage(400_000, 256, 384, frames(6), 2000), Stage(220_000, 480, 720, frames(6), 1000),
            Stage(120_000, 768, 1360, frames(10), 250), Stage(10_000, 768, 1360, frames(10), 100))


def stage_at(stages, step: int) -> tuple[int, Stage]:
    """(index, stage) that optimizer step `step` (0-based) belongs to; past the last stage, the last one."""
    if not stages:
        raise ValueError("stages must hold at least one Stage")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    end = 0
    for i, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return i, stage
    return len(stages) - 1, stages[-1]


def stage_size(height: int, width: int, stage: Stage, multiple: int = 16) -> tuple[int, int]:
    """A video's training size in `stage`: the aspect ratio kept, only the short side scaled (paper §3.3), to the
    stage's short side, then rounded down to `multiple` (VAE x8 and patch 2: 16) and capped at the stage's long
    side. -> (height, width)."""
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    short, long_ = min(stage.height, stage.width), max(stage.height, stage.width)
    scale = short / min(height, width)
    h, w = height * scale, width * scale
    cap = long_ / max(h, w)
    if cap < 1:
        h, w = h * cap, w * cap
    return max(multiple, int(h) // multiple * multiple), max(multiple, int(w) // multiple * multiple)


def bucket_batches(shapes, batch_size: int, generator: torch.Generator | None = None,
                   drop_last: bool = False) -> list[list[int]]:
    """One epoch of batches in which every sample has the same shape (a bucket per shape, e.g. (frames, h, w)):
    indices shuffled within each bucket, then the batches of all buckets shuffled together; every index appears
    once (drop_last drops each bucket's incomplete batch). Deterministic for a seeded generator."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    buckets: dict = {}
    for i, shape in enumerate(shapes):
        buckets.setdefault(tuple(shape), []).append(i)
    batches = []
    for key in sorted(buckets):
        members = buckets[key]
        order = torch.randperm(len(members), generator=generator).tolist()
        members = [members[j] for j in order]
        for a in range(0, len(members), batch_size):
            batch = members[a:a + batch_size]
            if len(batch) == batch_size or not drop_last:
                batches.append(batch)
    return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]


# ---- image-to-video conditioning and LoRA under FSDP -----------------------------------------------------------
def image_condition(first: torch.Tensor, frames: int, drop: torch.Tensor | None = None) -> torch.Tensor:
    """The I2V model's second input half, as inference builds it (pipeline.image_latents): the first frame's latent
    (already scaled like the video latents), then zeros for the other frames. first: (B, 1, C, h, w); drop: (B,)
    bool, samples whose image is replaced by zeros (diffusers' --noised_image_dropout). -> (B, frames, C, h, w)."""
    if not isinstance(first, torch.Tensor) or first.dim() != 5 or first.shape[1] != 1:
        raise ValueError(f"first must be a (B, 1, C, h, w) tensor, got {getattr(first, 'shape', type(first))}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if drop is not None:
        if drop.shape != (first.shape[0],) or drop.dtype != torch.bool:
            raise ValueError(f"drop must be a (B={first.shape[0]},) bool tensor, got {drop.dtype} {tuple(drop.shape)}")
        first = torch.where(drop.to(first.device)[:, None, None, None, None], torch.zeros_like(first), first)
    pad = first.new_zeros((first.shape[0], frames - 1, *first.shape[2:]))
    return torch.cat([first, pad], dim=1)


def merged_state_from(model, state: dict) -> dict:
    """`merged_state` computed from a full (unsharded) state dict of the LoRA model, e.g. FSDP2's gathered
    get_model_state_dict: W + scale B A per adapted Linear, peft's prefixes removed. The model supplies only the
    adapted layers' names and scales (plain floats, the same on every rank), so it may be sharded."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            weight = state[f"{name}.base_layer.weight"]                                      # (out, in)
            delta = sum((state[f"{name}.lora_B.{a}.weight"] @ state[f"{name}.lora_A.{a}.weight"]) * module.scaling[a]
                        for a in module.active_adapters)
            out[f"{name}.weight"] = weight + delta.to(weight.dtype)
            if f"{name}.base_layer.bias" in state:
                out[f"{name}.bias"] = state[f"{name}.base_layer.bias"]
    for k, v in state.items():
        if ".lora_" not in k and ".base_layer." not in k:
            out[k] = v
    return out
