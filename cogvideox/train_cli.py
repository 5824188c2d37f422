"""`python -m cogvideox train` and `python -m cogvideox encode-dataset`: fine-tuning on precomputed latents.

    python -m cogvideox encode-dataset --videos CLIPS/ --model DIR --out DATA/      # VAE + T5, once
    python -m cogvideox train --model DIR --data DATA/ --out RUN/ --steps 1000      # or: torchrun -m cogvideox ...
    python -m cogvideox train --preset tiny --random-init --data DATA/ --out RUN/   # CPU smoke run

The dataset folder: one `NAME.safetensors` per sample holding
    latents        (F, C, h, w) fp32: the VAE posterior sample x the VAE's scaling_factor, frames first (the
                   transformer's layout; diffusers' example does the same: latent_dist.sample() * scaling_factor)
    prompt_embeds  (L, D) fp32: T5 output for the prompt, padded to L tokens, no attention mask (as the pipeline)
    image_latents  (1, C, h, w) fp32, with `encode-dataset --i2v` (needed to fine-tune image-to-video models):
                   the first frame plus noise of sigma = exp(N(-3, 0.5)) (diffusers' I2V fine-tuning augmentation,
                   drawn once per clip here), encoded alone and scaled as inference scales the image latent
and `dataset.json` describing it. Samples of several latents shapes are batched by shape (one bucket per step;
--stages picks the buckets per step, progressive resolution). For an I2V model `train` builds the input as the
pipeline does: [noisy latents | image latent, then zero frames] on the channel axis, the image zeroed for a sample
with probability --image-dropout (diffusers' default 0.05), ofs 2.0 for 1.5-I2V.

A run directory: `log.jsonl` (one JSON line per step: step, stage, shape, loss, grad_norm, lr, timesteps, seconds),
`args.json`, and `checkpoint-NNNNNN/` every --save-every steps and at the end, each with `transformer/` in diffusers
format (diffusers' CogVideoXTransformer3DModel.from_pretrained loads it) and `training_state.pt` (optimizer, LR
schedule, step, and every rank's RNG states) from which `--resume` continues bit-exactly.
Distributed: under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP (NCCL on CUDA, gloo on CPU), or with --fsdp
sharded by FSDP2 (fully_shard per block, with or without LoRA; checkpoints gather the full state on rank 0); a
step's global batch comes from one bucket, split across the ranks; each rank reads its own slice and draws timesteps
in its own interval (Explicit Uniform Sampling, paper §3.3).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRESET_SHIFT = {"2b": 3.0, "tiny": 3.0}     # the SNR shift of the 2B scheduler; every 5B / 1.5 model uses 1.0
STATE_NAME = "training_state.pt"


def add_parsers(sub) -> None:
    """The `train` and `encode-dataset` subcommands, on __main__'s subparsers."""
    from .config import TRANSFORMER_PRESETS

    t = sub.add_parser("train", help="fine-tune the transformer on precomputed latents",
                       description=__doc__, formatter_class=_raw())
    src = t.add_argument_group("model")
    src.add_argument("--model", metavar="DIR", help="diffusers-format CogVideoX directory (transformer/, scheduler/)")
    src.add_argument("--preset", choices=sorted(TRANSFORMER_PRESETS), help="a model config, with --random-init")
    src.add_argument("--random-init", action="store_true", help="random weights (tests and smoke runs)")
    src.add_argument("--resume", metavar="DIR", help="a checkpoint-NNNNNN directory, or 'latest' (in --out)")
    t.add_argument("--data", metavar="DIR", required=True, help="folder of per-sample .safetensors (see above)")
    t.add_argument("--out", metavar="DIR", required=True)
    opt = t.add_argument_group("optimization")
    opt.add_argument("--steps", type=int, default=1000)
    opt.add_argument("--batch-size", type=int, default=1, help="per rank")
    opt.add_argument("--lr", type=float, default=1e-5)
    opt.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up, then constant")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0 disables clipping")
    opt.add_argument("--loss", choices=["cogvideox", "v-mse"], default="cogvideox")
    opt.add_argument("--timesteps", choices=["explicit-uniform", "uniform"], default="explicit-uniform")
    opt.add_argument("--snr-shift", type=float, help="default: the model's scheduler (2B 3.0, 5B 1.0)")
    opt.add_argument("--stages", metavar="SPEC",
                     help="progressive resolution (paper §3.3): 'paper' (256x384 for 400k steps, 480x720 for 220k, "
                          "768x1360 for 120k + 10k; 49, 49, 81, 81 frames) or 'STEPS:HxWxF,...' (e.g. "
                          "'2000:256x384x49,1000:480x720x49'). Each step trains on the latent buckets whose video "
                          "(8h x 8w pixels, 4(F-1)+1 frames) fits the step's stage (short side <= the stage's short "
                          "side, long side <= its long side, frames <= F); past the last stage, the last one. "
                          "--batch-size stays the batch. Default: every bucket at every step")
    opt.add_argument("--pack", action="store_true",
                     help="multi-resolution frame packing (paper §3): a step's batch mixes latent shapes (no "
                          "buckets), each rank's --batch-size videos packed into one sequence, attention kept within "
                          "each video; the loss is the mean of the videos' losses")
    opt.add_argument("--image-dropout", type=float, default=0.05, metavar="P",
                     help="image-to-video models: the probability that a sample's image condition is zeros "
                          "(diffusers' I2V example: --noised_image_dropout 0.05)")
    run = t.add_argument_group("run")
    run.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                     help="parameter dtype (default fp32; fp16 would need loss scaling)")
    run.add_argument("--autocast", choices=["auto", "none", "bf16"], default="auto",
                     help="mixed precision: the forward under torch.autocast (auto: bf16 on CUDA, none on CPU)")
    run.add_argument("--checkpointing", type=int, default=0, metavar="K",
                     help="activation checkpointing of every K-th block (0 off, 1 every block)")
    run.add_argument("--kernels", choices=["auto", "on", "off"], default="auto")
    run.add_argument("--compile", action="store_true", help="compile_blocks (torch.compile per block)")
    run.add_argument("--lora-rank", type=int, default=0, metavar="R",
                     help="train peft LoRA adapters of rank R on to_qkv / to_out instead of every weight (needs "
                          "peft); checkpoints hold the merged model in transformer/, the adapters in "
                          "lora.safetensors")
    run.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard parameters, gradients and optimizer states (FSDP2 fully_shard "
                          "per block) instead of DDP; for the 5B full fine-tune")
    run.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:LOCAL_RANK)")
    run.add_argument("--no-progress", action="store_true")
    t.set_defaults(subparser=t)

    e = sub.add_parser("encode-dataset", help="videos + prompts -> a latent dataset folder for `train`",
                       description=__doc__, formatter_class=_raw())
    e.add_argument("--videos", metavar="DIR", required=True,
                   help="NAME.mp4 files or NAME/ folders of PNG frames, each with its prompt in NAME.txt")
    e.add_argument("--out", metavar="DIR", required=True)
    e.add_argument("--model", metavar="DIR", help="diffusers-format directory: vae/, and text_encoder/ + tokenizer/")
    e.add_argument("--vae", metavar="DIR", help="a diffusers-format VAE directory (instead of --model DIR/vae)")
    e.add_argument("--prompt-embeds", metavar="FILE",
                   help="precomputed T5 embeddings instead of T5: a .safetensors with one (L, D) tensor per NAME")
    e.add_argument("--max-text-length", type=int, default=226)
    e.add_argument("--frames", type=int, help="keep the first N frames (4k + 1; default: the most that fit)")
    e.add_argument("--height", type=int, help="resize to this many pixels (a multiple of 16)")
    e.add_argument("--width", type=int, help="resize to this many pixels (a multiple of 16)")
    e.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    e.add_argument("--device", default="auto")
    e.add_argument("--seed", type=int, default=0, help="the posterior samples' generator")
    e.add_argument("--i2v", action="store_true",
                   help="also store image_latents, the noise-augmented first frame encoded alone (for fine-tuning "
                        "image-to-video models; see 'image_latents' above)")
    e.set_defaults(subparser=e)


