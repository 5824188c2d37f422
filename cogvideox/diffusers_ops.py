"""This project's fused ops inside someone else's diffusers `CogVideoXTransformer3DModel`, in place and undoable.

    apply_to_diffusers(transformer, attention_backend=None)   # -> transformer, patched in place
    remove_from_diffusers(transformer)                         # -> transformer, exactly as it was

For researchers who fine-tune the diffusers model itself (its LoRA scripts, finetrainers), as Liger-Kernel does
for LLMs. Written against diffusers 0.42.1 (models/transformers/cogvideox_transformer_3d.py and
CogVideoXAttnProcessor2_0 in models/attention_processor.py). Nothing in diffusers is edited globally; three seams
of this one model instance change:

- Each `CogVideoXBlock.forward` (an instance attribute, a function of ours): the two streams become one joint
  sequence [text | vision] (B, S, D), concatenated once per block instead of diffusers' twice (before attention and
  before FF), and
      h     = kernels.expert_adaln(x, norm1)                      CogVideoXLayerNormZero (norm1)
      x, h  = kernels.expert_adaln_residual(x, Attn(h), norm2)    gated attention residual + norm2, one pass
      x     = x + gate2 * FF(h)                                   plain torch
  The modulation GEMMs norm{1,2}.linear stay diffusers' Linear modules (LoRA can target them); their rows
  [vision shift, scale, gate | text shift, scale, gate] become (B, E=2, D) views with expert 0 = text.
- Each `attn1.processor` (diffusers' own extension point) -> `FusedCogVideoXAttnProcessor`: to_q, to_k, to_v as
  they are (three GEMMs, not fused: LoRA targets and state_dict keys stay), q/k LayerNorm + 3D RoPE in one
  `kernels.rope3d` per tensor (cos/sin computed in the kernel), `cogvideox.attention.attention` (the project's
  backend registry: flash-attn, cuDNN, ...), to_out.
- `norm_out.forward` (AdaLayerNorm) -> `kernels.expert_adaln` with one expert.

RoPE: diffusers hands the blocks (cos, sin) tables (N, Dh). A forward pre-hook on the transformer derives
start/step from the model config and the latent grid exactly as `cogvideox.transformer.rope_positions` does
(diffusers' pipelines' positions), rebuilds the table and compares it with the one passed: one device-to-host
sync per new pair of tables (a pipeline passes the same pair at every step). If they match, the blocks get the
positions and rope3d computes cos/sin itself; if not (a training script with its own positions), the blocks
apply the tables as given, unfused, and a warning is logged once. Without tables (2B), q/k get only their LayerNorm, as in diffusers.

Not fused: the patch and time embeddings, every GEMM (QKV, out, FF, modulation), FF's GELU, norm_final,
unpatchify. attention_mask is not supported (CogVideoX never passes one). state_dict keys and values are
untouched; LoRA adapters (peft, `add_adapter`) and `enable_gradient_checkpointing()` work before or after patching.
"""
from __future__ import annotations

import inspect
import logging
import types

import torch
import torch.nn as nn

import kernels
from kernels.expert_adaln import expert_rows
from kernels.rope3d import default_axes_dim, rope3d_positions, rope3d_table

from .attention import BACKENDS, attention
from .transformer import rope_positions

log = logging.getLogger(__name__)

_STATE = "_cogvideox_fused"   # attribute of a patched transformer: everything remove_from_diffusers restores
_ROTARY_ARG = 5               # image_rotary_emb's position in CogVideoXTransformer3DModel.forward(...)


class RopePositions(tuple):
    """diffusers' (cos, sin) tables, still a 2-tuple for any code that unpacks them, plus the positions that
    reproduce them: grid (T, Hg, Wg) and start, step fp32 (3,) tensors on the tables' device (kernels.rope3d)."""

    def __new__(cls, cos, sin, grid, start, step):
        self = super().__new__(cls, (cos, sin))
        self.grid, self.start, self.step = tuple(grid), start, step
        return self


