"""Text-to-video and image-to-video sampling: prompt -> T5 embeddings -> CFG sampler loop -> VAE decode -> file.

Mirrors diffusers 0.42.1 `CogVideoXPipeline` / `CogVideoXImageToVideoPipeline` (reference doc sections 2.8, 5.4,
6.10-6.11) so that the same noise and embeddings give the same latents:
- latents (B, F, C, h, w), frames before channels, drawn with `torch.randn` directly in the model dtype from a
  (CPU) generator; for I2V the image latent is sampled (`latent_dist.sample(generator)`) before the noise draw;
- CFG batched as [negative | positive], `v = u + g (c - u)` in fp32, g optionally the dynamic ("wave-like") scale;
- latents re-rounded to the model dtype after every step;
- 1.5 (patch_size_t = 2) generates one extra latent frame when the count is odd and drops the FIRST latent
  frame(s) before decoding.

The model objects are duck-typed: `transformer(latents, text, timestep, ofs=None)` with a `.config` holding the
diffusers config fields (our `CogVideoXTransformer` and `TransformerConfig`), and a VAE with `encode(video)` (a
distribution with `.sample(generator)`) and `decode(latents)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import struct
import zlib
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import scheduler as S

try:  # the progress bar is optional (tqdm comes with transformers / huggingface_hub, not with torch)
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

SAMPLERS = ("ddim", "dpm")


# ---- text --------------------------------------------------------------------------------------------------
def encode_prompt(text_encoder, tokenizer, prompts: Sequence[str], max_length: int = 226, device=None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """T5 embeddings as diffusers' `_get_t5_prompt_embeds`: padding to max_length, truncation, EOS appended, and
    NO attention mask (the pad positions' outputs are real inputs of the transformer). -> (B, max_length, d_model)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r}")
    device = device if device is not None else text_encoder.device
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = text_encoder(ids.to(device))[0]
    return embeds.to(dtype=dtype or text_encoder.dtype, device=device)


def load_text_encoder(model_dir: str, dtype: torch.dtype, device):
    """transformers' T5EncoderModel and tokenizer from `model_dir/text_encoder` and `model_dir/tokenizer`,
    strictly offline (local_files_only): nothing is ever downloaded."""
    from transformers import AutoTokenizer, T5EncoderModel

    for sub in ("text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(model_dir, sub)):
            raise FileNotFoundError(f"{model_dir}: no {sub}/ directory (needed to encode --prompt; "
                                    f"or pass --prompt-embeds FILE)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"), local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(os.path.join(model_dir, "text_encoder"), dtype=dtype,
                                                 local_files_only=True)
    except (OSError, ValueError, ImportError) as e:   # ImportError: e.g. a spiece.model needing sentencepiece
        raise FileNotFoundError(f"{model_dir}: cannot load the T5 text encoder / tokenizer: {e}") from None
    # .to(dtype) too: transformers releases before `dtype=` existed would have loaded fp32
    return encoder.to(device=device, dtype=dtype).eval(), tokenizer


# ---- latents -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VaeFactors:
    spatial: int = 8            # 2 ** (len(block_out_channels) - 1)
    temporal: int = 4           # temporal_compression_ratio
    scaling_factor: float = 0.7   # 2B: 1.15258426
    invert_scale_latents: bool = False   # 1.5: the I2V image latent is scaled by 1/scaling_factor


def latent_frames(num_frames: int, cfg, vae: VaeFactors) -> tuple[int, int]:
    """(latent frames to generate, extra frames dropped from the front before decoding) for a video length."""
    f = (num_frames - 1) // vae.temporal + 1
    pt = cfg.patch_size_t
    extra = (pt - f % pt) if pt and f % pt else 0
    return f + extra, extra


def prepare_image(image, height: int, width: int) -> torch.Tensor:
    """diffusers' VideoProcessor.preprocess for one image: PIL -> resize (W, H) Lanczos -> [0, 1] -> [-1, 1].
    image: a PIL image, or a float tensor (3, H, W) / (1, 3, H, W) in [0, 1] already at the target size.
    -> (1, 3, H, W) float32."""
    if isinstance(image, torch.Tensor):
        x = image if image.dim() == 4 else image[None]
        if x.shape[1] != 3 or tuple(x.shape[-2:]) != (height, width):
            raise ValueError(f"image tensor must be (1, 3, {height}, {width}) in [0, 1], got {tuple(x.shape)}")
        return x.float() * 2.0 - 1.0
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a tensor, got {type(image).__name__}")
    # RGB conversion is ours (diffusers would pass 4 channels of an RGBA PNG on to the VAE and fail).
    image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
    x = torch.from_numpy(np.array(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def image_latents(vae, image: torch.Tensor, frames: int, cfg, factors: VaeFactors, dtype, device,
                  generator) -> torch.Tensor:
    """I2V conditioning (B, F, C, h, w): the sampled, scaled image latent, then zeros for the other frames.
    image: (B, 3, H, W) in [-1, 1]. Consumes the generator (one `sample` per image) before the noise draw."""
    image = image.to(device=device, dtype=dtype)[:, :, None]                   # (B, 3, 1, H, W)
    with torch.no_grad():
        lat = torch.cat([vae.encode(img[None]).sample(generator) for img in image])  # (B, C, 1, h, w)
    lat = lat.to(dtype).permute(0, 2, 1, 3, 4)                                  # (B, 1, C, h, w)
    # "forgot to multiply the scaling factor during training" (diffusers): 1.5 divides instead of multiplying
    lat = (1 / factors.scaling_factor * lat) if factors.invert_scale_latents else (factors.scaling_factor * lat)
    pad = torch.zeros((lat.shape[0], frames - 1, *lat.shape[2:]), device=device, dtype=dtype)
    lat = torch.cat([lat, pad], dim=1)                                          # (B, F, C, h, w)
    if cfg.patch_size_t:  # diffusers' odd-count rule; a no-op because `frames` is already padded to p_t
        lat = torch.cat([lat[:, : lat.shape[1] % cfg.patch_size_t], lat], dim=1)
    return lat


# ---- the sampler loop --------------------------------------------------------------------------------------
def check_number(name: str, value, minimum: float | None = None, strict: bool = False) -> float:
    """A finite real number (not a bool, NaN or inf) >= minimum (> minimum when strict); else ValueError naming it.
    inf guidance gives NaN frames and NaN guidance silently turns CFG off (NaN > 1 is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def denoise(model: Callable, latents: torch.Tensor, prompt_embeds: torch.Tensor, *, steps: int,
            guidance_scale: float = 6.0, use_dynamic_cfg: bool = False, sampler: str = "ddim",
            snr_shift_scale: float = 1.0, generator: torch.Generator | None = None,
            image_latents: torch.Tensor | None = None, ofs: torch.Tensor | None = None,
            progress: bool = True, parallel=None) -> torch.Tensor:
    """Run the sampler from noise `latents` (B, F, C, h, w). prompt_embeds: (2B, L, D) = [negative | positive]
    when guidance_scale > 1 (classifier-free guidance, batched), else (B, L, D). Returns latents in their dtype.

    parallel: a `cogvideox.parallel.ParallelMesh`. Every rank runs this same loop on the same latents (the same
    generator draws); the model splits each step's sequence over the mesh's sequence group, and with cfg=2 the
    unconditional half of the guided batch runs on cfg rank 0 and the conditional half on cfg rank 1, combined by
    one all-gather per step (`parallel.cfg_combine`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    check_number("guidance_scale", guidance_scale, 0.0)
    cfg = guidance_scale > 1.0
    split_cfg = parallel is not None and parallel.settings.cfg == 2
    if split_cfg and not cfg:
        raise ValueError("CFG-parallel (cfg=2) needs classifier-free guidance (guidance_scale > 1)")
    table, ts = S.alphas_cumprod(snr_shift_scale), S.timesteps(steps)
    dtype, old_x0 = latents.dtype, None
    steps_iter = ts.tolist()
    if progress and tqdm is not None:
        steps_iter = tqdm(steps_iter, desc=f"{sampler} sampling")
    text = prompt_embeds.chunk(2)[parallel.cfg_rank] if split_cfg else prompt_embeds   # this rank's half
    kwargs = {"parallel": parallel} if parallel is not None else {}
    copies = 2 if cfg and not split_cfg else 1                                 # the batched CFG halves
    for i, t in enumerate(steps_iter):
        x = torch.cat([latents] * copies) if copies > 1 else latents           # (2B or B, F, C, h, w)
        if image_latents is not None:
            img = torch.cat([image_latents] * copies) if copies > 1 else image_latents
            x = torch.cat([x, img], dim=2)                                      # [noisy | image] on channels
        timestep = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        with torch.no_grad():
            v = model(x, text, timestep, ofs=ofs, **kwargs).float()
        if split_cfg:
            from .parallel import cfg_combine

            v = cfg_combine(v, parallel)                                        # (2B, ...) = [uncond | cond]
        if cfg:
            g = S.dynamic_cfg_scale(guidance_scale, t, steps) if use_dynamic_cfg else guidance_scale
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + g * (v_text - v_uncond)
        if sampler == "ddim":
            latents = S.ddim_step(table, v, t, latents, steps)
        else:
            latents, old_x0 = S.dpm_step(table, v, old_x0, t, int(ts[i - 1]) if i else None, latents, steps,
                                         generator)
        latents = latents.to(dtype)
    return latents


@dataclasses.dataclass
class Generated:
    latents: torch.Tensor            # (B, F, C, h, w) as sampled (before the 1.5 front frame is dropped)
    dropped_frames: int              # latent frames to drop from the front before decoding (1.5 padding)
    video: torch.Tensor | None = None   # (B, 3, T, H, W) in [-1, 1] when a VAE was given


def generate(transformer, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None, *,
             num_frames: int, height: int, width: int, steps: int = 50, guidance_scale: float = 6.0,
             use_dynamic_cfg: bool = False, sampler: str = "ddim", snr_shift_scale: float = 1.0,
             generator: torch.Generator | None = None, vae=None, factors: VaeFactors = VaeFactors(),
             image=None, decode: bool = True, progress: bool = True, parallel=None) -> Generated:
    """Sample a video. prompt_embeds (B, L, D) in the model dtype; negative_prompt_embeds the same shape, required
    when guidance_scale > 1 (diffusers encodes "" for it). image: (B, 3, H, W) in [-1, 1] for I2V models.
    parallel: a `cogvideox.parallel.ParallelMesh` (every rank calls generate with the same arguments; see
    `denoise`); the VAE decodes on the mesh's first `vae` ranks, and `video` is None on every rank but 0."""
    cfg = transformer.config
    i2v = image is not None
    check_number("guidance_scale", guidance_scale, 0.0)
    check_number("snr_shift_scale", snr_shift_scale, 0.0, strict=True)
    for name, t in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 3 or 0 in t.shape):
            raise ValueError(f"{name} must be a (B, L, D) tensor with B, L, D > 0, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if (cfg.in_channels == 2 * cfg.out_channels) != i2v:
        raise ValueError("an image is required by (and only by) image-to-video models (in_channels = 2 x out)")
    if guidance_scale > 1.0:
        if negative_prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds shaped like prompt_embeds")
        text = torch.cat([negative_prompt_embeds, prompt_embeds])              # (2B, L, D)
    else:
        text = prompt_embeds
    check_size(num_frames, height, width, cfg, factors)
    device, dtype, B = prompt_embeds.device, prompt_embeds.dtype, prompt_embeds.shape[0]
    frames, extra = latent_frames(num_frames, cfg, factors)
    h, w = height // factors.spatial, width // factors.spatial
    channels = cfg.in_channels // 2 if i2v else cfg.in_channels
    cond = None
    if i2v:
        if vae is None:
            raise ValueError("image-to-video needs a VAE to encode the image")
        cond = image_latents(vae, image, frames, cfg, factors, dtype, device, generator)
    latents = S.randn((B, frames, channels, h, w), generator, device, dtype)  # after the image sample, as diffusers
    ofs = torch.full((1,), 2.0, device=device, dtype=dtype) if cfg.ofs_embed_dim else None   # 1.5-I2V
    latents = denoise(transformer, latents, text, steps=steps, guidance_scale=guidance_scale,
                      use_dynamic_cfg=use_dynamic_cfg, sampler=sampler, snr_shift_scale=snr_shift_scale,
                      generator=generator, image_latents=cond, ofs=ofs, progress=progress, parallel=parallel)
    out = Generated(latents, extra)
    if vae is not None and decode:
        out.video = decode_latents(vae, latents[:, extra:], factors, parallel)
    return out


def check_size(num_frames: int, height: int, width: int, cfg, factors: VaeFactors) -> None:
    step = factors.spatial * cfg.patch_size
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % step:
            raise ValueError(f"{name} must be a positive multiple of {step} (VAE x{factors.spatial}, patch "
                             f"{cfg.patch_size}), got {v!r}")
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % factors.temporal:
        raise ValueError(f"frames must be 1 + a multiple of {factors.temporal} (the VAE's temporal compression), "
                         f"e.g. 49 or 81, got {num_frames!r}")


def decode_latents(vae, latents: torch.Tensor, factors: VaeFactors, parallel=None) -> torch.Tensor | None:
    """(B, F, C, h, w) -> video (B, 3, T, H, W) in [-1, 1], as diffusers' decode_latents (1 / sf * latents).
    parallel: decode across the mesh's VAE ranks (its `vae` degree; vae=1: rank 0 alone); the video lands on rank 0,
    None on the other ranks."""
    z = 1 / factors.scaling_factor * latents.permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        if parallel is None:
            return vae.decode(z)
        return vae.decode(z, parallel=parallel, everywhere=False)


# ---- output ------------------------------------------------------------------------------------------------
def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8, as diffusers' postprocess:
    (x / 2 + 0.5).clamp(0, 1), then x 255 and round."""
    x = (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
    """A minimal 8-bit RGB PNG writer (stdlib zlib), used when Pillow is not installed."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))               # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _have(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def output_target(out: str) -> tuple[str, bool]:
    """(what save_frames writes for `out`, whether it is a folder): the mp4 itself when imageio + imageio-ffmpeg
    are installed, else a folder of PNG frames (`out` itself, or `<out without .mp4>_frames`)."""
    if out.lower().endswith(".mp4"):
        return (out, False) if _have("imageio", "imageio_ffmpeg") else (out[:-4] + "_frames", True)
    return out, True


_FRAME_NAME = "frame_{:04d}.png"


def check_output(path: str, folder: bool) -> None:
    """Fail before any work when `path` (a file, or a frame folder when `folder`) cannot be written: a parent that
    is a regular file, a folder we cannot create files in, a file where a folder goes (or the reverse), or an
    existing folder holding anything but frames (it is replaced whole). Creates nothing that stays."""
    import tempfile

    path = os.path.abspath(path)
    wrong_kind = os.path.exists(path) and os.path.isdir(path) != folder
    if wrong_kind:
        raise ValueError(f"{path} exists and is a {'file' if folder else 'folder'}, not a "
                         f"{'folder' if folder else 'file'}")
    if folder and os.path.isdir(path):
        others = [f for f in os.listdir(path) if not (f.startswith("frame_") and f.endswith(".png"))]
        if others:
            raise ValueError(f"{path} is a folder holding other files than frames ({', '.join(sorted(others)[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); it would be replaced: choose another path")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: {parent} is a file, not a folder")
    try:   # os.access says yes to root even on a read-only file system: try it
        fd, probe = tempfile.mkstemp(prefix=".cogvideox-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{path}: cannot write in {parent} ({e.strerror or e})") from None


@contextlib.contextmanager
def atomic_output(path: str, folder: bool = False):
    """Yields a temporary path beside `path` (same folder, same extension) to write into; when the block completes
    it is renamed to `path` (replacing a previous file or frame folder), and if the block fails it is removed.
    A crash, a full disk or Ctrl-C never leaves half a video under the real name."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    root, ext = os.path.splitext(name) if not folder else (name, "")
    tmp = os.path.join(parent, f".{root}.partial-{os.getpid()}{ext}")
    old = os.path.join(parent, f".{root}.old-{os.getpid()}")
    if folder:
        os.makedirs(tmp)
    try:
        yield tmp
        if folder and os.path.isdir(path):   # a previous frame folder (check_output allows only frames in it)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(path):   # the previous folder goes back where it was
            os.rename(old, path)
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_frames(frames: np.ndarray, out: str, fps: int = 8) -> list[str]:
    """frames (T, H, W, 3) uint8. `out` ending in .mp4 -> an mp4 when imageio + imageio-ffmpeg are installed;
    otherwise (or for any other `out`) PNG frames in a directory: `out` itself, or `<out without .mp4>_frames`.
    Written under a temporary name and renamed into place when complete. Returns the written paths."""
    check_number("fps", fps, 0.0, strict=True)
    target, folder = output_target(out)
    check_output(target, folder)
    if not folder:
        import imageio

        with atomic_output(target) as tmp:
            with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8) as writer:   # as export_to_video
                for frame in frames:
                    writer.append_data(frame)
        return [target]
    names = [_FRAME_NAME.format(i) for i in range(len(frames))]
    with atomic_output(target, folder=True) as tmp:
        if _have("PIL"):
            from PIL import Image

            for n, fr in zip(names, frames):
                Image.fromarray(fr).save(os.path.join(tmp, n))
        else:
            for n, fr in zip(names, frames):
                write_png(os.path.join(tmp, n), fr)
    return [os.path.join(target, n) for n in names]


# ---- loading a diffusers-format model directory ------------------------------------------------------------
# The released scheduler configs (reference doc section 1): only the SNR shift differs between families.
_SCHEDULER_FIXED = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "beta_schedule": "scaled_linear",
                    "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000, "set_alpha_to_one": True,
                    "timestep_spacing": "trailing", "steps_offset": 0}


def read_scheduler_config(model_dir: str) -> float:
    """snr_shift_scale from `model_dir/scheduler/scheduler_config.json`, after checking every other field has
    the value our samplers implement."""
    from .weights import CheckpointError, read_json

    path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir}: no scheduler/scheduler_config.json")
    cfg = read_json(path, "a scheduler config")
    bad = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in _SCHEDULER_FIXED.items() if k in cfg and cfg[k] != v]
    if bad:
        raise ValueError(f"{path}: unsupported scheduler settings: {'; '.join(bad)}")
    try:   # Python's json reads NaN and Infinity
        return check_number("snr_shift_scale", cfg.get("snr_shift_scale", 3.0), 0.0, strict=True)   # diffusers: 3.0
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def vae_factors(cfg) -> VaeFactors:
    """VaeFactors from a VAE config: a diffusers config.json dict or our VAEConfig (diffusers' defaults)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
    return VaeFactors(spatial=2 ** (len(get("block_out_channels", (128, 256, 256, 512))) - 1),
                      temporal=int(get("temporal_compression_ratio", 4)),
                      scaling_factor=float(get("scaling_factor", 1.15258426)),
                      invert_scale_latents=bool(get("invert_scale_latents", False)))


def read_vae_factors(vae_dir: str) -> VaeFactors:
    """The factors of a VAE directory's config.json, after the same checks load_vae makes (CheckpointError)."""
    from .config import VAEConfig
    from .weights import parse_config, read_config

    return vae_factors(parse_config(vae_dir, read_config(vae_dir), VAEConfig.from_diffusers_config))


@dataclasses.dataclass
class Models:
    transformer: torch.nn.Module
    vae: Optional[torch.nn.Module]
    factors: VaeFactors
    snr_shift_scale: float
    model_dir: Optional[str] = None   # where the T5 text encoder is loaded from, on demand


def check_model_dir(model_dir: str, need_text_encoder: bool) -> None:
    """Fail before any work when a model directory lacks a part that will be needed."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir}: not a directory")
    needed = {"transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"}
    if need_text_encoder:
        needed |= {"text_encoder/config.json", "tokenizer"}
    missing = sorted(p for p in needed if not os.path.exists(os.path.join(model_dir, p)))
    if missing:
        raise FileNotFoundError(f"--model {model_dir}: missing {', '.join(missing)} (a diffusers-format CogVideoX "
                                f"directory is expected; nothing is downloaded)")


def load_models(model_dir: str, dtype: torch.dtype, device, use_kernels: bool | None = None) -> Models:
    """Our transformer and VAE from a diffusers-format directory (transformer/, vae/, scheduler/)."""
    from .weights import load_transformer

    check_model_dir(model_dir, need_text_encoder=False)
    snr = read_scheduler_config(model_dir)
    factors = read_vae_factors(os.path.join(model_dir, "vae"))
    transformer = load_transformer(os.path.join(model_dir, "transformer"), dtype=dtype, device=device,
                                   use_kernels=use_kernels)
    vae = None
    try:
        from .vae import load_vae
    except ImportError:  # the VAE module is optional for sampling: latents are saved instead of a video
        load_vae = None
    if load_vae is not None:
        vae = load_vae(os.path.join(model_dir, "vae"), dtype=dtype, device=device)
    return Models(transformer, vae, factors, snr, model_dir)