def _raw():
    import argparse
    return argparse.RawDescriptionHelpFormatter


# ---- the dataset -------------------------------------------------------------------------------------------

class LatentDataset:
    """A folder of NAME.safetensors samples (module docstring); sorted by name, read on demand. `shapes` holds every
    sample's latents shape (read from the headers only): the buckets."""

    def __init__(self, directory: str, image: bool = False):
        from safetensors import safe_open

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"--data {directory}: not a directory")
        self.files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not self.files:
            raise FileNotFoundError(f"--data {directory}: no .safetensors samples (make them with encode-dataset)")
        self.image = image
        self.shapes = []
        for path in self.files:
            with safe_open(path, "pt") as f:
                keys = set(f.keys())
                if "latents" not in keys:
                    raise ValueError(f"{path}: no 'latents' tensor")
                if image and "image_latents" not in keys:
                    raise ValueError(f"{path}: no 'image_latents' (an image-to-video model needs them: make the "
                                     f"dataset with encode-dataset --i2v)")
                self.shapes.append(tuple(f.get_slice("latents").get_shape()))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        from safetensors.torch import load_file

        sample = load_file(self.files[i])
        for key, nd in (("latents", 4), ("prompt_embeds", 2)) + ((("image_latents", 4),) if self.image else ()):
            if key not in sample or sample[key].dim() != nd:
                raise ValueError(f"{self.files[i]}: needs '{key}' with {nd} dimensions, got "
                                 f"{tuple(sample[key].shape) if key in sample else 'nothing'}")
        if self.image and sample["image_latents"].shape != (1, *sample["latents"].shape[1:]):
            raise ValueError(f"{self.files[i]}: image_latents {tuple(sample['image_latents'].shape)} must be "
                             f"(1, C, h, w) like one frame of latents {tuple(sample['latents'].shape)}")
        return sample

    def packed(self, indices) -> dict:
        """The samples as lists (multi-resolution frame packing): {key: [tensor per sample]}, any shapes."""
        samples = [self[i] for i in indices]
        return {key: [s[key] for s in samples]
                for key in ("latents", "prompt_embeds") + (("image_latents",) if self.image else ())}

    def batch(self, indices) -> dict:
        import torch

        samples = [self[i] for i in indices]
        out = {}
        for key in ("latents", "prompt_embeds") + (("image_latents",) if self.image else ()):
            shapes = {tuple(s[key].shape) for s in samples}
            if len(shapes) > 1:
                raise ValueError(f"samples {[os.path.basename(self.files[i]) for i in indices]} have different "
                                 f"{key} shapes {sorted(shapes)} (batches share one latents shape; prompts must "
                                 f"share one padded length)")
            out[key] = torch.stack([s[key] for s in samples])
        return out


