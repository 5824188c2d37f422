"""CogVideoXTransformer against diffusers 0.42.1 CogVideoXTransformer3DModel on tiny configs of every family.

Weights come from a randomized diffusers model written with save_pretrained and read with load_transformer, so
these tests also cover the checkpoint re-layout. diffusers gets the rotary tables its pipelines would build.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import cogvideox.transformer as tr
from cogvideox.config import TRANSFORMER_PRESETS, TransformerConfig
from cogvideox.transformer import CogVideoXTransformer, compile_blocks
from cogvideox.weights import load_transformer
from conftest import assert_parity, max_err
from diffusers_models import diffusers_rotary_emb, save_pretrained, tiny_diffusers_transformer, tiny_transformer_kwargs

FAMILIES = ["2b", "5b", "5b-i2v", "1.5", "1.5-i2v"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """family -> (diffusers model, ours loaded from its save_pretrained directory), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            ref = tiny_diffusers_transformer(family, seed=FAMILIES.index(family))
            path = save_pretrained(ref, tmp_path_factory.mktemp(family))
            cache[family] = ref, load_transformer(path, dtype=torch.float32)
        return cache[family]
    return get


def inputs(model_cfg, shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g).to(dtype)
    text = torch.randn(shape[0], 5, model_cfg.text_embed_dim, generator=g).to(dtype)
    timestep = torch.randint(0, 1000, (shape[0],), generator=g)
    ofs = torch.full((1,), 2.0) if model_cfg.ofs_embed_dim else None
    return latents, text, timestep, ofs


def diffusers_forward(ref, latents, text, timestep, ofs):
    rotary = diffusers_rotary_emb(ref, latents.shape)
    with torch.no_grad():
        return ref(latents, text, timestep, ofs=ofs, image_rotary_emb=rotary, return_dict=False)[0]


# (B, F, C_in, H, W) per family: the training grid (8 x 12 latents, 3 latent frames) and off-grid cases.
NATIVE = {"2b": (2, 3, 4, 8, 12), "5b": (2, 3, 4, 8, 12), "5b-i2v": (2, 3, 8, 8, 12), "1.5": (2, 4, 4, 8, 12),
          "1.5-i2v": (2, 2, 8, 8, 12)}
OFF_GRID = [
    ("2b", (1, 2, 4, 6, 10)),        # sincos table recomputed for another grid
    ("5b", (2, 2, 4, 6, 16)),        # another aspect ratio: fractional RoPE positions (resize-crop region)
    ("5b", (1, 3, 4, 10, 10)),
    ("5b-i2v", (1, 2, 8, 8, 12)),    # frames != sample_frames: diffusers' silent sincos fallback, plus RoPE
    ("1.5", (1, 2, 4, 6, 8)),        # "slice" RoPE grid smaller than the maximum
    ("1.5-i2v", (1, 4, 8, 4, 12)),
]


