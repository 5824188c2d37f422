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
from conftest import assert_parity, max_err
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
    with OpCounter() as ops:
        out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)
    # RoPE fused (the config's positions reproduced diffusers' tables), off the training grid too.
    assert ops.counts.get("cogvideox::rope3d", 0) == 2 * ref.config.num_layers * (x["image_rotary_emb"] is not None)


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


def test_remove_restores_the_model_exactly():
    model = tiny_diffusers_transformer("5b-i2v", seed=4)
    x = inputs(model, SHAPES["5b-i2v"], seed=6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {name: p for name, p in model.attn_processors.items()}
    block_dicts = [set(b.__dict__) for b in model.modules()]
    with torch.no_grad():
        before = model(**x, return_dict=False)[0]
    assert apply_to_diffusers(model) is model
    assert list(model.state_dict()) == list(state)                       # keys and order unchanged
    assert all(isinstance(p, FusedCogVideoXAttnProcessor) for p in model.attn_processors.values())
    assert remove_from_diffusers(model) is model
    assert all(p is processors[name] for name, p in model.attn_processors.items())
    assert [set(b.__dict__) for b in model.modules()] == block_dicts     # no instance forward, no state attribute
    assert not model._forward_pre_hooks
    sd = model.state_dict()
    assert list(sd) == list(state) and all(torch.equal(sd[k], v) for k, v in state.items())
    with torch.no_grad():
        after = model(**x, return_dict=False)[0]
    assert torch.equal(after, before)
    apply_to_diffusers(model)                                            # patchable again after the undo
    remove_from_diffusers(model)


@pytest.mark.parametrize("order", ["lora-then-patch", "patch-then-lora"])
def test_lora_adapters(order):
    """peft LoRA on the attention and FF Linears (diffusers' add_adapter) under the fused ops: the same output and
    LoRA gradients as unpatched, base weights frozen, state_dict (adapter keys included) unchanged."""
    peft = pytest.importorskip("peft", reason="peft is not installed (the LoRA path needs it)")
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=LORA_TARGETS)
    ref = tiny_diffusers_transformer("5b", seed=5)
    ours = copy.deepcopy(ref)
    torch.manual_seed(0)
    ref.add_adapter(lora)
    if order == "lora-then-patch":
        torch.manual_seed(0)
        ours.add_adapter(lora)
        apply_to_diffusers(ours)
    else:
        apply_to_diffusers(ours)
        torch.manual_seed(0)
        ours.add_adapter(lora)
    assert list(ours.state_dict()) == list(ref.state_dict())
    trainable = [k for k, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable)
    for t in LORA_TARGETS:
        assert any(f"{t}.lora_A" in k for k in trainable), t
    x = inputs(ref, SHAPES["5b"], seed=7)
    out_r, grads_r = run(ref, x)
    out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)
    # attention_kwargs={"scale": s} scales the adapters (diffusers' apply_lora_scale), patched or not.
    with torch.no_grad():
        half = [m(**x, attention_kwargs={"scale": 0.5}, return_dict=False)[0] for m in (ref, ours)]
    assert_parity(half[1], half[0], rtol=1e-5, atol=0)
    assert (half[1] - out_o).abs().max() > 1e-3


def test_lora_on_triton_kernels(triton_kernels):
    peft = pytest.importorskip("peft", reason="peft is not installed (the LoRA path needs it)")
    ref = tiny_diffusers_transformer("1.5-i2v", seed=6, **SMALL)
    ref.add_adapter(peft.LoraConfig(r=2, init_lora_weights=False, target_modules=LORA_TARGETS))
    ours = apply_to_diffusers(copy.deepcopy(ref))
    x = inputs(ref, SMALL_SHAPES["1.5-i2v"], seed=8)
    out_r, grads_r = run(ref, x)
    out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)