def parse_stages(spec: str | None, batch_size: int):
    """--stages -> a tuple of training.Stage, or None (no stages: every bucket at every step).
    'paper': the paper's schedule (training.paper_stages: steps, max resolutions and durations); 'S:HxWxF,...':
    S steps on videos of at most H x W pixels (either orientation) and F frames each. Stages choose shapes only:
    every Stage.batch_size is `batch_size`, the run's global batch (--batch-size x world), so the paper's global
    batches of 2000 -> 100 videos are not reproduced (they would need gradient accumulation)."""
    import dataclasses

    from . import training

    if spec is None:
        return None
    if spec == "paper":
        return tuple(dataclasses.replace(s, batch_size=batch_size) for s in training.paper_stages())
    stages = []
    for part in spec.split(","):
        try:
            steps, size = part.split(":")
            h, w, f = (int(v) for v in size.lower().split("x"))
            stages.append(training.Stage(int(steps), h, w, f, batch_size))
        except ValueError as e:
            raise ValueError(f"--stages: {part!r} is not STEPS:HEIGHTxWIDTHxFRAMES ({e})") from None
    return tuple(stages)


def fits(shape, stage, spatial: int = 8, temporal: int = 4) -> bool:
    """Whether latents of shape (F, C, h, w) come from a video inside the stage's limits: (F - 1) x 4 + 1 frames of
    8h x 8w pixels (every CogVideoX VAE's compression), the short side within the stage's short side, the long side
    within its long side."""
    F, _, h, w = shape
    H, W = h * spatial, w * spatial
    return ((F - 1) * temporal + 1 <= stage.frames and min(H, W) <= min(stage.height, stage.width)
            and max(H, W) <= max(stage.height, stage.width))