@pytest.mark.parametrize("family,shape", [(f, NATIVE[f]) for f in FAMILIES] + OFF_GRID)
def test_forward_matches_diffusers_fp32(pair, family, shape):
    ref, ours = pair(family)
    x = inputs(ours.config, shape, seed=len(shape) + shape[1])
    expected = diffusers_forward(ref, *x)
    with torch.no_grad():
        out = ours(*x)
    assert out.shape == shape[:2] + (4,) + shape[3:]
    assert_parity(out, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_bf16_parity(pair, family):
    """ours in bf16 vs diffusers fp32: error <= 2 x (diffusers bf16 vs diffusers fp32) + atol."""
    ref, ours = pair(family)
    x = inputs(ours.config, NATIVE[family], seed=3)
    expected = diffusers_forward(ref, *x)
    x16 = (x[0].bfloat16(), x[1].bfloat16(), x[2], x[3])
    plain = diffusers_forward(tiny_diffusers_transformer(family, seed=FAMILIES.index(family)).bfloat16(), *x16)
    ours16 = CogVideoXTransformer(ours.config, use_kernels=False)
    ours16.load_state_dict(ours.state_dict())
    ours16 = ours16.bfloat16()
    assert {p.dtype for p in ours16.state_dict().values()} == {torch.bfloat16}
    with torch.no_grad():
        out = ours16(*x16)
    assert out.dtype == torch.bfloat16
    assert_parity(out, expected, plain=plain, atol=2e-3)


def test_gradients_match_diffusers(pair):
    """fp32 backward: every parameter's gradient equals diffusers' after the same checkpoint re-layout."""
    from cogvideox.weights import transformer_state_from_diffusers
    ref, ours = pair("5b-i2v")
    latents, text, timestep, _ = inputs(ours.config, (2, 3, 8, 8, 12), seed=5)
    target = torch.randn(2, 3, 4, 8, 12, generator=torch.Generator().manual_seed(6))
    rotary = diffusers_rotary_emb(ref, latents.shape)
    ref.zero_grad()
    ((ref(latents, text, timestep, image_rotary_emb=rotary, return_dict=False)[0] - target) ** 2).mean().backward()
    ours.zero_grad()
    ((ours(latents, text, timestep) - target) ** 2).mean().backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    expected = transformer_state_from_diffusers(ref_grads, dict(ours.named_parameters()), ours.config)
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert_parity(p.grad, expected[name], rtol=1e-4, atol=1e-7, name=name)


@pytest.mark.parametrize("family", ["5b", "1.5-i2v"])
def test_kernels_match_references(pair, triton_kernels, family):
    """use_kernels=True (Triton interpreter via COGVIDEOX_KERNELS=triton) vs the pure-torch references."""
    _, ours = pair(family)
    fused = CogVideoXTransformer(ours.config, use_kernels=True)
    fused.load_state_dict(ours.state_dict())
    ref = CogVideoXTransformer(ours.config, use_kernels=False)
    ref.load_state_dict(ours.state_dict())
    x = inputs(ours.config, (1,) + NATIVE[family][1:], seed=7)
    out_f, out_r = fused(*x), ref(*x)
    assert_parity(out_f, out_r.detach(), rtol=1e-5, atol=1e-6)
    out_f.square().mean().backward()
    out_r.square().mean().backward()
    for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
        assert_parity(pf.grad, pr.grad, rtol=1e-4, atol=1e-7, name=name)


def test_use_kernels_dispatch(monkeypatch):
    """None means references on CPU; True means the public kernel ops."""
    def boom(*a, **k):
        raise RuntimeError("kernel op called")
    monkeypatch.setattr(tr, "KERNEL_OPS", tr.Ops(boom, boom, boom))
    cfg = TransformerConfig.preset("tiny", use_rotary_positional_embeddings=True)
    x = inputs(cfg, (1, 1, 4, 4, 4))
    CogVideoXTransformer(cfg)(*x)
    with pytest.raises(RuntimeError, match="kernel op called"):
        CogVideoXTransformer(cfg, use_kernels=True)(*x)


# ---- config ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("2b", 1.694e9), ("5b", 5.570e9), ("1.5-5b", 5.571e9)])
def test_presets_parameter_count(name, params):
    """Released sizes (reference §1): 1.694 B, 5.570 B, 5.571 B. Built on the meta device: no memory."""
    with torch.device("meta"):
        model = CogVideoXTransformer(TransformerConfig.preset(name))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 1e-3, n


def test_presets_and_diffusers_config():
    assert TransformerConfig.preset("2b") == TransformerConfig()
    assert TransformerConfig.preset("5b-i2v").in_channels == 32
    assert TransformerConfig.preset("1.5-5b-i2v").ofs_embed_dim == 512
    assert set(TRANSFORMER_PRESETS) == {"2b", "5b", "5b-i2v", "1.5-5b", "1.5-5b-i2v", "tiny"}
    with pytest.raises(ValueError, match="unknown transformer preset"):
        TransformerConfig.preset("7b")
    from diffusers import CogVideoXTransformer3DModel
    for family in FAMILIES:
        kwargs = tiny_transformer_kwargs(family)
        cfg = TransformerConfig.from_diffusers_config(dict(CogVideoXTransformer3DModel(**kwargs).config))
        assert all(getattr(cfg, k) == v for k, v in kwargs.items()), family
    with pytest.raises(ValueError, match="unknown key qk_norm"):
        TransformerConfig.from_diffusers_config({"qk_norm": "rms_norm"})
    with pytest.raises(ValueError, match="activation_fn='gelu'"):
        TransformerConfig.from_diffusers_config({"activation_fn": "gelu"})
    with pytest.raises(ValueError, match="multiple of 16"):
        TransformerConfig(attention_head_dim=24)
    with pytest.raises(ValueError, match="must equal time_embed_dim"):
        TransformerConfig(ofs_embed_dim=256)


def test_bad_inputs():
    cfg = TransformerConfig.preset("tiny", patch_size_t=2, ofs_embed_dim=24)
    model = CogVideoXTransformer(cfg)
    latents, text, t, _ = inputs(cfg, (1, 2, 4, 4, 4))
    ofs = torch.tensor([2.0])
    model(latents, text, t, ofs)
    with pytest.raises(ValueError, match="frames before channels"):
        model(latents.transpose(1, 2).contiguous(), text, t, ofs)
    with pytest.raises(ValueError, match="patch_size_t"):
        model(latents[:, :1], text, t, ofs)
    with pytest.raises(ValueError, match="ofs is required"):
        model(latents, text, t)
    with pytest.raises(TypeError, match="dtype"):
        model(latents.double(), text, t, ofs)
    with pytest.raises(ValueError, match="timestep"):
        model(latents, text, torch.tensor([1, 2]), ofs)
    i2v = CogVideoXTransformer(TransformerConfig.preset("tiny", use_rotary_positional_embeddings=True,
                                                        use_learned_positional_embeddings=True))
    with pytest.raises(ValueError, match="learned positional table"):
        i2v(*inputs(i2v.config, (1, 3, 4, 8, 8))[:3])
    with pytest.raises(ValueError, match="attention_layout"):
        CogVideoXTransformer(cfg, attention_layout="2d")


# ---- compile_blocks --------------------------------------------------------------------------------------------

# 1.0 RoPE (5b style): the positions change with the aspect ratio, fractional off the native 8 x 12 (start, step
# per (t, h, w): integers at 8 x 12; h step 4/3, w step 6/5 at 6 x 10; w start 2, steps 0.8, 7/12 at 10 x 8).
# 1.5: integer positions, patch_size_t = 2.
SHAPES_1_0 = [(1, 2, 4, 8, 12), (2, 3, 4, 6, 10), (1, 4, 4, 10, 8)]
COMPILE_CASES = {
    "references-1.0": (False, {}, SHAPES_1_0),
    "kernel-ops-1.0": (True, {}, SHAPES_1_0),
    "kernel-ops-1.5": (True, {"patch_size_t": 2}, [(1, 4, 4, 8, 12), (2, 6, 4, 6, 10), (1, 4, 4, 10, 8)]),
    "kernel-ops-2b": (True, {"use_rotary_positional_embeddings": False}, SHAPES_1_0),   # q/k norm alone
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_blocks_graph_breaks_and_recompiles(case):
    """fullgraph (zero breaks), eager == compiled forward and backward, and <= 1 recompilation over three
    resolutions, frame counts and batch sizes. "kernel-ops" traces the public kernel ops (torch.library custom
    ops, opaque to Dynamo; on CPU they run their references inside) instead of the references. The RoPE
    positions reach the blocks as fp32 tensors, so 1.0's fractional positions, new at each aspect ratio, cost no
    recompilation on either path. (The one recompilation allowed is Dynamo specializing the size-1 dims of the
    first shape.) The Triton kernels themselves under compile: test_rope3d.py."""
    from torch._dynamo.backends.debugging import aot_eager
    use_kernels, overrides, shapes = COMPILE_CASES[case]
    torch._dynamo.reset()
    counters.clear()
    cfg = TransformerConfig.preset("tiny", **{"use_rotary_positional_embeddings": True, "num_layers": 1, **overrides})
    torch.manual_seed(0)
    eager = CogVideoXTransformer(cfg, use_kernels=use_kernels)
    compiled = CogVideoXTransformer(cfg, use_kernels=use_kernels)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, backend=aot_eager)
    for i, shape in enumerate(shapes):
        x = inputs(cfg, shape, seed=i)
        out, expected = compiled(*x), eager(*x)
        assert_parity(out, expected.detach(), rtol=1e-5, atol=1e-6)
        if i == 0:        # backward through the compiled blocks (training)
            out.square().mean().backward()
            expected.square().mean().backward()
            for (name, pc), pe in zip(compiled.named_parameters(), eager.parameters()):
                assert_parity(pc.grad, pe.grad, rtol=1e-4, atol=1e-7, name=name)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, f"{graphs} graphs compiled: more than one recompilation"
    assert set(compiled.state_dict()) == set(eager.state_dict())
    torch._dynamo.reset()


def test_compile_blocks_inductor_matches_eager():
    """The default backend (inductor, C++ on CPU) at one resolution, no grad."""
    torch._dynamo.reset()
    cfg = TransformerConfig.preset("tiny", use_rotary_positional_embeddings=True, patch_size_t=2, num_layers=1)
    torch.manual_seed(1)
    model = CogVideoXTransformer(cfg)
    x = inputs(cfg, (1, 2, 4, 6, 8), seed=2)
    with torch.no_grad():
        expected = model(*x)
        out = compile_blocks(model)(*x)
    assert_parity(out, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ---- attention_layout="2d+1d" ----------------------------------------------------------------------------------

def _layout_model(seed=0):
    from diffusers_models import randomize_
    cfg = TransformerConfig.preset("tiny", use_rotary_positional_embeddings=True)
    torch.manual_seed(seed)
    return randomize_(CogVideoXTransformer(cfg, use_kernels=False, attention_layout="2d+1d"), seed), cfg


def test_2d1d_forward_backward():
    model, cfg = _layout_model()
    assert model.transformer_blocks[0].attn_temporal is not None
    latents, text, t, _ = inputs(cfg, (2, 3, 4, 8, 12))
    latents.requires_grad_(True)
    out = model(latents, text, t)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    # a fresh 2d+1d block starts spatial-only: attn_temporal's output projection is zero
    fresh = CogVideoXTransformer(cfg, attention_layout="2d+1d")
    assert fresh.transformer_blocks[0].attn_temporal.to_out.weight.abs().max() == 0
    # and the 2d+1d model is not the 3d model with extra weights
    plain = CogVideoXTransformer(cfg, use_kernels=False)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "attn_temporal" not in k})
    with torch.no_grad():
        assert max_err(plain(latents, text, t), out) > 1e-3