class FusedCogVideoXAttnProcessor:
    """Drop-in for diffusers' CogVideoXAttnProcessor2_0 on the joint sequence.

    Called by our block forward with the joint h (B, S, D) and text_seq_length -> (B, S, D). Called the diffusers
    way, (vision, text) in, it returns (vision, text) as CogVideoXAttnProcessor2_0 does.
    """

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 text_seq_length=None):
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by the fused CogVideoX processor (CogVideoX never "
                             "passes one); remove_from_diffusers() restores diffusers' processor")
        split = encoder_hidden_states is not None
        if split:
            text_seq_length = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        elif text_seq_length is None:
            raise ValueError("text_seq_length is required when hidden_states is the joint [text | vision] sequence")
        L = text_seq_length
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))          # (B, S, H, Dh)
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        q = _norm_rope(q, attn.norm_q, L, image_rotary_emb)
        k = _norm_rope(k, attn.norm_k, L, image_rotary_emb)
        # CUDA autocast runs LayerNorm in fp32 (2B's q/k norm, the table path) and SDPA in the GEMMs' dtype:
        # the attention seam takes one dtype, so q and k get v's, as autocast's SDPA would cast them.
        q, k = q.to(v.dtype), k.to(v.dtype)
        o = attention(q, k, v, backend=self.backend).flatten(2)                 # (B, S, D)
        o = attn.to_out[1](attn.to_out[0](o))                                   # out projection, dropout
        return (o[:, L:], o[:, :L]) if split else o


def _norm_rope(x, norm, text_len, rotary):
    """q or k (B, S, H, Dh): LayerNorm over Dh on every token, then RoPE on the vision tokens."""
    affine = isinstance(norm, nn.LayerNorm) and norm.weight is not None
    if norm is not None and not affine:
        x, norm = norm(x), None      # rope3d normalizes only with an affine; a plain or foreign norm runs first
    if isinstance(rotary, RopePositions):
        ln = dict(weight=norm.weight, bias=norm.bias, eps=norm.eps) if norm is not None else {}
        return kernels.rope3d(x, text_len, rotary.grid, rotary.start, rotary.step, **ln)
    if norm is not None:
        x = norm(x)
    if rotary is None:
        return x
    # Tables that no start/step reproduces: diffusers' apply_rotary_emb (interleaved pairs, fp32), unfused.
    cos, sin = (t.to(x.device)[None, :, None, :] for t in rotary)           # (1, N, 1, Dh)
    vis = x[:, text_len:]
    re, im = vis.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-im, re], dim=-1).flatten(-2)
    vis = (vis.float() * cos + rotated.float() * sin).to(x.dtype)
    return torch.cat([x[:, :text_len], vis], dim=1)


def _modulation(norm_zero, temb):
    """CogVideoXLayerNormZero's linear -> shift, scale, gate: (B, E=2, D) each, expert 0 = text."""
    mod = norm_zero.linear(norm_zero.silu(temb)).unflatten(1, (2, 3, -1))   # (B, [vision, text], 3, D)
    mod = mod.flip(1)                                                          # (B, [text, vision], 3, D)
    return mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]


def _affine(ln: nn.LayerNorm) -> dict:
    return dict(weight=ln.weight, bias=ln.bias, eps=ln.eps)


def _block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
    """CogVideoXBlock.forward on the fused ops: (B, N, D) vision, (B, L, D) text -> the same two, updated."""
    L = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)              # (B, S, D) = [text | vision]
    mod1, mod2 = _modulation(self.norm1, temb), _modulation(self.norm2, temb)  # shift, scale, gate: (B, 2, D)
    # Under autocast the GEMM outputs are bf16/fp16 while the residual stream may be fp32 (2B adds an fp32
    # table): the fused ops take one dtype, the one torch's type promotion gives the unfused sums.
    dtype = torch.promote_types(x.dtype, mod1[0].dtype)
    x = x.to(dtype)
    (shift1, scale1, gate1), (shift2, scale2, gate2) = ([m.to(dtype) for m in mod] for mod in (mod1, mod2))
    h = kernels.expert_adaln(x, shift1, scale1, L, **_affine(self.norm1.norm))             # (B, S, D)
    a = self.attn1(h, text_seq_length=L, image_rotary_emb=image_rotary_emb, **(attention_kwargs or {}))
    x, h = kernels.expert_adaln_residual(x, a.to(dtype), gate1, shift2, scale2, L, **_affine(self.norm2.norm))
    x = x + expert_rows(gate2, L, x.shape[1]) * self.ff(h)                   # (B, S, D)
    return x[:, L:], x[:, :L]