class BatchOrder:
    """Which samples each rank trains on at each step, a function of (seed, step) alone, so a resume needs no
    saved sampler state. Every step takes one global batch of world x batch same-shape samples (one bucket:
    training.bucket_batches with drop_last) and gives rank r its r-th slice, so all ranks run the same shape. With
    stages, step s trains in stage_at(stages, s) on the buckets that `fits` it, and each stage starts its own stream
    of epochs; an epoch is one bucket_batches draw from a generator seeded by (seed, stage, epoch).
    pack: batches mix shapes (multi-resolution frame packing): an epoch is a shuffle of the eligible samples cut
    into global batches, whatever their shapes."""

    def __init__(self, shapes, batch: int, world: int, seed: int, stages=None, pack: bool = False):
        import collections

        self.batch, self.world, self.seed, self.stages, self.pack = batch, world, seed, stages, pack
        self.shapes = [tuple(s) for s in shapes]
        self.members, self.lengths = [], []           # per stage: eligible sample indices, batches per epoch
        for stage in stages or (None,):
            members = [i for i, s in enumerate(self.shapes) if stage is None or fits(s, stage)]
            n = (len(members) // (batch * world) if pack else
                 sum(c // (batch * world) for c in collections.Counter(self.shapes[i] for i in members).values()))
            if n == 0 and pack:
                raise ValueError(f"--data: {len(members)} samples fit stage {len(self.members)}, fewer than a global "
                                 f"batch of {world} x {batch}")
            if n == 0:
                where = "" if stage is None else (f" of stage {len(self.members)} ({stage.height}x{stage.width} "
                                                  f"pixels, {stage.frames} frames: {len(members)} samples fit)")
                raise ValueError(f"--data: no bucket{where} holds a global batch of {world} x {batch} samples of one "
                                 f"latents shape (shapes: {sorted(set(self.shapes))})")
            self.members.append(members)
            self.lengths.append(n)
        self._epoch = (None, None)

    def __call__(self, step: int, rank: int) -> tuple[int, list[int]]:
        """-> (stage index, the dataset indices rank `rank` trains on at optimizer step `step`, 0-based)."""
        import torch

        from . import training

        stage, begin = 0, 0
        if self.stages:
            stage, _ = training.stage_at(self.stages, step)
            begin = sum(s.steps for s in self.stages[:stage])
        epoch, pos = divmod(step - begin, self.lengths[stage])
        if self._epoch[0] != (stage, epoch):
            members = self.members[stage]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + stage * 100_003 + epoch)
            if self.pack:    # one bucket: every shape together
                batches = training.bucket_batches([()] * len(members), self.batch * self.world, g, drop_last=True)
            else:
                batches = training.bucket_batches([self.shapes[i] for i in members], self.batch * self.world, g,
                                                  drop_last=True)
            self._epoch = ((stage, epoch), [[members[j] for j in b] for b in batches])
        chosen = self._epoch[1][pos]
        return stage, chosen[rank * self.batch:(rank + 1) * self.batch]


# ---- distributed -------------------------------------------------------------------------------------------

class Dist:
    """rank / world / device from torchrun's environment; world 1 is the plain single-process run."""

    def __init__(self, device_arg: str):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device_arg)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


# ---- train -------------------------------------------------------------------------------------------------

def _fail(parser, msg):
    parser.error(msg)


