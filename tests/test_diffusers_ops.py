"""apply_to_diffusers: the fused ops inside a diffusers CogVideoXTransformer3DModel, against the same model unpatched.

Every family on a tiny randomized config, batch 2, forward and backward (the latents', the text's and every
parameter's gradient), on the pure-torch reference path and on the Triton interpreter; LoRA (peft), diffusers'
gradient checkpointing, tables the config does not reproduce, the undo, and the errors.
"""
import copy
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cogvideox import apply_to_diffusers, remove_from_diffusers
from cogvideox.attention import AttentionBackendError
from cogvideox.diffusers_ops import FusedCogVideoXAttnProcessor, RopePositions
from conftest import assert_parity
from diffusers_models import diffusers_rotary_emb, tiny_diffusers_transformer

FAMILIES = ["2b", "5b", "5b-i2v", "1.5", "1.5-i2v"]
# (B, F, C_in, H, W): the training grid of the tiny configs (8 x 12 latents); 5b off-grid for fractional RoPE.
SHAPES = {"2b": (2, 3, 4, 8, 12), "5b": (2, 3, 4, 8, 12), "5b-i2v": (2, 3, 8, 8, 12), "1.5": (2, 4, 4, 8, 12),
          "1.5-i2v": (2, 2, 8, 8, 12), "5b-off-grid": (2, 2, 4, 6, 16)}
# The interpreter runs a Python loop per program: one layer and a 2 x 2 latent grid (4 patches of 2 x 2 latents)
# of 2 latent frames keep those tests to a few seconds; the sample size shrinks too, so that 5B-I2V's learned table
# and 1.0's crop region still describe this grid.
SMALL = dict(num_layers=1, sample_height=4, sample_width=4, sample_frames=5)
SMALL_SHAPES = {"2b": (2, 2, 4, 4, 4), "5b": (2, 2, 4, 4, 4), "5b-i2v": (2, 2, 8, 4, 4), "1.5": (2, 4, 4, 4, 4),
                "1.5-i2v": (2, 4, 8, 4, 4)}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def inputs(model, shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g).to(dtype)
    text = torch.randn(shape[0], model.config.max_text_seq_length, model.config.text_embed_dim, generator=g).to(dtype)
    timestep = torch.randint(0, 1000, (shape[0],), generator=g)
    ofs = torch.full((1,), 2.0) if model.config.ofs_embed_dim else None
    return dict(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, ofs=ofs,
                image_rotary_emb=diffusers_rotary_emb(model, shape))