def _stage_inputs(cfg, seed=0):
    T, Hg, Wg, L = 3, 3, 4, 5
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, L + T * Hg * Wg, cfg.inner_dim, generator=g)
    rope = tr.rope_positions(cfg, (T, Hg, Wg))
    return h, (T, Hg, Wg), L, rope


def test_2d1d_spatial_stage_stays_within_frames():
    model, cfg = _layout_model(1)
    block = model.transformer_blocks[0]
    h, grid, L, rope = _stage_inputs(cfg)
    T, M = grid[0], grid[1] * grid[2]
    base = block.spatial_attention(h, L, grid, rope, tr.REFERENCE_OPS)
    h2 = h.clone()
    h2[:, L + M:L + 2 * M] += torch.randn(2, M, cfg.inner_dim)            # perturb frame 1 only
    out = block.spatial_attention(h2, L, grid, rope, tr.REFERENCE_OPS)
    delta = (out - base).abs().amax(dim=(0, 2))                             # per token
    frame = delta[L:].view(T, M).amax(dim=1)
    assert frame[1] > 1e-3 and frame[0] == 0 and frame[2] == 0, frame      # other frames untouched
    assert delta[:L].min() > 0                                              # text averages over frames
    # the text a frame sees matters to every frame
    h3 = h.clone()
    h3[:, :L] += 1.0
    out3 = block.spatial_attention(h3, L, grid, rope, tr.REFERENCE_OPS)
    assert (out3 - base)[:, L:].abs().view(2, T, M, -1).amax(dim=(0, 2, 3)).min() > 1e-3