def _check_train_args(parser, a):
    if a.resume is None and (a.model is None) == (a.preset is None):
        _fail(parser, "give --model DIR, --preset NAME --random-init, or --resume CHECKPOINT")
    if a.preset is not None and not a.random_init:
        _fail(parser, "--preset needs --random-init (there are no preset weights)")
    if a.model is not None and a.random_init:
        _fail(parser, "--model loads weights; --random-init builds a random model: use one or the other")
    for name in ("steps", "batch_size"):
        if getattr(a, name) < 1:
            _fail(parser, f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("save_every", "warmup_steps", "checkpointing"):
        if getattr(a, name) < 0:
            _fail(parser, f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.lr <= 0:
        _fail(parser, f"--lr must be > 0, got {a.lr}")
    if not 0 <= a.image_dropout <= 1:
        _fail(parser, f"--image-dropout must be in [0, 1], got {a.image_dropout}")
    try:
        parse_stages(a.stages, a.batch_size * int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        _fail(parser, str(e))
    if a.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        _fail(parser, "--fsdp shards across processes: run under torchrun with --nproc_per_node >= 2")
    if a.lora_rank < 0:
        _fail(parser, f"--lora-rank must be >= 0, got {a.lora_rank}")
    if a.resume == "latest":
        found = sorted(glob.glob(os.path.join(a.out, "checkpoint-*", STATE_NAME)))
        if not found:
            _fail(parser, f"--resume latest: no checkpoint-*/{STATE_NAME} in {a.out}")
        a.resume = os.path.dirname(found[-1])
    if a.resume is not None and not os.path.isfile(os.path.join(a.resume, STATE_NAME)):
        _fail(parser, f"--resume {a.resume}: no {STATE_NAME} (expected a checkpoint-NNNNNN directory)")
    cfg = _config(parser, a)
    if cfg.in_channels not in (cfg.out_channels, 2 * cfg.out_channels):
        _fail(parser, f"in_channels {cfg.in_channels} is neither out_channels {cfg.out_channels} (text-to-video) "
                      f"nor twice it (image-to-video)")
    return cfg


def _transformer_dir(a) -> str:
    if a.resume is not None and not a.lora_rank:   # LoRA resumes from the base model plus the saved adapters
        return os.path.join(a.resume, "transformer")
    sub = os.path.join(a.model, "transformer")
    return sub if os.path.isdir(sub) else a.model


def _config(parser, a):
    """The transformer config, read before any weight is built or loaded."""
    from .config import TransformerConfig
    from .weights import CheckpointError, parse_config, read_config

    if a.lora_rank and a.resume is not None and a.model is None and a.preset is None:
        _fail(parser, "--resume of a LoRA run needs its base model again: --model DIR or --preset NAME --random-init")
    if (a.resume is None or a.lora_rank) and a.model is None:
        return TransformerConfig.preset(a.preset)
    path = _transformer_dir(a)
    try:
        return parse_config(path, read_config(path), TransformerConfig.from_diffusers_config)
    except CheckpointError as e:
        _fail(parser, str(e))


def _build_model(a, dtype, device):
    import torch

    from .transformer import CogVideoXTransformer
    from .weights import load_transformer

    kernels = {"auto": None, "on": True, "off": False}[a.kernels]
    if (a.resume is not None and not a.lora_rank) or a.model is not None:
        path = _transformer_dir(a)
    else:
        from .config import TransformerConfig

        print("!! RANDOM WEIGHTS (--random-init) !!", flush=True)
        torch.manual_seed(a.seed)
        model = CogVideoXTransformer(TransformerConfig.preset(a.preset), use_kernels=kernels)
        return model.to(device=device, dtype=dtype)
    return load_transformer(path, dtype=dtype, device=device, use_kernels=kernels)


def _snr_shift(a, saved):
    from . import pipeline as P

    if a.snr_shift is not None:
        return a.snr_shift
    if saved is not None:
        return saved["snr_shift"]
    if a.model is not None and os.path.isfile(os.path.join(a.model, "scheduler", "scheduler_config.json")):
        return P.read_scheduler_config(a.model)
    return PRESET_SHIFT.get(a.preset or "", 1.0)


def _rng_state(generator):
    import torch
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _save_checkpoint(a, d: Dist, model, optimizer, lr_schedule, generator, step, snr, order_key):
    import torch

    from .export import save_transformer

    path = os.path.join(a.out, f"checkpoint-{step:06d}")
    model_state = optim_state = None
    if a.fsdp:   # collectives: every rank takes part, rank 0 receives the full (unsharded) tensors on the CPU
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = [None] * d.world
    if d.world > 1:
        import torch.distributed as dist
        dist.all_gather_object(rngs, _rng_state(generator))
    else:
        rngs = [_rng_state(generator)]
    if d.rank == 0:
        if a.lora_rank:
            from safetensors.torch import save_file

            from . import training
            if a.fsdp:    # the gathered full state: base weights and adapters, peft's key names
                adapters = {k: v for k, v in model_state.items() if ".lora_" in k}
                model_state = training.merged_state_from(model, model_state)
            else:
                adapters = training.lora_state(model)
                model_state = training.merged_state(model)
            os.makedirs(path, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in adapters.items()},
                      os.path.join(path, "lora.safetensors"))
        save_transformer(model, os.path.join(path, "transformer"), state_dict=model_state)
        state = {"step": step, "optimizer": optim_state if a.fsdp else optimizer.state_dict(),
                 "lr_schedule": lr_schedule.state_dict(), "rng": rngs, "world": d.world, "snr_shift": snr,
                 "seed": a.seed, "order": order_key}
        torch.save(state, os.path.join(path, STATE_NAME + ".tmp"))
        os.replace(os.path.join(path, STATE_NAME + ".tmp"), os.path.join(path, STATE_NAME))
    d.barrier()
    return path


def train_command(parser, a) -> int:
    import torch

    from . import scheduler, training
    from .transformer import compile_blocks

    cfg = _check_train_args(parser, a)
    i2v = cfg.in_channels == 2 * cfg.out_channels
    try:
        data = LatentDataset(a.data, image=i2v)
    except (FileNotFoundError, ValueError) as e:
        _fail(parser, str(e))
    d = Dist(a.device)
    try:
        dtype = getattr(torch, DTYPES[a.dtype])
        autocast = {"auto": torch.bfloat16 if d.device.type == "cuda" else None, "none": None,
                    "bf16": torch.bfloat16}[a.autocast]
        saved = None
        if a.resume:
            saved = torch.load(os.path.join(a.resume, STATE_NAME), map_location="cpu", weights_only=True)
        if saved is not None and saved["world"] != d.world:
            raise ValueError(f"--resume: the checkpoint was written by {saved['world']} processes, this run has "
                             f"{d.world} (the RNG streams are per rank)")
        order_key = {"stages": a.stages, "batch_size": a.batch_size, "seed": a.seed, "pack": a.pack}
        if saved is not None and saved.get("order", order_key) != order_key:
            raise ValueError(f"--resume: the checkpoint's data order came from {saved['order']}, this run asks for "
                             f"{order_key}: resume with the same --stages, --batch-size and --seed")
        order = BatchOrder(data.shapes, a.batch_size, d.world, a.seed, parse_stages(a.stages, a.batch_size * d.world),
                           a.pack)
        model = _build_model(a, dtype, d.device).train()
        model.checkpointing = a.checkpointing
        if a.lora_rank:
            training.add_lora(model, rank=a.lora_rank, alpha=a.lora_alpha)
            if saved is not None:
                from safetensors.torch import load_file
                adapters = load_file(os.path.join(a.resume, "lora.safetensors"), device=str(d.device))
                missing, unexpected = model.load_state_dict(adapters, strict=False)
                if unexpected or any(".lora_" in k for k in missing):
                    raise ValueError(f"--resume: {a.resume}/lora.safetensors does not fit --lora-rank "
                                     f"{a.lora_rank} (unexpected {unexpected[:3]})")
        if a.compile:
            compile_blocks(model)
        snr = _snr_shift(a, saved)
        table = scheduler.alphas_cumprod(snr)
        wrapped = model
        if a.fsdp:
            from torch.distributed.fsdp import fully_shard
            # torchtitan's recipe: each block is one all-gather / reduce-scatter unit, the root holds the rest
            for block in model.transformer_blocks:
                fully_shard(block)
            fully_shard(model)
        elif d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapped = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                                      betas=tuple(a.betas), eps=1e-8, weight_decay=a.weight_decay)
        warm = a.warmup_steps
        lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        generator = torch.Generator().manual_seed(a.seed * 1_000 + d.rank)   # CPU: the same draws on every device
        start = 0
        if saved is not None and a.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, saved["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        elif saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if saved is not None:
            lr_schedule.load_state_dict(saved["lr_schedule"])
            rng = saved["rng"][d.rank]
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            start = saved["step"]
        else:
            torch.manual_seed(a.seed * 1_000 + d.rank)   # dropout masks
        if a.timesteps == "explicit-uniform":
            sampler = functools.partial(training.explicit_uniform_timesteps, rank=d.rank, world_size=d.world)
        else:
            sampler = training.uniform_timesteps
        if d.rank == 0:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "args.json"), "w", encoding="utf-8") as f:
                json.dump({k: v for k, v in vars(a).items() if k != "subparser"}, f, indent=2, default=str)
        bar = _progress(range(start, a.steps), a.no_progress or d.rank != 0, start, a.steps)
        log = open(os.path.join(a.out, "log.jsonl"), "a", encoding="utf-8") if d.rank == 0 else None
        try:
            for step in bar:
                t0 = time.perf_counter()
                stage, idx = order(step, d.rank)
                if a.pack:   # lists of per-video tensors, one packed sequence
                    batch = {k: [t.to(device=d.device, dtype=dtype) for t in v] for k, v in data.packed(idx).items()}
                    shape = [list(t.shape) for t in batch["latents"]]
                else:
                    batch = {k: v.to(device=d.device, dtype=dtype) for k, v in data.batch(idx).items()}
                    shape = list(batch["latents"].shape[1:])
                if i2v:
                    # one draw per sample from the run's generator before the step's timesteps and noise (resumable)
                    drop = torch.rand(len(idx), generator=generator) < a.image_dropout
                    if a.pack:
                        batch["image_latents"] = [
                            training.image_condition(c[None], x.shape[0], drop[j:j + 1])[0]
                            for j, (c, x) in enumerate(zip(batch["image_latents"], batch["latents"]))]
                    else:
                        batch["image_latents"] = training.image_condition(batch["image_latents"],
                                                                          batch["latents"].shape[1], drop)
                    if cfg.ofs_embed_dim:     # 1.5-I2V: the pipeline's (and CogVideo's finetune) ofs 2.0
                        batch["ofs"] = torch.full((1,), 2.0, device=d.device, dtype=dtype)
                res = training.train_step(wrapped, batch, optimizer, table, generator=generator,
                                          sample_timesteps=sampler, loss=a.loss,
                                          max_grad_norm=a.max_grad_norm if a.max_grad_norm > 0 else None,
                                          autocast_dtype=autocast)
                lr = optimizer.param_groups[0]["lr"]
                lr_schedule.step()
                loss = d.mean(res.loss)
                if log is not None:
                    log.write(json.dumps({"step": step + 1, "stage": stage,
                                          "shape": shape, "loss": loss,
                                          "grad_norm": res.grad_norm, "lr": lr,
                                          "timesteps": res.timesteps.tolist(),
                                          "seconds": round(time.perf_counter() - t0, 4)}) + "\n")
                    log.flush()
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{loss:.4f}")
                done = step + 1
                if done == a.steps or (a.save_every and done % a.save_every == 0):
                    path = _save_checkpoint(a, d, model, optimizer, lr_schedule, generator, done, snr, order_key)
                    if d.rank == 0:
                        print(f"saved: {path}", flush=True)
        finally:
            if log is not None:
                log.close()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    else:
        # every rank done with every collective (FSDP's last reduce-scatters included) before any tears its gloo
        # pairs down: on a loaded machine a rank once aborted at exit without this
        d.barrier()
    finally:
        d.close()
    return 0