def _norm_out_forward(self, x, timestep=None, temb=None):
    """AdaLayerNorm(chunk_dim=1), CogVideoX's output norm: x (B, N, D), temb (B, E_t) -> (B, N, D)."""
    shift, scale = self.linear(self.silu(temb)).unflatten(1, (2, 1, -1)).unbind(1)   # (B, 1, D) each
    dtype = torch.promote_types(x.dtype, shift.dtype)                         # autocast: see _block_forward
    return kernels.expert_adaln(x.to(dtype), shift.to(dtype), scale.to(dtype), 0, **_affine(self.norm))


def _table_tolerance(dtype: torch.dtype) -> float:
    # Other positions move cos/sin by about the position difference (the first pair's frequency is 1); the same
    # positions differ by a few ulps of the angle (fp32 tables) or by the table's own rounding (bf16, fp16).
    return 2e-4 if dtype in (torch.float32, torch.float64) else 2 * torch.finfo(dtype).eps


def _match_positions(config, latent_shape, rotary, head_dim: int):
    """RopePositions for diffusers' tables when this config's positions (rope_positions) reproduce them, else None."""
    cos, sin = rotary
    _, frames, _, height, width = latent_shape
    p, pt = config.patch_size, config.patch_size_t or 1
    grid = (frames // pt, height // p, width // p)
    if cos.shape != (grid[0] * grid[1] * grid[2], head_dim) or sin.shape != cos.shape:
        return None
    start, step = rope3d_positions(*rope_positions(config, grid), device=cos.device)   # (3,), (3,) fp32
    ref_cos, ref_sin = rope3d_table(grid, start, step, axes_dim=default_axes_dim(head_dim), device=cos.device)
    err = torch.maximum((cos.float() - ref_cos).abs().max(), (sin.float() - ref_sin).abs().max())
    if err.item() > _table_tolerance(cos.dtype):
        return None
    return RopePositions(cos, sin, grid, start, step)


def _rope_pre_hook(model, args, kwargs):
    """Forward pre-hook: replace image_rotary_emb by RopePositions when the config's positions reproduce it."""
    in_kwargs = "image_rotary_emb" in kwargs
    rotary = kwargs.get("image_rotary_emb") if in_kwargs else (args[_ROTARY_ARG] if len(args) > _ROTARY_ARG else None)
    if rotary is None or isinstance(rotary, RopePositions):
        return None
    latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    state = getattr(model, _STATE)
    # Pipelines build the tables once per video and pass the same tensors at every step: check them once.
    key = (tuple(latents.shape), *(t._version for t in rotary))             # same shape, tensors not written to
    if state.checked is None or state.checked[0] != key or any(a is not b for a, b in zip(state.checked[1], rotary)):
        state.checked = key, tuple(rotary), _match_positions(model.config, latents.shape, rotary, state.head_dim)
    positions = state.checked[2]
    if positions is None:
        if not state.warned:
            log.warning("apply_to_diffusers: image_rotary_emb does not match the positions derived from the model "
                        "config for latents %s; applying the tables as given (RoPE unfused)", tuple(latents.shape))
            state.warned = True
        return None
    if in_kwargs:
        return args, {**kwargs, "image_rotary_emb": positions}
    return args[:_ROTARY_ARG] + (positions,) + args[_ROTARY_ARG + 1:], kwargs


class _Patched:
    """What apply_to_diffusers changed on one transformer, so remove_from_diffusers can put it back."""

    def __init__(self, hook_id, modules, processors, head_dim):
        self.hook_id, self.modules, self.processors, self.head_dim = hook_id, modules, processors, head_dim
        self.warned = False
        self.checked = None   # (key, tables, RopePositions or None) of the last tables checked


def _check_model(transformer):
    try:
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0
        from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    except ImportError as e:
        raise ImportError("apply_to_diffusers needs diffusers (pip install diffusers)") from e
    if not isinstance(transformer, CogVideoXTransformer3DModel):
        raise TypeError(f"transformer must be a diffusers CogVideoXTransformer3DModel, got {type(transformer).__name__}"
                        " (for a peft PeftModel pass its .get_base_model())")
    if _STATE in transformer.__dict__:
        raise ValueError("transformer is already patched by apply_to_diffusers; call remove_from_diffusers first")
    for i, block in enumerate(transformer.transformer_blocks):
        name = f"transformer.transformer_blocks[{i}]"
        if not isinstance(block, CogVideoXBlock) or "forward" in block.__dict__:
            raise ValueError(f"{name} must be an unmodified diffusers CogVideoXBlock (got {type(block).__name__}"
                             f"{' with a replaced forward' if 'forward' in block.__dict__ else ''}); apply the fused "
                             "ops before hooks that replace forwards (accelerate offloading)")
        if not (isinstance(block.norm1, CogVideoXLayerNormZero) and isinstance(block.norm2, CogVideoXLayerNormZero)):
            raise ValueError(f"{name}.norm1/norm2 must be diffusers CogVideoXLayerNormZero")
        if not isinstance(block.attn1, Attention) or block.attn1.is_cross_attention:
            raise ValueError(f"{name}.attn1 must be a diffusers self-Attention")
        if type(block.attn1.processor) is not CogVideoXAttnProcessor2_0:
            raise ValueError(f"{name}.attn1 uses {type(block.attn1.processor).__name__}; apply_to_diffusers replaces "
                             "CogVideoXAttnProcessor2_0 only (after fuse_qkv_projections(), call "
                             "unfuse_qkv_projections() first)")
    norm_out = transformer.norm_out
    if (not isinstance(norm_out, AdaLayerNorm) or norm_out.emb is not None or norm_out.chunk_dim != 1
            or "forward" in norm_out.__dict__):
        raise ValueError("transformer.norm_out must be an unmodified diffusers AdaLayerNorm(chunk_dim=1)")
    # The class's forward (self first): an instance's may be a hook's (*args, **kwargs) wrapper.
    params = list(inspect.signature(type(transformer).forward).parameters)
    if params[_ROTARY_ARG + 1:_ROTARY_ARG + 2] != ["image_rotary_emb"]:
        raise ValueError("CogVideoXTransformer3DModel.forward's arguments differ from diffusers 0.42.1's")


def apply_to_diffusers(transformer, attention_backend: str | None = None):
    """Put the fused ops into a diffusers CogVideoXTransformer3DModel in place; returns it.

    attention_backend: a name in cogvideox.BACKENDS for every attention call, or None for the fastest available.
    TypeError for an object that is not a CogVideoXTransformer3DModel, ValueError if it is already patched or its
    blocks are not diffusers' own. Undo with remove_from_diffusers(transformer).
    """
    _check_model(transformer)
    if attention_backend is not None and attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend must be None or one of {sorted(BACKENDS)}, got {attention_backend!r}")
    processor = FusedCogVideoXAttnProcessor(attention_backend)
    processors = {}
    modules = [transformer.norm_out]
    for block in transformer.transformer_blocks:
        processors[block.attn1] = block.attn1.processor
        block.attn1.set_processor(processor)
        block.forward = types.MethodType(_block_forward, block)
        modules.append(block)
    transformer.norm_out.forward = types.MethodType(_norm_out_forward, transformer.norm_out)
    hook = transformer.register_forward_pre_hook(_rope_pre_hook, with_kwargs=True)
    head_dim = transformer.config.attention_head_dim
    object.__setattr__(transformer, _STATE, _Patched(hook.id, modules, processors, head_dim))
    return transformer


def remove_from_diffusers(transformer):
    """Undo apply_to_diffusers: the original forwards, attention processors and no hook; returns the transformer."""
    state = transformer.__dict__.get(_STATE) if isinstance(transformer, nn.Module) else None
    if state is None:
        raise ValueError("transformer is not patched by apply_to_diffusers")
    # By id, not through the handle: the handle of a deepcopy (an EMA copy) still points at the original's dicts.
    transformer._forward_pre_hooks.pop(state.hook_id, None)
    transformer._forward_pre_hooks_with_kwargs.pop(state.hook_id, None)
    for module in state.modules:
        del module.forward                       # the class's forward again
    for attn, original in state.processors.items():
        attn.set_processor(original)
    del transformer.__dict__[_STATE]
    return transformer
