"""CogVideoXVAE against diffusers 0.42.1's AutoencoderKLCogVideoX (the oracle), on CPU.

The tiny config keeps the released layout's shape rules (channels c, 2c, 2c, 4c with 1x1x1 shortcuts where they
change, two time halvings, 8x spatial); weights are diffusers' random init with every tensor perturbed (GroupNorm's
ones and zeros would hide a wrong weight or bias), saved with save_pretrained and read with load_vae.
"""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity
from diffusers_models import randomize_, save_pretrained

import cogvideox.vae as vae_mod
from cogvideox.config import VAEConfig
from cogvideox.vae import CogVideoXVAE, Tiling, load_vae
from cogvideox.weights import CheckpointError
from kernels import causal_pad3d_ref

diffusers = pytest.importorskip("diffusers", reason="diffusers (the test extra) is the parity oracle")

TINY = VAEConfig.preset("tiny", latent_channels=16)   # the released latent width, which the shapes below use
# A tile that diffusers' algorithm tiles evenly (kept part == stride x 8): 32 px = 4 latents, stride 3 latents.
TILE = dict(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.25,
            tile_overlap_factor_width=0.25)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=TINY.block_out_channels, layers_per_block=TINY.layers_per_block,
        norm_num_groups=TINY.norm_num_groups, latent_channels=TINY.latent_channels,
        sample_height=TINY.sample_height, sample_width=TINY.sample_width).eval()
    randomize_(ref, seed=0)
    return save_pretrained(ref, tmp_path_factory.mktemp("vae")), ref


@pytest.fixture(scope="module")
def ref(ckpt):
    return ckpt[1]


@pytest.fixture(scope="module")
def ours(ckpt):
    return load_vae(ckpt[0])


def ref_set(ref, tiling=False, unchunked=False):
    """diffusers' modes: enable_tiling with TILE; frame batch sizes so large that every frame is one chunk."""
    ref.enable_tiling(**TILE) if tiling else ref.disable_tiling()
    ref.num_sample_frames_batch_size = 10 ** 6 if unchunked else 8
    ref.num_latent_frames_batch_size = 10 ** 6 if unchunked else 2
    return ref


def video(B, T, H, W):
    return torch.rand(B, 3, T, H, W) * 2 - 1


# (batch, frames, height, width): 1, 9, 17 and 49 frames; odd latent sizes (40 -> 5, 24 -> 3).
CASES = [(2, 1, 16, 24), (1, 9, 40, 24), (2, 17, 16, 24), (1, 49, 16, 24)]


@pytest.mark.parametrize("B,T,H,W", CASES)
def test_encode_matches_diffusers(ours, ref, B, T, H, W):
    x = video(B, T, H, W)
    with torch.no_grad():
        dist = ref_set(ref).encode(x).latent_dist
    post = ours.encode(x)
    assert_parity(post.mode(), dist.mode(), name="mean")
    assert_parity(post.logvar, dist.logvar, name="logvar")
    if T == 1:   # sample(): same noise stream as diffusers' randn_tensor, mean + std * noise
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        assert_parity(post.sample(g1), dist.sample(g2), name="sample")


@pytest.mark.parametrize("B,T,H,W", CASES)
def test_decode_matches_diffusers(ours, ref, B, T, H, W):
    F_lat = (T - 1) // 4 + 1
    z = torch.randn(B, 16, F_lat, H // 8, W // 8)
    with torch.no_grad():
        expected = ref_set(ref).decode(z).sample
    out = ours.decode(z)
    assert out.shape == (B, 3, T, H, W)
    assert_parity(out, expected)


def test_logvar_is_clamped():
    post = vae_mod.DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[-100.0, 100.0]]))
    assert post.logvar.tolist() == [[-30.0, 20.0]]


@pytest.fixture(scope="module")
def tiled_ref(ref):
    """diffusers' tiled encode and decode of 40x48 frames in 32x32 tiles (2 x 2 tiles each way), batch 2."""
    x, z = video(2, 9, 40, 48), torch.randn(2, 16, 3, 5, 6)
    try:
        with torch.no_grad():
            return x, ref_set(ref, tiling=True).encode(x).latent_dist.mode(), z, ref.decode(z).sample
    finally:
        ref_set(ref)