def _progress(it, disable, start, total):
    if disable:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, initial=start, total=total, desc="train", dynamic_ncols=True)


# ---- encode-dataset ----------------------------------------------------------------------------------------

def read_video(path: str):
    """-> (T, H, W, 3) uint8: an mp4 (imageio + imageio-ffmpeg) or a folder of PNG frames (sorted by name)."""
    import numpy as np

    if os.path.isdir(path):
        from PIL import Image

        frames = sorted(glob.glob(os.path.join(path, "*.png")))
        if not frames:
            raise ValueError(f"{path}: no PNG frames")
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in frames])
    try:
        import imageio
    except ImportError:
        raise ValueError(f"{path}: reading mp4 needs imageio and imageio-ffmpeg (or give a folder of PNG frames)")
    with imageio.get_reader(path) as reader:
        return np.stack([np.asarray(f)[..., :3] for f in reader])


def video_tensor(frames, n_frames: int | None, height: int | None, width: int | None, name: str):
    """(T, H, W, 3) uint8 -> (1, 3, T', H', W') fp32 in [-1, 1]: the first T' = 4k + 1 frames, resized if asked."""
    import torch
    import torch.nn.functional as F

    T = frames.shape[0]
    n = n_frames if n_frames is not None else (T - 1) // 4 * 4 + 1
    if n > T or (n - 1) % 4:
        raise ValueError(f"{name}: --frames must be 4k + 1 and at most the video's {T} frames, got {n}")
    x = torch.from_numpy(frames[:n]).permute(0, 3, 1, 2).float() / 127.5 - 1.0          # (T, 3, H, W)
    H, W = height or x.shape[2], width or x.shape[3]
    if (H, W) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
    if H % 16 or W % 16:
        raise ValueError(f"{name}: frames of {H} x {W} pixels; height and width must be multiples of 16 "
                         f"(VAE 8 x patch 2): pass --height / --width")
    return x.permute(1, 0, 2, 3)[None]                                                   # (1, 3, T, H, W)