def test_2d1d_temporal_stage_stays_within_positions():
    model, cfg = _layout_model(2)
    block = model.transformer_blocks[0]
    h, grid, L, rope = _stage_inputs(cfg)
    T, M = grid[0], grid[1] * grid[2]
    base = block.temporal_attention(h, L, grid, rope, tr.REFERENCE_OPS)
    assert base[:, :L].abs().max() == 0                                     # text rows get nothing
    h2 = h.clone()
    pos = 5                                                                 # spatial position (1, 1) in a 3 x 4 grid
    h2[:, L + pos] += torch.randn(2, cfg.inner_dim)                         # frame 0, position 5
    h2[:, :L] += 1.0                                                        # text: not seen by this stage
    out = block.temporal_attention(h2, L, grid, rope, tr.REFERENCE_OPS)
    delta = (out - base)[:, L:].abs().amax(dim=(0, 2)).view(T, M)
    assert (delta[:, pos] > 1e-3).all(), delta[:, pos]                      # every frame at that position
    others = torch.ones(M, dtype=torch.bool)
    others[pos] = False
    assert delta[:, others].max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feedforward_gelu_epilogue(dtype):
    """FeedForward uses the FC1 GEMM's GELU epilogue (torch._addmm_activation, tanh GELU on CUDA) exactly where it
    may: CUDA inference with a plain Linear and no autocast; anywhere else, and whenever autograd records, the
    unfused Linear + tanh GELU. Either way the output is the unfused one within the parity rule (on the device
    the suite runs on: COGVIDEOX_TEST_DEVICE=cuda checks the epilogue itself)."""
    torch.manual_seed(0)
    ff = tr.FeedForward(64, 0.0).to(dtype)
    h = torch.randn(2, 7, 64, dtype=dtype)
    fc1 = ff.net[0].proj
    with torch.no_grad():
        assert tr._gelu_epilogue(h, fc1) == h.is_cuda
        out = ff(h)
        ref = ff.net[2](torch.nn.functional.gelu(fc1(h), approximate="tanh"))        # in dtype, unfused
        ref32 = ff.float()(h.float())                                                   # fp32 reference
        ff.to(dtype)
    assert_parity(out, ref32, plain=ref, atol=1e-6 if dtype == torch.float32 else 1e-3)
    assert not tr._gelu_epilogue(h, fc1)            # grad mode on and fc1's weight requires grad
    with torch.no_grad(), torch.autocast(h.device.type, dtype=torch.bfloat16):
        assert not tr._gelu_epilogue(h, fc1)