@pytest.mark.parametrize("auto", [False, True], ids=["tiling=True", "budget"])
def test_tiled_encode_decode_match_diffusers(ours, tiled_ref, auto):
    """auto: a memory budget too small for one chunk splits the batch and tiles on its own."""
    x, expected_mean, z, expected_video = tiled_ref
    ours.tiling = Tiling(32, 32, 0.25, 0.25)
    try:
        if auto:
            assert ours.plan("decode", z.shape, z.dtype, "cpu", memory_budget=1) == (True, True)
            assert ours.plan("decode", z.shape, z.dtype, "cpu", memory_budget=2 ** 40) == (False, False)
        kw = dict(tiling=None, memory_budget=1) if auto else dict(tiling=True)
        assert_parity(ours.encode(x, **kw).mode(), expected_mean, name="tiled encode")
        assert_parity(ours.decode(z, **kw), expected_video, name="tiled decode")
        if not auto:   # tiling is not a no-op here: the untiled result differs
            assert (ours.decode(z, tiling=False) - expected_video).abs().max() > 1e-3
    finally:
        ours.tiling = Tiling(TINY.sample_height // 2, TINY.sample_width // 2)


def test_uneven_tiling_is_refused(ours):
    ours.tiling = Tiling(16, 16)   # diffusers' algorithm would return 22 rows for 16 here
    try:
        with pytest.raises(ValueError, match="does not tile evenly"):
            ours.decode(torch.randn(1, 16, 1, 2, 3), tiling=True)
    finally:
        ours.tiling = Tiling(TINY.sample_height // 2, TINY.sample_width // 2)


def test_exact_groupnorm_matches_unchunked_diffusers(ours, ref):
    x = video(1, 17, 16, 24)
    with torch.no_grad():
        expected = ref_set(ref, unchunked=True).encode(x).latent_dist.mode()
        z = torch.randn_like(expected)
        expected_video = ref.decode(z).sample
    ref_set(ref)
    assert_parity(ours.encode(x, exact_groupnorm=True).mode(), expected, name="encode")
    assert_parity(ours.decode(z, exact_groupnorm=True), expected_video, name="decode")
    # Chunk statistics are semantic: the default (chunked) result is not the unchunked one.
    assert (ours.decode(z) - expected_video).abs().max() > 1e-3


def per_frame_norm_silu_pad(x, num_groups, weight, bias, eps, kernel_t, cache, pad_hw, zq_scale=None,
                            zq_shift=None, silu=True):
    """group_norm_silu_pad_ref with statistics per frame: then no result depends on where chunks start."""
    B, C, T, H, W = x.shape
    h = F.group_norm(x.transpose(1, 2).reshape(B * T, C, H, W), num_groups, weight, bias, eps)
    h = h.reshape(B, T, C, H, W).transpose(1, 2)
    if zq_scale is not None:
        h = h * zq_scale + zq_shift
    return causal_pad3d_ref(F.silu(h) if silu else h, kernel_t, cache, pad_hw, "first")


def test_chunked_equals_unchunked_with_per_frame_groupnorm(ckpt, monkeypatch):
    """With per-frame statistics, chunking (9, 8 frames; 3, 2 latents) must change nothing: this checks that every
    causal conv's cache carries exactly the frames an unchunked conv would see."""
    vae = load_vae(ckpt[0], use_kernels=False)
    x, z = video(2, 17, 16, 24), torch.randn(2, 16, 5, 2, 3)
    chunked_true_gn = vae.decode(z)
    monkeypatch.setattr(vae_mod, "group_norm_silu_pad_ref", per_frame_norm_silu_pad)
    assert_parity(vae.encode(x).mode(), vae.encode(x, exact_groupnorm=True).mode(), name="encode")
    chunked = vae.decode(z)
    assert_parity(chunked, vae.decode(z, exact_groupnorm=True), name="decode")
    assert (chunked - chunked_true_gn).abs().max() > 1e-3   # the per-frame norm really ran


def test_grad_in_eval_mode(ckpt):
    """eval (load_vae's default) means no dropout, not no autograd: under no_grad no graph; otherwise gradients
    reach every weight and, through the causal conv caches alone, from the second chunk's frames (9:17) back to
    the first chunk's latents (0:3)."""
    vae, z = load_vae(ckpt[0]), torch.randn(1, 16, 5, 1, 2, requires_grad=True)
    with torch.no_grad():
        assert not vae.decode(z).requires_grad
    assert not vae.training
    vae.decode(z)[:, :, 9:].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.decoder.parameters())
    assert z.grad[:, :, :3].abs().sum() > 0


def test_conv_time_split_is_exact(ours, monkeypatch):
    """Convs on inputs above the split size run in overlapping time parts (needed at 768x1360 on GPU)."""
    z = torch.randn(1, 16, 3, 2, 3)
    expected = ours.decode(z)
    monkeypatch.setattr(vae_mod, "_CONV_SPLIT_NUMEL", 40_000)   # 2 to 5 parts at full resolution
    assert_parity(ours.decode(z), expected)


def test_triton_kernels_match_reference(triton_kernels):
    """use_kernels=True runs kernels.causal_pad3d / group_norm_silu_pad (Triton, in the interpreter here: about 50 ms
    per (b, c, t) frame and launch, so a 2-block, 4-to-8-channel VAE keeps this test short)."""
    torch.manual_seed(0)
    cfg = VAEConfig(block_out_channels=(4, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
                    temporal_compression_ratio=2)
    vae = randomize_(CogVideoXVAE(cfg, use_kernels=False).eval())
    z = torch.randn(1, 4, 4, 2, 2)   # two chunks of 2 latents: the caches go through the kernels too
    expected = vae.decode(z)
    vae.use_kernels = True
    assert_parity(vae.decode(z), expected)


def test_bf16_decode_parity_rule(ckpt, ref):
    """bf16: error vs the fp32 oracle <= 2 x diffusers' own bf16 error (the house rule)."""
    z = torch.randn(1, 16, 3, 2, 3)
    with torch.no_grad():
        expected = ref_set(ref).decode(z).sample
        plain = ref.to(torch.bfloat16).decode(z.bfloat16()).sample
    ref.float()
    vae = load_vae(ckpt[0], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())
    out = vae.decode(z)   # fp32 latents are cast to the VAE's dtype
    assert out.dtype == torch.bfloat16
    assert_parity(out, expected, plain, atol=1e-2)


def test_released_config_on_meta():
    """The released VAE at CogVideoX1.5's 768x1360: parameter count, shapes, and the memory plan."""
    with torch.device("meta"):
        vae = CogVideoXVAE(VAEConfig.preset("released")).to(torch.bfloat16).eval()
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 215.6   # reference doc §1
    # diffusers' default tiles (reference doc §4.5): tile, stride, blend extent, kept part.
    assert vae.tile_grid("decode") == ((30, 45), (25, 36), (40, 72), (200, 288))
    assert vae.tile_grid("encode") == ((240, 360), (200, 288), (5, 9), (25, 36))
    z = torch.empty(1, 16, 13, 96, 170, device="meta", dtype=torch.bfloat16)
    assert vae.decode(z, tiling=False).shape == (1, 3, 49, 768, 1360)
    GiB = 2 ** 30
    need = vae.activation_bytes("decode", z.shape, z.dtype)
    assert 20 * GiB < need < 60 * GiB   # widest activation 256 x 9 x 768 x 1360 bf16 = 4.5 GiB
    assert vae.plan("decode", z.shape, z.dtype, "cuda", memory_budget=70 * GiB) == (False, False)
    assert vae.plan("decode", z.shape, z.dtype, "cuda", memory_budget=16 * GiB) == (False, True)
    assert vae.plan("decode", (2, *z.shape[1:]), z.dtype, "cuda", memory_budget=70 * GiB) == (True, False)
    assert vae.plan("decode", z.shape, z.dtype, "cuda", tiling=False, memory_budget=1) == (False, False)
    # exact_groupnorm holds all 13 latents' frames at once: far more memory, so it tiles where chunks did not.
    assert vae.plan("decode", z.shape, z.dtype, "cuda", memory_budget=70 * GiB, exact_groupnorm=True)[1]


def test_bad_inputs(ours):
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(video(1, 1, 20, 24))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        ours.encode(torch.rand(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 16, T, H, W\)"):
        ours.decode(torch.randn(16, 1, 2, 3))
    with pytest.raises(ValueError, match="empty"):
        ours.decode(torch.randn(1, 16, 0, 2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        ours.decode(torch.zeros(1, 16, 1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="preset"):
        VAEConfig.preset("huge")
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(16, 24, 32, 64), norm_num_groups=16)


def _broken_copy(ckpt, tmp_path, edit):
    from safetensors.torch import load_file, save_file
    src = ckpt[0]
    tmp_path.mkdir()
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    state = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return str(tmp_path)


def test_checkpoint_errors(ckpt, tmp_path):
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    path = _broken_copy(ckpt, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=f"missing keys \\(1\\): {key}"):
        load_vae(path)

    path = _broken_copy(ckpt, tmp_path / "shape", lambda s: s.update({key: torch.zeros(3, 3, 1, 1, 1)}))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_vae(path)

    path = _broken_copy(ckpt, tmp_path / "extra", lambda s: s.update({"encoder.quant.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\): encoder.quant.weight"):
        load_vae(path)

    trunc = tmp_path / "truncated"
    shutil.copytree(ckpt[0], trunc)
    file = trunc / "diffusion_pytorch_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_vae(str(trunc))

    quant = tmp_path / "quant"
    shutil.copytree(ckpt[0], quant)
    cfg = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps({**cfg, "use_quant_conv": True}))
    with pytest.raises(CheckpointError, match="use_quant_conv=True"):
        load_vae(str(quant))

    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(str(tmp_path / "nowhere"))


def test_default_budget_is_free_cuda_memory(ours, monkeypatch):
    """The CUDA branch of free_memory (never run on CPU CI), mocked: free device memory plus PyTorch's cached,
    unused blocks is the default budget, and plan() splits the batch, then tiles, as that budget shrinks."""
    GiB = 2 ** 30
    state = {"free": 3 * GiB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * GiB)
    assert vae_mod.free_memory(torch.device("cuda", 0)) == 4 * GiB   # 3 free + (5 reserved - 4 allocated)
    shape = (2, 16, 3, 64, 64)   # frames larger than the default tile
    need = ours.activation_bytes("decode", shape, torch.bfloat16)
    for free, expected in [(10 * need, (False, False)), (need * 3 // 4, (True, False)), (need // 4, (True, True))]:
        state["free"] = free - GiB   # + 1 GiB of cached blocks
        assert ours.plan("decode", shape, torch.bfloat16, "cuda:0") == expected, free / need


def test_sample_draws_like_randn_tensor(monkeypatch):
    """sample() = mean + std * noise, the noise drawn by scheduler.randn (diffusers' randn_tensor device rule) for
    the mean's device and dtype with the caller's generator."""
    mean, logvar = torch.randn(1, 2, 1, 2, 2), torch.randn(1, 2, 1, 2, 2)
    post = vae_mod.DiagonalGaussian(mean, logvar)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(post.sample(torch.Generator().manual_seed(3)), mean + torch.exp(0.5 * logvar) * noise)
    calls = []
    monkeypatch.setattr(vae_mod, "randn", lambda shape, g, device, dtype: calls.append((g, device, dtype)) or
                        torch.zeros(shape))
    g = torch.Generator()
    assert torch.equal(post.sample(g), mean)
    assert calls == [(g, mean.device, mean.dtype)]


def test_use_kernels_none_means_references_on_cpu(ckpt, monkeypatch):
    """As in CogVideoXTransformer: None = kernels on CUDA, references on CPU; True = the kernels ops."""
    def boom(*a, **k):
        raise RuntimeError("kernel op called")
    monkeypatch.setattr(vae_mod, "causal_pad3d", boom)
    monkeypatch.setattr(vae_mod, "group_norm_silu_pad", boom)
    z = torch.randn(1, 16, 1, 1, 2)
    with torch.no_grad():
        load_vae(ckpt[0]).decode(z)
        with pytest.raises(RuntimeError, match="kernel op called"):
            load_vae(ckpt[0], use_kernels=True).decode(z)