def _samples(videos: str):
    names = {}
    for entry in sorted(os.listdir(videos)):
        full = os.path.join(videos, entry)
        if os.path.isdir(full) or entry.lower().endswith(".mp4"):
            names[os.path.splitext(entry)[0] if not os.path.isdir(full) else entry] = full
    return names


def image_latents(vae, frame, factors, generator):
    """The I2V training condition of one clip: frame (1, 3, 1, H, W) in [-1, 1], the video's first frame, plus
    Gaussian noise of sigma = exp(N(-3, 0.5)) (the image-noise augmentation of diffusers' train_cogvideox_image_to_
    video_lora.py and CogVideo's finetune I2V trainer, both drawing it per step; here one draw per clip, at encode
    time), encoded alone, sampled, scaled as pipeline.image_latents scales it (x scaling_factor; 1 / it for VAEs
    with invert_scale_latents). Draws sigma, the noise and the posterior sample from `generator`, in that order.
    -> ((1, C, h, w) fp32 on the CPU, sigma)."""
    import torch

    sigma = float(torch.exp(-3.0 + 0.5 * torch.randn(1, generator=generator)))
    noise = torch.randn(frame.shape, generator=generator).to(device=frame.device, dtype=frame.dtype)
    with torch.no_grad():
        z = vae.encode(frame + sigma * noise).sample(generator)                     # (1, C, 1, h, w)
    z = z / factors.scaling_factor if factors.invert_scale_latents else z * factors.scaling_factor
    return z[0].permute(1, 0, 2, 3).float().contiguous().cpu(), sigma