def run(model, x, seed=1):
    """Forward + backward of a random linear loss -> (output, {name: grad}) for the inputs and the trainable
    parameters (a random cotangent: every gradient path carries a different signal)."""
    x = dict(x)
    for key in ("hidden_states", "encoder_hidden_states"):
        x[key] = x[key].clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(**x, return_dict=False)[0]
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out.float() * cot.float()).sum().backward()
    grads = {k: x[k].grad for k in ("hidden_states", "encoder_hidden_states")}
    grads.update({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    return out.detach(), grads


def assert_grads(ours, ref, plain=None, rtol=1e-5, atol=0.0):
    assert ours.keys() == ref.keys()
    # Parameters whose true gradient is 0 (2B's key bias: softmax ignores a constant added to every key) hold
    # rounding noise only; a bound relative to the largest gradient of the model keeps them honest.
    scale = max(g.double().abs().max().item() for g in ref.values())
    for name in ref:
        assert ours[name] is not None, name
        assert_parity(ours[name], ref[name], plain=None if plain is None else plain[name], rtol=rtol,
                      atol=atol + 1e-6 * scale, name=name)


class OpCounter(TorchDispatchMode):
    """Counts the cogvideox:: custom ops (and aten layer norms) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("cogvideox::") or "layer_norm" in name:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def patched_pair(family, seed=0, **overrides):
    ref = tiny_diffusers_transformer(family, seed=seed, **overrides)
    return ref, apply_to_diffusers(copy.deepcopy(ref))


@pytest.mark.parametrize("family", FAMILIES + ["5b-off-grid"])
def test_matches_diffusers_fp32(family):
    ref, ours = patched_pair(family.replace("-off-grid", ""), seed=len(family))
    x = inputs(ref, SHAPES[family], seed=2)
    out_r, grads_r = run(ref, x)
    out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_matches_diffusers_fp32(triton_kernels, family):
    """The Triton kernels (interpreter) inside the diffusers model: forward and every gradient."""
    ref, ours = patched_pair(family, seed=10 + len(family), **SMALL)
    x = inputs(ref, SMALL_SHAPES[family], seed=3)
    out_r, grads_r = run(ref, x)
    with OpCounter() as ops:
        out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)
    assert ops.counts.get("cogvideox::expert_adaln_bwd") == 2 * ref.config.num_layers + 1   # norm1s + residuals + out


@pytest.mark.parametrize("family", ["2b", "5b", "1.5-i2v"])
def test_bf16_parity(family):
    """Patched bf16 vs the unpatched fp32 model: error <= 2 x (unpatched bf16's error) + atol, output and grads."""
    ref = tiny_diffusers_transformer(family, seed=20)
    x = inputs(ref, SHAPES[family], seed=4)
    out_r, grads_r = run(ref, x)
    plain16 = copy.deepcopy(ref).bfloat16()
    ours16 = apply_to_diffusers(copy.deepcopy(ref).bfloat16())
    x16 = {k: v.bfloat16() if k in ("hidden_states", "encoder_hidden_states") else v for k, v in x.items()}
    out_p, grads_p = run(plain16, x16)
    out_o, grads_o = run(ours16, x16)
    assert out_o.dtype == torch.bfloat16
    assert_parity(out_o, out_r, plain=out_p, atol=2e-3)
    for name in grads_r:
        scale = grads_r[name].abs().max().item()
        assert_parity(grads_o[name], grads_r[name], plain=grads_p[name], atol=2e-3 * scale + 1e-6, name=name)


def test_fused_ops_replace_diffusers_ops():
    """What is fused: per block one expert_adaln (norm1), one expert_adaln_residual (residual + norm2), one rope3d
    each for q and k (q/k LayerNorm inside), plus the output norm; no aten LayerNorm is left but norm_final's."""
    ref, ours = patched_pair("5b")
    x = inputs(ref, SHAPES["5b"])
    with OpCounter() as ops, torch.no_grad():
        ours(**x)
    n = ref.config.num_layers
    assert ops.counts.get("cogvideox::expert_adaln") == n + 1
    assert ops.counts.get("cogvideox::expert_adaln_residual") == n
    assert ops.counts.get("cogvideox::rope3d") == 2 * n
    assert sum(v for k, v in ops.counts.items() if "layer_norm" in k) == 1


def test_tables_from_other_positions_fall_back(caplog):
    """Tables no config position reproduces (a script's own grid) are applied as given, unfused, with a warning."""
    ref, ours = patched_pair("5b", seed=3)
    x = inputs(ref, SHAPES["5b"], seed=5)
    cos, sin = x["image_rotary_emb"]
    angles = torch.atan2(sin, cos) + 0.3 * torch.rand(cos.shape, generator=torch.Generator().manual_seed(0))
    x["image_rotary_emb"] = (angles.cos(), angles.sin())
    out_r, grads_r = run(ref, x)
    with caplog.at_level(logging.WARNING, logger="cogvideox.diffusers_ops"), OpCounter() as ops:
        out_o, grads_o = run(ours, x)
    assert "RoPE unfused" in caplog.text
    assert "cogvideox::rope3d" not in ops.counts
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)


def test_positions_reach_the_blocks_as_rope3d_positions():
    ref, ours = patched_pair("1.5")
    x = inputs(ref, SHAPES["1.5"])
    seen = []
    handle = ours.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["image_rotary_emb"]), with_kwargs=True)
    with torch.no_grad():
        ours(**x)                                                    # image_rotary_emb by keyword
        ours(x["hidden_states"], x["encoder_hidden_states"], x["timestep"], None, x["ofs"], x["image_rotary_emb"])
    handle.remove()
    assert len(seen) == 2
    for rotary in seen:
        assert isinstance(rotary, RopePositions) and rotary.grid == (2, 4, 6)
        assert all(a is b for a, b in zip(rotary, x["image_rotary_emb"]))     # still diffusers' (cos, sin)
        assert rotary.start.tolist() == [0, 0, 0] and rotary.step.tolist() == [1, 1, 1]
