"""Model configs: one frozen dataclass per model, presets as one-line override dicts.

Runtime choices (attention backend, compile, kernels on/off, parallel degree) are not here: see the models'
constructor arguments.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


def _check_fields(config, positive=(), integral_floats=()) -> None:
    """Types and signs of every field, from its annotation: ints are ints (not 2.0, "1" or True), bools are bools,
    floats are finite numbers, tuples hold positive ints; `positive` fields must be > 0. A config.json value of the
    wrong type would otherwise fail deep inside the model (or, worse, silently change it). `integral_floats`:
    int fields whose diffusers type is float (4.0 is read as 4)."""
    problems = []
    for f in dataclasses.fields(config):
        v, kind = getattr(config, f.name), str(f.type).replace(" ", "")
        if v is None and kind.endswith("|None"):
            continue
        kind = kind.removesuffix("|None")
        if kind == "int" and f.name in integral_floats and isinstance(v, float) and v.is_integer():
            v = int(v)
            object.__setattr__(config, f.name, v)
        if kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if ok:
                object.__setattr__(config, f.name, float(v))
        elif kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "tuple":
            ok = isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        else:
            raise TypeError(f"{type(config).__name__}.{f.name}: no type check for {f.type!r}")
        if not ok:
            want = {"float": "a finite number", "tuple": "a list of ints"}.get(kind, f"a{'n' * (kind == 'int')} "
                                                                                   f"{kind}")
            problems.append(f"{f.name} must be {want}{' or null' if str(f.type).endswith('None') else ''}, got "
                            f"{v!r} ({type(v).__name__})")
        elif f.name in positive and (min(v, default=0) if kind == "tuple" else v) <= 0:
            problems.append(f"{f.name} must be > 0, got {v!r}")
    if problems:
        raise ValueError(f"invalid {type(config).__name__}: " + "; ".join(problems))


def _from_diffusers(cls, cfg: dict, model: str, fixed: dict, ignored=frozenset(), problems=()):
    """Shared by both configs: keys that are fields map one to one (JSON lists become tuples); keys this
    implementation hard-codes (`fixed`) must hold their one supported value; `ignored` and private ("_...") keys
    are skipped; any other key is an error, since it may change the math. Every problem is listed in one error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs, problems = {}, list(problems)
    for key, value in cfg.items():
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in fixed:
            if value != fixed[key]:
                problems.append(f"{key}={value!r} (only {fixed[key]!r} is supported)")
        elif key not in ignored and not key.startswith("_"):
            problems.append(f"unknown key {key}={value!r}")
    if problems:
        raise ValueError(f"unsupported {model} config: " + "; ".join(problems))
    return cls(**kwargs)