@pytest.mark.parametrize("family", ["2b", "1.5"])
def test_gradient_checkpointing(family):
    """diffusers' enable_gradient_checkpointing(): the blocks re-run our forward in backward; same gradients."""
    ref, ours = patched_pair(family, seed=7)
    for m in (ref, ours):
        m.enable_gradient_checkpointing()
        m.train()                                     # diffusers checkpoints only while grad is enabled
    x = inputs(ref, SHAPES[family], seed=9)
    out_r, grads_r = run(ref, x)
    with OpCounter() as ops:
        out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)
    # Forward once, and again inside backward for each checkpointed block.
    assert ops.counts["cogvideox::expert_adaln_residual"] == 2 * ref.config.num_layers


def test_processor_alone_in_an_unpatched_block():
    """FusedCogVideoXAttnProcessor keeps diffusers' processor contract ((vision, text) in and out, raw tables)."""
    ref = tiny_diffusers_transformer("5b", seed=8)
    ours = copy.deepcopy(ref)
    ours.set_attn_processor(FusedCogVideoXAttnProcessor())
    x = inputs(ref, SHAPES["5b"], seed=10)
    out_r, grads_r = run(ref, x)
    out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)


def test_attention_backend_is_the_seam():
    ref, _ = patched_pair("5b")
    x = inputs(ref, SHAPES["5b"], seed=11)
    with torch.no_grad():
        expected = ref(**x, return_dict=False)[0]
        out = apply_to_diffusers(ref, attention_backend="sdpa-math")(**x, return_dict=False)[0]
    assert_parity(out, expected, rtol=1e-5, atol=0)
    remove_from_diffusers(ref)
    with pytest.raises(ValueError, match="attention_backend"):
        apply_to_diffusers(ref, attention_backend="no-such-backend")
    assert "_cogvideox_fused" not in ref.__dict__                       # a refused call patches nothing
    apply_to_diffusers(ref, attention_backend="sdpa-cudnn")             # exists, cannot run on a CPU
    with pytest.raises(AttentionBackendError, match="sdpa-cudnn"), torch.no_grad():
        ref(**x, return_dict=False)