def encode_dataset_command(parser, a) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from . import pipeline as P
    from .vae import load_vae

    if not os.path.isdir(a.videos):
        _fail(parser, f"--videos {a.videos}: not a directory")
    if a.model is None and a.vae is None:
        _fail(parser, "give --model DIR (vae/, text_encoder/, tokenizer/) or --vae DIR with --prompt-embeds")
    if a.model is None and a.prompt_embeds is None:
        _fail(parser, "without --model there is no T5: pass --prompt-embeds FILE")
    samples = _samples(a.videos)
    if not samples:
        _fail(parser, f"--videos {a.videos}: no NAME.mp4 files or NAME/ frame folders")
    embeds = load_file(a.prompt_embeds) if a.prompt_embeds else None
    missing = [n for n in samples if (embeds is None or n not in embeds)
               and not os.path.isfile(os.path.join(a.videos, n + ".txt"))]
    if missing or (embeds is None and a.model is None):
        _fail(parser, f"no prompt for {missing}: add NAME.txt (with --model's T5) or a NAME entry in --prompt-embeds")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    dtype = getattr(torch, DTYPES[a.dtype])
    try:
        vae_dir = a.vae or os.path.join(a.model, "vae")
        vae = load_vae(vae_dir, dtype=dtype, device=device)
        factors = P.read_vae_factors(vae_dir)
        encoder = tokenizer = None
        generator = torch.Generator().manual_seed(a.seed)
        os.makedirs(a.out, exist_ok=True)
        for name, path in samples.items():
            if embeds is not None and name in embeds:
                text = embeds[name].float()
            else:
                if encoder is None:
                    encoder, tokenizer = P.load_text_encoder(a.model, dtype, device)
                with open(os.path.join(a.videos, name + ".txt"), encoding="utf-8") as f:
                    prompt = f.read().strip()
                text = P.encode_prompt(encoder, tokenizer, [prompt], a.max_text_length, device, dtype)[0].float()
            if text.dim() != 2:
                raise ValueError(f"{name}: prompt embeddings must be (L, D), got {tuple(text.shape)}")
            video = video_tensor(read_video(path), a.frames, a.height, a.width, name).to(device=device, dtype=dtype)
            with torch.no_grad():
                z = vae.encode(video).sample(generator) * factors.scaling_factor    # (1, C, F, h, w)
            latents = z[0].permute(1, 0, 2, 3).float().contiguous().cpu()           # (F, C, h, w)
            tensors = {"latents": latents, "prompt_embeds": text.contiguous().cpu()}
            meta = {"source": os.path.basename(path)}
            if a.i2v:
                tensors["image_latents"], sigma = image_latents(vae, video[:, :, :1], factors, generator)
                meta["image_noise_sigma"] = repr(sigma)
            save_file(tensors, os.path.join(a.out, name + ".safetensors"), metadata=meta)
            print(f"{name}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()), flush=True)
        with open(os.path.join(a.out, "dataset.json"), "w", encoding="utf-8") as f:
            json.dump({"format": "cogvideox-latents", "version": 1, "samples": len(samples),
                       "scaling_factor": factors.scaling_factor,
                       "latents": "(F, C, h, w) fp32, posterior sample x scaling_factor",
                       "prompt_embeds": "(L, D) fp32, T5 output, no attention mask",
                       **({"image_latents": "(1, C, h, w) fp32, noise-augmented first frame, scaled as inference"}
                          if a.i2v else {})}, f, indent=2)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