# ---- transformer -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransformerConfig:
    """The CogVideoX expert transformer. Field names are diffusers' config.json keys; defaults are CogVideoX-2b.

    Values from ../shared/reference/diffusers-cogvideox.md §1 (the Hub configs and diffusers'
    convert_cogvideox_to_diffusers.py). `sample_*` are in latents (height, width) and video frames (frames).
    """
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None             # 1.5-I2V: the "ofs" conditioning embedding width
    text_embed_dim: int = 4096                   # T5-XXL d_model
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True                  # bias of the q, k, v projections
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None              # 1.5: 2 (a Linear patch embedding over 2 latent frames)
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875   # 2B sincos table only
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False   # 5B-I2V: a learned table (added to RoPE)
    patch_bias: bool = True                      # 1.0 conv bias; the 1.5 Linear always has one (diffusers)

    def __post_init__(self):
        _check_fields(self, positive=("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                                      "time_embed_dim", "ofs_embed_dim", "text_embed_dim", "num_layers",
                                      "sample_width", "sample_height", "sample_frames", "patch_size", "patch_size_t",
                                      "temporal_compression_ratio", "max_text_seq_length", "norm_eps"))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention_head_dim % 16:
            raise ValueError(f"attention_head_dim must be a multiple of 16 (3D RoPE splits it 1/4, 3/8, 3/8 into "
                             f"even parts), got {self.attention_head_dim}")
        if not self.use_rotary_positional_embeddings and self.use_learned_positional_embeddings:
            raise ValueError("use_learned_positional_embeddings needs use_rotary_positional_embeddings "
                             "(no CogVideoX checkpoint has learned positions without RoPE; diffusers refuses it too)")
        if self.inner_dim % 16:
            raise ValueError(f"heads x head_dim must be a multiple of 16 for the 3D sincos table, got {self.inner_dim}")
        if self.ofs_embed_dim and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError(f"ofs_embed_dim ({self.ofs_embed_dim}) must equal time_embed_dim "
                             f"({self.time_embed_dim}): the two embeddings are summed")
        if self.patch_size < 1 or (self.patch_size_t is not None and self.patch_size_t < 1):
            raise ValueError(f"patch sizes must be >= 1, got {self.patch_size}, {self.patch_size_t}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_dim(self) -> int:
        """Features per patch: p_t * p * p (p_t = 1 for 1.0)."""
        return (self.patch_size_t or 1) * self.patch_size ** 2

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        if name not in TRANSFORMER_PRESETS:
            raise ValueError(f"unknown transformer preset {name!r}; choose from {sorted(TRANSFORMER_PRESETS)}")
        return cls(**{**TRANSFORMER_PRESETS[name], **overrides})

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "TransformerConfig":
        """Map a diffusers CogVideoXTransformer3DModel config.json. Keys this model hard-codes must hold the
        values every CogVideoX checkpoint uses; any other unknown key is an error (it may change the math)."""
        return _from_diffusers(cls, cfg, "CogVideoXTransformer3DModel", _DIFFUSERS_FIXED)


# Keys of diffusers' config that this implementation hard-codes, with the one value it supports.
_DIFFUSERS_FIXED = {"flip_sin_to_cos": True, "freq_shift": 0, "activation_fn": "gelu-approximate",
                    "timestep_activation_fn": "silu", "norm_elementwise_affine": True}

_5B = {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
_15 = {**_5B, "patch_size_t": 2, "patch_bias": False, "sample_height": 300, "sample_width": 300, "sample_frames": 81}
TRANSFORMER_PRESETS = {
    "2b": {},
    "5b": _5B,
    "5b-i2v": {**_5B, "in_channels": 32, "use_learned_positional_embeddings": True},
    "1.5-5b": _15,
    "1.5-5b-i2v": {**_15, "in_channels": 32, "ofs_embed_dim": 512},
    # 2B-style, a few thousand parameters: CPU tests. Combine with family overrides (use_rotary_..., patch_size_t).
    "tiny": {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "in_channels": 4,
             "out_channels": 4, "time_embed_dim": 24, "text_embed_dim": 24, "max_text_seq_length": 5,
             "sample_height": 8, "sample_width": 12, "sample_frames": 9},
}


# ---- VAE ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    """The CogVideoX 3D causal VAE (diffusers' AutoencoderKLCogVideoX). Field names are diffusers' config.json keys;
    defaults are the released VAE, the same for every family except scaling_factor (2B 1.15258426, 5B and 1.5 0.7)
    and invert_scale_latents (1.5: True, used only for I2V image latents). ../shared/reference/diffusers-cogvideox.md
    §1 and §4. `sample_*` are in pixels; diffusers' default tile is half of them (240 x 360).
    """
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 256, 512)
    layers_per_block: int = 3           # resnets per encoder block; each decoder block has one more
    norm_num_groups: int = 32
    norm_eps: float = 1e-6              # encoder resnets; diffusers hard-codes 1e-6 for norm_out and SpatialNorm
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    invert_scale_latents: bool = False

    def __post_init__(self):
        if isinstance(self.block_out_channels, list):
            object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        # diffusers types temporal_compression_ratio float; config.json may hold 4.0
        _check_fields(self, positive=("in_channels", "out_channels", "latent_channels", "block_out_channels",
                                      "layers_per_block", "norm_num_groups", "norm_eps", "temporal_compression_ratio",
                                      "sample_height", "sample_width", "scaling_factor"),
                      integral_floats=("temporal_compression_ratio",))
        n = len(self.block_out_channels)
        if n < 1 or any(c < 1 for c in self.block_out_channels) or self.layers_per_block < 1:
            raise ValueError(f"need >= 1 block of >= 1 channels and layers_per_block >= 1, got "
                             f"{self.block_out_channels}, {self.layers_per_block}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                             f"{self.block_out_channels}")
        levels = self.temporal_compression_ratio.bit_length() - 1
        if self.temporal_compression_ratio < 1 or 2 ** levels != self.temporal_compression_ratio or levels > n - 1:
            raise ValueError(f"temporal_compression_ratio must be a power of two <= 2^{n - 1} (one halving per "
                             f"resampling block), got {self.temporal_compression_ratio}")

    @property
    def spatial_compression(self) -> int:
        """8 for the released VAE: one 2x resampling per block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, name: str, **overrides) -> "VAEConfig":
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(VAE_PRESETS)}")
        return cls(**{**VAE_PRESETS[name], **overrides})

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "VAEConfig":
        """Map a diffusers AutoencoderKLCogVideoX config.json. Keys this model hard-codes must hold the values every
        CogVideoX checkpoint uses; any other unknown key is an error (it may change the math)."""
        channels = cfg.get("block_out_channels", cls.block_out_channels)
        blocks = len(channels) if isinstance(channels, (list, tuple)) else None   # else the field check reports it
        problems = []
        for key, kind in (("down_block_types", "CogVideoXDownBlock3D"), ("up_block_types", "CogVideoXUpBlock3D")):
            if blocks is not None and key in cfg and cfg[key] != [kind] * blocks:
                problems.append(f"{key}={cfg[key]!r} (only {blocks} x {kind!r} is supported)")
        return _from_diffusers(cls, cfg, "AutoencoderKLCogVideoX", _VAE_DIFFUSERS_FIXED,
                               ignored=_VAE_DIFFUSERS_IGNORED | {"down_block_types", "up_block_types"},
                               problems=problems)


# Keys of diffusers' VAE config that this implementation hard-codes, with the one value it supports.
_VAE_DIFFUSERS_FIXED = {"act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False,
                        "shift_factor": None, "latents_mean": None, "latents_std": None}
# force_upcast is a pipeline hint that the CogVideoX pipelines ignore (reference doc §1).
_VAE_DIFFUSERS_IGNORED = {"force_upcast"}

VAE_PRESETS = {
    "released": {},
    # The released layout's shape rules (c, 2c, 2c, 4c; shortcuts where channels change; two time halvings), a
    # few hundred thousand parameters: CPU tests. latent_channels = the tiny transformer's out_channels, so the two
    # presets make a pipeline. Default tiles (half the sample size) 48 x 40 px = 6 x 5 latents tile evenly with
    # diffusers' overlaps 1/6, 1/5 (strides 40 x 32 px = 5 x 4 latents), and a 64 x 96 video spans 2 x 3 tiles.
    "tiny": {"block_out_channels": (16, 32, 32, 64), "layers_per_block": 1, "norm_num_groups": 8,
             "latent_channels": 4, "sample_height": 96, "sample_width": 80},
}