def test_errors():
    from cogvideox import CogVideoXTransformer, TransformerConfig
    with pytest.raises(TypeError, match="CogVideoXTransformer3DModel"):
        apply_to_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="CogVideoXTransformer3DModel"):
        apply_to_diffusers(CogVideoXTransformer(TransformerConfig.preset("tiny")))   # ours needs no patching
    model = tiny_diffusers_transformer("2b")
    with pytest.raises(ValueError, match="not patched"):
        remove_from_diffusers(model)
    apply_to_diffusers(model)
    with pytest.raises(ValueError, match="already patched"):
        apply_to_diffusers(model)
    attn, h = model.transformer_blocks[0].attn1, torch.randn(2, 7, 32)
    with pytest.raises(ValueError, match="attention_mask"):
        FusedCogVideoXAttnProcessor()(attn, h, attention_mask=torch.ones(2, 7), text_seq_length=5)
    with pytest.raises(ValueError, match="text_seq_length"):
        FusedCogVideoXAttnProcessor()(attn, h)
    remove_from_diffusers(model)
    model.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        apply_to_diffusers(model)
    assert "_cogvideox_fused" not in model.__dict__


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_autocast_bf16(family):
    """fp32 weights under torch.autocast(bf16), as mixed-precision training runs: error vs the fp32 model
    <= 2 x (unpatched autocast's error) + atol, output and gradients. 2B's residual stream is fp32 there (its
    sincos table is an fp32 buffer) while the GEMM outputs are bf16."""
    ref, ours = patched_pair(family, seed=9)
    x = inputs(ref, SHAPES[family], seed=12)
    out_r, grads_r = run(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, grads_p = run(ref, x)
        out_o, grads_o = run(ours, x)
    assert out_o.dtype == out_p.dtype
    assert_parity(out_o, out_r, plain=out_p, atol=2e-3)
    for name in grads_r:       # fp32 gradients of bf16 math: the low-precision rule, written out
        err, plain_err = max_err(grads_o[name], grads_r[name]), max_err(grads_p[name], grads_r[name])
        bound = 2 * plain_err + 2e-3 * grads_r[name].abs().max().item() + 1e-6
        assert err <= bound, f"{name}: max err {err:.3e} > 2 x autocast err {plain_err:.3e} + atol"


def test_deepcopy_of_a_patched_model():
    """An EMA copy (copy.deepcopy) of a patched model is patched too, and each undoes on its own."""
    ref, ours = patched_pair("5b", seed=11)
    x = inputs(ref, SHAPES["5b"], seed=13)
    ema = copy.deepcopy(ours)
    with torch.no_grad():
        expected = ref(**x, return_dict=False)[0]
        with OpCounter() as ops:
            assert_parity(ema(**x, return_dict=False)[0], expected, rtol=1e-5, atol=0)
        assert ops.counts.get("cogvideox::rope3d") == 2 * ref.config.num_layers
        remove_from_diffusers(ema)
        assert not ema._forward_pre_hooks and len(ours._forward_pre_hooks) == 1
        assert all("forward" not in b.__dict__ for b in ema.transformer_blocks)
        assert all("forward" in b.__dict__ for b in ours.transformer_blocks)
        with OpCounter() as ops:
            assert_parity(ours(**x, return_dict=False)[0], expected, rtol=1e-5, atol=0)
        assert ops.counts.get("cogvideox::rope3d") == 2 * ref.config.num_layers
        assert torch.equal(ema(**x, return_dict=False)[0], expected)


def test_tables_are_checked_once_per_pair(monkeypatch):
    """The same (cos, sin) at every sampling step: compared once; new tables, or tables written in place, again."""
    import cogvideox.diffusers_ops as ops_mod
    calls = []
    match = ops_mod._match_positions
    monkeypatch.setattr(ops_mod, "_match_positions", lambda *a: calls.append(1) or match(*a))
    ref, ours = patched_pair("5b")
    x = inputs(ref, SHAPES["5b"])
    with torch.no_grad():
        for _ in range(3):
            ours(**x)
        assert len(calls) == 1
        ours(**{**x, "image_rotary_emb": tuple(t.clone() for t in x["image_rotary_emb"])})
        assert len(calls) == 2
        x["image_rotary_emb"][0].mul_(-1)                       # written in place: no longer diffusers' table
        with OpCounter() as counted:
            out = ours(**x, return_dict=False)[0]
        assert len(calls) == 3 and "cogvideox::rope3d" not in counted.counts
        assert_parity(out, ref(**x, return_dict=False)[0], rtol=1e-5, atol=0)


def test_blocks_compile_without_graph_breaks():
    """torch.compile of each patched block traces in one graph (fullgraph=True; Dynamo only, backend "eager": the
    tracing is what the patch can break, inductor's code generation is the kernels' own tests' business)."""
    ref, ours = patched_pair("5b")
    for block in ours.transformer_blocks:
        block.compile(backend="eager", fullgraph=True)
    x = inputs(ref, SHAPES["5b"], seed=14)
    out_r, grads_r = run(ref, x)
    out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)


@pytest.mark.parametrize("family,text_len", [("5b", 1), ("1.5-i2v", 3)])
def test_other_text_lengths(family, text_len):
    """Text shorter than max_text_seq_length (RoPE families accept any): the expert split moves with it."""
    ref, ours = patched_pair(family, seed=12)
    x = inputs(ref, SHAPES[family], seed=15)
    x["encoder_hidden_states"] = x["encoder_hidden_states"][:, :text_len]
    out_r, grads_r = run(ref, x)
    out_o, grads_o = run(ours, x)
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)


def test_dropout_in_training_draws_the_same_masks():
    """dropout > 0 in train mode: the patched block calls diffusers' Dropout modules in diffusers' order on the same
    joint tensors, so one seed gives the same masks and the same result."""
    ref, ours = patched_pair("5b", seed=13, dropout=0.25)
    ref.train(), ours.train()
    x = inputs(ref, SHAPES["5b"], seed=16)
    torch.manual_seed(0)
    out_r, grads_r = run(ref, x)
    torch.manual_seed(0)
    out_o, grads_o = run(ours, x)
    with torch.no_grad():
        torch.manual_seed(1)
        assert (ours(**x, return_dict=False)[0] - out_o).abs().max() > 1e-3     # dropout is really on
    assert_parity(out_o, out_r, rtol=1e-5, atol=0)
    assert_grads(grads_o, grads_r)
