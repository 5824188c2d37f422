"""`python -m cogvideox generate`: text (or image) to video from a local diffusers-format CogVideoX directory.

    python -m cogvideox generate --model DIR --prompt "a cat on a beach" --out cat.mp4
    python -m cogvideox generate --preset tiny --random-init --prompt "anything" --out /tmp/t.mp4   # CPU smoke run

Nothing is ever downloaded: --model must hold transformer/, vae/, scheduler/ and (for --prompt) text_encoder/ and
tokenizer/. Every argument is checked before any weight is loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRESET_SHIFT = {"2b": 3.0, "tiny": 3.0}   # the SNR shift of the 2B scheduler; every 5B / 1.5 model uses 1.0


def build_parser() -> argparse.ArgumentParser:
    from .config import TRANSFORMER_PRESETS

    parser = argparse.ArgumentParser(prog="python -m cogvideox", description="CogVideoX text/image-to-video")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="sample a video", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = g.add_argument_group("model")
    src.add_argument("--model", metavar="DIR", help="diffusers-format CogVideoX directory (local only)")
    src.add_argument("--preset", choices=sorted(TRANSFORMER_PRESETS), help="a model config, with --random-init")
    src.add_argument("--random-init", action="store_true", help="random weights (smoke test; output is noise)")
    txt = g.add_argument_group("conditioning")
    txt.add_argument("--prompt", metavar="TEXT")
    txt.add_argument("--negative-prompt", metavar="TEXT", default="", help='CFG negative prompt (default "")')
    txt.add_argument("--prompt-embeds", metavar="FILE",
                     help="T5 embeddings instead of --prompt: .safetensors or .pt holding 'prompt_embeds' (B, L, D) "
                          "and optionally 'negative_prompt_embeds'")
    txt.add_argument("--image", metavar="FILE", help="first frame for image-to-video (I2V models)")
    run = g.add_argument_group("sampling")
    run.add_argument("--out", metavar="PATH", required=True,
                     help="PATH.mp4 (needs imageio + imageio-ffmpeg; else PNG frames in PATH_frames/) or a "
                          "directory for PNG frames")
    run.add_argument("--steps", type=int, default=50)
    run.add_argument("--guidance", type=float, default=6.0, help="CFG scale; <= 1 disables CFG (default 6)")
    run.add_argument("--dynamic-cfg", action="store_true", help="diffusers' use_dynamic_cfg schedule")
    run.add_argument("--sampler", choices=["ddim", "dpm"], default="ddim")
    run.add_argument("--frames", type=int, help="video frames, 4k + 1 (default: the model's, e.g. 49)")
    run.add_argument("--height", type=int, help="pixels, a multiple of 16 (default: the model's)")
    run.add_argument("--width", type=int, help="pixels, a multiple of 16 (default: the model's)")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    run.add_argument("--fps", type=int, help="mp4 frame rate (default 8; 16 for 1.5 models)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--save-latents", metavar="FILE",
                     help="also write the final latents (B, F, C, h, w), as decoded, to FILE (safetensors, key "
                          "'latents'), on one process and under torchrun alike")
    par = g.add_argument_group("parallelism (under torchrun)")
    par.add_argument("--parallel", metavar="SPEC",
                     help="context parallelism, e.g. ulysses=2,ring=2,cfg=2,vae=4 (omitted keys are 1; ulysses x "
                          "ring x cfg = the number of processes): torchrun --nproc-per-node N -m cogvideox generate "
                          "--parallel ... ; rank 0 writes the output")
    g.set_defaults(subparser=g)   # errors are reported with the subcommand's usage
    from .train_cli import add_parsers
    add_parsers(sub)              # train, encode-dataset
    return parser


def _fail(parser, msg):
    parser.error(msg)   # prints usage + message to stderr, exits with status 2


def check_args(parser, a):
    """Validate everything that can be validated without loading weights. Returns (transformer config, factors)."""
    import torch

    from . import pipeline as P
    from .config import TransformerConfig, VAEConfig

    if a.model is None and a.preset is None:
        _fail(parser, "give --model DIR or --preset NAME --random-init")
    if a.model is not None and (a.preset is not None or a.random_init):
        _fail(parser, "--model loads weights; --preset/--random-init build a random model: use one or the other")
    if a.preset is not None and not a.random_init:
        _fail(parser, "--preset needs --random-init (there are no preset weights; use --model DIR for real ones)")
    if (a.prompt is None) == (a.prompt_embeds is None):
        _fail(parser, "give --prompt or --prompt-embeds (one of them, not both)")
    if a.prompt_embeds is not None and not os.path.isfile(a.prompt_embeds):
        _fail(parser, f"--prompt-embeds {a.prompt_embeds}: no such file")
    if a.image is not None and not os.path.isfile(a.image):
        _fail(parser, f"--image {a.image}: no such file")
    if not 1 <= a.steps <= 1000:
        _fail(parser, f"--steps must be in [1, 1000], got {a.steps}")
    try:   # inf guidance writes NaN frames; NaN guidance would silently turn CFG off
        P.check_number("--guidance", a.guidance, 0.0)
        if a.fps is not None:
            P.check_number("--fps", a.fps, 0.0, strict=True)
    except ValueError as e:
        _fail(parser, str(e))
    if a.parallel is not None:
        from .parallel import Parallel, ParallelError

        try:
            a.parallel = Parallel.parse(a.parallel)
        except ParallelError as e:
            _fail(parser, str(e))
        if not os.environ.get("WORLD_SIZE") or not os.environ.get("RANK"):
            _fail(parser, f"--parallel needs torchrun: torchrun --nproc-per-node {a.parallel.world_size} -m cogvideox "
                          "generate --parallel ...")
    if a.device != "auto":
        try:
            dev = torch.device(a.device)
        except RuntimeError as e:
            _fail(parser, f"--device {a.device}: {e}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            _fail(parser, f"--device {a.device}: CUDA is not available here")

    if a.model is not None:
        from .weights import CheckpointError, parse_config, read_config

        need_t5 = a.prompt is not None
        try:
            P.check_model_dir(a.model, need_text_encoder=need_t5)
            tdir = os.path.join(a.model, "transformer")
            cfg = parse_config(tdir, read_config(tdir), TransformerConfig.from_diffusers_config)
            factors = P.read_vae_factors(os.path.join(a.model, "vae"))
            P.read_scheduler_config(a.model)
        except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
            _fail(parser, str(e))
    else:
        cfg = TransformerConfig.preset(a.preset)
        factors = P.vae_factors(VAEConfig.preset("tiny" if a.preset == "tiny" else "released"))
    i2v = cfg.in_channels == 2 * cfg.out_channels
    if i2v != (a.image is not None):
        _fail(parser, "this is an image-to-video model: pass --image FILE" if i2v else
              "--image is only for image-to-video models (this one is text-to-video)")
    # Defaults: diffusers' (sample_* x 8, sample_frames), except for 1.5, whose config's sample size 300 x 300 is a
    # RoPE bound, not a resolution (reference doc section 1): use its recommended 768 x 1360 instead.
    big = cfg.patch_size_t is not None and cfg.sample_height * factors.spatial > 1360
    a.frames = a.frames if a.frames is not None else cfg.sample_frames
    a.height = a.height if a.height is not None else (768 if big else cfg.sample_height * factors.spatial)
    a.width = a.width if a.width is not None else (1360 if big else cfg.sample_width * factors.spatial)
    try:
        P.check_size(a.frames, a.height, a.width, cfg, factors)
    except ValueError as e:
        _fail(parser, f"--{e}")   # the message starts with the flag's name: frames, height or width
    return cfg, factors


def _load_embeds(path: str, parser, cfg):
    """(prompt_embeds, negative_prompt_embeds or None) from a .safetensors or .pt file, every check made here
    (before any model loads): readable, tensors where tensors belong, (B, L, D) with B, L > 0, D = the model's
    text width, floating point and finite, the negative shaped like the positive."""
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # safetensors, pickle and zip errors have no common base: any failure is "unreadable"
        why = (str(e).splitlines() or [""])[0][:200]   # one line: the error is one `error:` line
        _fail(parser, f"--prompt-embeds {path}: cannot be read ({type(e).__name__}{': ' + why if why else ''})")
    if isinstance(data, torch.Tensor):
        data = {"prompt_embeds": data}
    if not isinstance(data, dict) or "prompt_embeds" not in data:
        _fail(parser, f"--prompt-embeds {path}: expected a tensor or a dict with 'prompt_embeds'")
    out = []
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        t = data.get(key)
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(parser, f"--prompt-embeds {path}: {key} must be a tensor, got {type(t).__name__}")
        if t is not None and t.dim() == 2:
            t = t[None]
        if t is not None and (t.dim() != 3 or 0 in t.shape[:2]):
            _fail(parser, f"--prompt-embeds {path}: {key} must be (B, L, D) with B, L > 0, got {tuple(t.shape)}")
        if t is not None and not (t.is_floating_point() and bool(torch.isfinite(t).all())):
            _fail(parser, f"--prompt-embeds {path}: {key} must hold finite floating-point numbers ({t.dtype})")
        out.append(t)
    pos, neg = out
    if pos.shape[2] != cfg.text_embed_dim or (neg is not None and neg.shape != pos.shape):
        _fail(parser, f"--prompt-embeds: prompt_embeds {tuple(pos.shape)} / negative "
                      f"{None if neg is None else tuple(neg.shape)} do not fit a model with text width "
                      f"{cfg.text_embed_dim}")
    return pos, neg


def _load_image(path: str, parser, height: int, width: int):
    """The --image file, decoded and resized now, so that a file that is not an image fails before any model."""
    from PIL import Image, UnidentifiedImageError

    from . import pipeline as P

    try:
        with Image.open(path) as img:
            img.load()
            return P.prepare_image(img, height, width)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        _fail(parser, f"--image {path}: not a readable image ({e})")


def _vae_available() -> bool:
    try:   # the VAE module is optional: without it the latents are saved instead of a video
        from .vae import CogVideoXVAE  # noqa: F401
    except ImportError:
        return False
    return True


def _output_paths(a, batch: int, with_vae: bool) -> list[tuple[str, bool]]:
    """(path, is a folder) of everything save_outputs will write."""
    from . import pipeline as P

    extra = [(a.save_latents, False)] if a.save_latents is not None else []
    if not with_vae:
        return [(os.path.splitext(a.out)[0] + ".latents.safetensors", False)] + extra
    return [P.output_target(_numbered(a.out, i, batch)) for i in range(batch)] + extra


def _check_outputs(parser, a, batch: int, with_vae: bool) -> None:
    from . import pipeline as P

    for path, folder in _output_paths(a, batch, with_vae):
        try:
            P.check_output(path, folder)
        except ValueError as e:
            _fail(parser, f"--out {a.out}: {e}")


def generate_command(parser, a) -> int:
    import torch

    from . import pipeline as P

    cfg, factors = check_args(parser, a)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    pm = None
    if a.parallel is not None:
        from .parallel import ParallelError, check_same, init_parallel

        try:
            pm = init_parallel(a.parallel, device)
            # every rank must sample the same video: compare what shapes the run, once, before any work
            check_same(pm, "the generate arguments", {k: v for k, v in sorted(vars(a).items()) if k != "subparser"})
        except ParallelError as e:
            _fail(parser, str(e))
        device = pm.device
        if pm.rank != 0:
            a.no_progress = True
    dtype_name = a.dtype if a.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = getattr(torch, DTYPES[dtype_name])
    # every input is read and checked before any model loads: nothing fails after minutes of loading or sampling
    pos = neg = None
    if a.prompt_embeds is not None:
        pos, neg = _load_embeds(a.prompt_embeds, parser, cfg)
        no_t5 = a.random_init or not os.path.isdir(os.path.join(a.model, "text_encoder"))
        if neg is None and a.guidance > 1 and no_t5:
            _fail(parser, "--guidance > 1 needs negative_prompt_embeds in the --prompt-embeds file (or a model "
                          "with a text encoder to encode --negative-prompt)")
    with_vae = _vae_available()
    if a.image is not None and not with_vae:
        _fail(parser, "--image needs the VAE (cogvideox.vae) to encode the image")
    image = _load_image(a.image, parser, a.height, a.width) if a.image is not None else None
    _check_outputs(parser, a, pos.shape[0] if pos is not None else 1, with_vae)
    generator = torch.Generator().manual_seed(a.seed)   # CPU generator: the same noise on every device

    if a.random_init:
        from .config import VAEConfig
        from .transformer import CogVideoXTransformer

        banner = "!! RANDOM WEIGHTS (--random-init): the output is noise, this only exercises the pipeline !!"
        print(banner, flush=True)
        torch.manual_seed(a.seed)
        transformer = CogVideoXTransformer(cfg).to(device=device, dtype=dtype).eval()
        vae = None
        try:
            from .vae import CogVideoXVAE
        except ImportError:
            CogVideoXVAE = None
        if CogVideoXVAE is not None:
            # scaling rules per family (reference doc section 1): 2B 1.15258426; 5B 0.7; 1.5 0.7 and inverted for I2V
            family = {} if a.preset in ("2b", "tiny") else {"scaling_factor": 0.7,
                                                           "invert_scale_latents": cfg.patch_size_t is not None}
            vae_cfg = VAEConfig.preset("tiny" if a.preset == "tiny" else "released", latent_channels=cfg.out_channels,
                                       **family)
            vae = CogVideoXVAE(vae_cfg).to(device=device, dtype=dtype).eval()
            factors = P.vae_factors(vae_cfg)
        snr = PRESET_SHIFT.get(a.preset, 1.0)
        if pos is None:
            print(f"random text embeddings stand in for T5 (1, {cfg.max_text_seq_length}, {cfg.text_embed_dim})")
            g = torch.Generator().manual_seed(a.seed + 1)
            pos, neg = (torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g) for _ in range(2))
        elif neg is None:
            neg = torch.randn(pos.shape, generator=torch.Generator().manual_seed(a.seed + 1))
    else:
        from .weights import CheckpointError

        try:
            m = P.load_models(a.model, dtype, device)
            if pos is None or (neg is None and a.guidance > 1):
                encoder, tokenizer = P.load_text_encoder(a.model, dtype, device)
                L = cfg.max_text_seq_length
                if pos is None:
                    pos = P.encode_prompt(encoder, tokenizer, [a.prompt], L, device, dtype)
                if a.guidance > 1:
                    neg = P.encode_prompt(encoder, tokenizer, [a.negative_prompt] * pos.shape[0], L, device, dtype)
                del encoder   # T5-XXL is ~9.5 GB in bf16: free it before sampling
        except (CheckpointError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        transformer, vae, factors, snr = m.transformer, m.vae, m.factors, m.snr_shift_scale
    pos = pos.to(device=device, dtype=dtype)
    neg = neg.to(device=device, dtype=dtype) if neg is not None else None
    if image is not None:
        image = image.expand(pos.shape[0], -1, -1, -1)

    out = P.generate(transformer, pos, neg, num_frames=a.frames, height=a.height, width=a.width, steps=a.steps,
                     guidance_scale=a.guidance, use_dynamic_cfg=a.dynamic_cfg, sampler=a.sampler,
                     snr_shift_scale=snr, generator=generator, vae=vae, factors=factors, image=image,
                     progress=not a.no_progress, parallel=pm)
    if pm is not None and pm.rank != 0:
        return 0   # rank 0 writes the files
    if a.save_latents is not None:
        from safetensors.torch import save_file

        with P.atomic_output(a.save_latents) as tmp:
            save_file({"latents": out.latents[:, out.dropped_frames:].float().contiguous().cpu()}, tmp)
        print(f"wrote: {a.save_latents}")
    written = save_outputs(out, a, cfg)
    for p in written:
        print(f"wrote: {p}")
    if a.random_init:
        print("(random weights: the video above is noise)")
    return 0


def _numbered(path: str, i: int, n: int) -> str:
    if n == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}_{i}{ext}"


def save_outputs(out, a, cfg) -> list[str]:
    from . import pipeline as P

    if out.video is None:
        from safetensors.torch import save_file

        path = os.path.splitext(a.out)[0] + ".latents.safetensors"
        with P.atomic_output(path) as tmp:
            save_file({"latents": out.latents[:, out.dropped_frames:].float().contiguous().cpu()}, tmp)
        print("no VAE available (cogvideox.vae not importable): saving the latents (B, F, C, h, w), not a video")
        return [path]
    frames = P.to_uint8(out.video)
    fps = a.fps or (16 if cfg.patch_size_t else 8)
    written = []
    for i in range(frames.shape[0]):
        target = _numbered(a.out, i, frames.shape[0])
        paths = P.save_frames(frames[i], target, fps=fps)
        if target.lower().endswith(".mp4") and paths[0] != target:
            print(f"imageio + imageio-ffmpeg are not installed: writing PNG frames instead of {target}")
        written += paths
    return written


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr at each record (main() may run under redirected streams, as in tests)."""

    def emit(self, record):
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _show_package_log() -> None:
    """The package logs its run-time choices at INFO (the attention backend, once per device / dtype / head dim;
    VAE memory warnings): without a handler Python drops INFO, so the command line sends ours to stderr."""
    logger = logging.getLogger("cogvideox")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv=None) -> int:
    # Never touch the network: transformers / huggingface_hub honour these.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _show_package_log()
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "generate":
        try:
            return generate_command(a.subparser, a)
        finally:   # under torchrun: leave the process group cleanly, on every exit path
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    if a.command in ("train", "encode-dataset"):
        from . import train_cli
        return (train_cli.train_command if a.command == "train" else train_cli.encode_dataset_command)(a.subparser, a)
    return 1


if __name__ == "__main__":
    sys.exit(main())
