"""Training utilities (cogvideox/training.py), activation checkpointing, autocast, and the train commands."""
import contextlib
import functools
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from cogvideox import scheduler, training
from cogvideox.config import TransformerConfig
from cogvideox.transformer import CogVideoXTransformer
from conftest import assert_parity
from diffusers_models import randomize_

TABLE = scheduler.alphas_cumprod(3.0)


def _tensors(seed=0, shape=(3, 2, 4, 2, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


# ---- losses ------------------------------------------------------------------------------------------------------

def test_cogvideox_loss_by_hand():
    """Element by element in Python floats: x0_hat = sqrt(a) x_t - sqrt(1-a) v, w = 1/(1-a), mean per sample."""
    pred, x0, noise = _tensors()
    t = torch.tensor([0, 417, 999])
    x_t = scheduler.add_noise(TABLE, x0, noise, t)
    per_sample = []
    for b in range(3):
        a = TABLE[int(t[b])].item()
        terms = [(math.sqrt(a) * xt - math.sqrt(1 - a) * v - c) ** 2 / (1 - a)
                 for xt, v, c in zip(x_t[b].flatten().tolist(), pred[b].flatten().tolist(), x0[b].flatten().tolist())]
        per_sample.append(sum(terms) / len(terms))
    expected = sum(per_sample) / 3
    got = training.cogvideox_loss(TABLE, pred.float(), x0.float(), x_t.float(), t)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(got.item() - expected) <= 1e-5 * expected


def test_v_mse_by_hand_and_equal_to_the_weighted_x0_loss():
    pred, x0, noise = _tensors(1)
    t = torch.tensor([5, 500, 998])
    terms = []
    for b in range(3):
        a = TABLE[int(t[b])].item()
        terms += [(p - (math.sqrt(a) * n - math.sqrt(1 - a) * c)) ** 2
                  for p, n, c in zip(pred[b].flatten().tolist(), noise[b].flatten().tolist(), x0[b].flatten().tolist())]
    expected = sum(terms) / len(terms)
    got = training.v_mse_loss(TABLE, pred.float(), x0.float(), noise.float(), t)
    assert abs(got.item() - expected) <= 1e-5 * expected
    # x0_hat - x0 = -sqrt(1 - a) (v_hat - v): the 1/(1-a) weight makes the CogVideoX loss the v-MSE (equal sizes
    # per sample, so the mean of means is the mean)
    x_t = scheduler.add_noise(TABLE, x0, noise, t)
    weighted = training.cogvideox_loss(TABLE, pred.float(), x0.float(), x_t.float(), t)
    assert abs(weighted.item() - expected) <= 1e-4 * expected


def test_x0_from_v_inverts_add_noise():
    _, x0, noise = _tensors(2)
    t = torch.tensor([1, 300, 999])
    x_t = scheduler.add_noise(TABLE, x0, noise, t)
    v = scheduler.v_target(TABLE, x0, noise, t)
    torch.testing.assert_close(training.x0_from_v(TABLE, x_t, v, t).double(), x0, rtol=1e-5, atol=1e-5)


def test_loss_bad_input():
    pred, x0, noise = _tensors()
    with pytest.raises(ValueError, match="t must be"):
        training.v_mse_loss(TABLE, pred, x0, noise, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t must lie"):
        training.v_mse_loss(TABLE, pred, x0, noise, torch.tensor([0, 1, 1000]))
    with pytest.raises(TypeError, match="t must be"):
        training.v_mse_loss(TABLE, pred, x0, noise, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="pred"):
        training.cogvideox_loss(TABLE, pred[:2], x0, x0, torch.tensor([0, 1, 2]))


# ---- timestep sampling -------------------------------------------------------------------------------------------

def test_explicit_uniform_intervals_tile_the_range():
    for n in (1, 3, 7, 8):
        spans = [training.timestep_interval(r, n) for r in range(n)]
        assert spans[0][0] == 0 and spans[-1][1] == 1000
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1
    assert training.timestep_interval(2, 8) == (250, 375)


def test_explicit_uniform_draws_inside_the_interval_and_covers_it():
    g = torch.Generator().manual_seed(0)
    t = training.explicit_uniform_timesteps(4000, rank=3, world_size=8, generator=g)
    assert t.dtype == torch.int64 and t.shape == (4000,)
    assert int(t.min()) == 375 and int(t.max()) == 499          # 125 values, 4000 draws: every one appears
    counts = torch.bincount(t - 375, minlength=125).double()
    assert counts.min() > 0 and counts.std() / counts.mean() < 0.3
    # seedable: the same generator state gives the same draws
    a = training.explicit_uniform_timesteps(16, 1, 4, torch.Generator().manual_seed(5))
    b = training.explicit_uniform_timesteps(16, 1, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_uniform_timesteps():
    t = training.uniform_timesteps(5000, torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    assert 400 < t.double().mean() < 600
    with pytest.raises(ValueError, match="rank"):
        training.explicit_uniform_timesteps(2, rank=4, world_size=4)
    with pytest.raises(ValueError, match="world_size"):
        training.explicit_uniform_timesteps(2, rank=0, world_size=0)


# ---- train_step --------------------------------------------------------------------------------------------------

def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = TransformerConfig.preset("tiny", **overrides)
    return randomize_(CogVideoXTransformer(cfg, use_kernels=False), seed).train(), cfg


def tiny_batch(cfg, seed=0, B=2, frames=2, h=4, w=6):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(B, frames, cfg.in_channels, h, w, generator=g),
            "prompt_embeds": torch.randn(B, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)}


def test_train_step_matches_a_hand_written_step():
    """train_step = noise + add_noise + forward + loss + backward + clip + step, with the generator's draws."""
    model, cfg = tiny_model()
    twin, _ = tiny_model()
    batch = tiny_batch(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    res = training.train_step(model, batch, opt, TABLE, generator=torch.Generator().manual_seed(7), max_grad_norm=0.5)

    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn(batch["latents"].shape, generator=g)
    x_t = scheduler.add_noise(TABLE, batch["latents"], noise, t)
    pred = twin(x_t, batch["prompt_embeds"], t)
    loss = training.cogvideox_loss(TABLE, pred, batch["latents"], x_t, t)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    opt2.step()
    assert torch.equal(res.timesteps, t) and res.loss == loss.item() and res.grad_norm == norm.item()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_train_steps_lower_the_loss():
    model, cfg = tiny_model(1)
    batch = tiny_batch(cfg, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = functools.partial(training.explicit_uniform_timesteps, rank=0, world_size=1)
    # a fixed generator state per step: the same t and noise, so the loss curve measures fitting alone
    losses = [training.train_step(model, batch, opt, TABLE, generator=torch.Generator().manual_seed(3),
                                  sample_timesteps=sampler, loss="v-mse").loss for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses


# ---- activation checkpointing --------------------------------------------------------------------------------

def _grads(model, batch, t, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)                               # the dropout masks
    out = model(batch["latents"], batch["prompt_embeds"], t)
    (out.square().mean() + out.mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("overrides", [{}, {"use_rotary_positional_embeddings": True, "dropout": 0.2}],
                         ids=["2b", "5b-dropout"])
def test_checkpointing_is_exact(every, overrides):
    """Bitwise: the same output and every gradient, with dropout too (checkpoint replays the RNG state)."""
    model, cfg = tiny_model(2, num_layers=3, **overrides)
    batch, t = tiny_batch(cfg, 2), torch.tensor([10, 900])
    out0, g0 = _grads(model, batch, t)
    model.checkpointing = every
    out1, g1 = _grads(model, batch, t)
    assert torch.equal(out0, out1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)


def test_checkpointing_kernels(triton_kernels):
    """The Triton kernels' custom autograd under recomputation (interpreter; one block, small grid)."""
    model, cfg = tiny_model(3, num_layers=1, use_rotary_positional_embeddings=True)
    model.use_kernels = True
    batch, t = tiny_batch(cfg, 3, B=1, frames=1, h=2, w=4), torch.tensor([500])
    out0, g0 = _grads(model, batch, t)
    model.checkpointing = 1
    out1, g1 = _grads(model, batch, t)
    assert torch.equal(out0, out1) and all(torch.equal(g0[n], g1[n]) for n in g0)


def test_checkpointing_recomputes_and_validates(monkeypatch):
    import cogvideox.transformer as tr
    calls = []
    monkeypatch.setattr(tr, "checkpoint", lambda fn, *a, **k: calls.append(k) or fn(*a))
    model, cfg = tiny_model(0, num_layers=4)
    model.checkpointing = 3
    batch = tiny_batch(cfg)
    model(batch["latents"], batch["prompt_embeds"], torch.tensor([1, 2]))
    assert calls == [{"use_reentrant": False}] * 2               # blocks 0 and 3
    with torch.no_grad():                                        # no graph, nothing to checkpoint
        model(batch["latents"], batch["prompt_embeds"], torch.tensor([1, 2]))
    assert len(calls) == 2
    with pytest.raises(ValueError, match="checkpointing"):
        CogVideoXTransformer(cfg, checkpointing=-1)


# ---- autocast ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def cuda_like_autocast(dtype=torch.bfloat16):
    """torch.autocast("cpu") with CUDA's policy for layer_norm: CPU autocast leaves layer_norm in the input dtype
    (checked: bf16 in, bf16 out), CUDA's lists it among the fp32 ops (inputs upcast, fp32 out). nn.LayerNorm and
    the kernels' references call torch.nn.functional.layer_norm, so patching that one function is enough."""
    plain = F.layer_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if not torch.is_autocast_enabled("cpu"):
            return plain(x, shape, weight, bias, eps)
        with torch.autocast("cpu", enabled=False):
            return plain(x.float(), shape, None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)

    with mock.patch.object(F, "layer_norm", layer_norm), torch.autocast("cpu", dtype=dtype):
        yield


def test_cuda_like_autocast_helper():
    lin, ln = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    with cuda_like_autocast():
        h = lin(torch.randn(2, 8))
        assert h.dtype == torch.bfloat16 and ln(h).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ln(lin(torch.randn(2, 8))).dtype == torch.bfloat16   # why the helper exists


def _autocast_case(family, tmp_path, shape):
    from cogvideox.weights import load_transformer
    from diffusers_models import diffusers_rotary_emb, save_pretrained, tiny_diffusers_transformer

    ref = tiny_diffusers_transformer(family, seed=4)
    ours = load_transformer(save_pretrained(ref, tmp_path / family), dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(shape, generator=g)
    text, t = torch.randn(shape[0], 5, 24, generator=g), torch.tensor([700] * shape[0])
    rotary = diffusers_rotary_emb(ref, shape)

    def run(model, autocast, diffusers):
        x = latents.clone().requires_grad_(True)
        with cuda_like_autocast() if autocast else contextlib.nullcontext():
            out = (model(x, text, t, image_rotary_emb=rotary, return_dict=False)[0] if diffusers
                   else model(x, text, t))
        out.float().square().mean().backward()
        return out.detach().float(), x.grad
    return ours, ref, run


@pytest.mark.parametrize("family", ["2b", "5b"])
def test_autocast_matches_diffusers(family, tmp_path):
    """fp32 weights under bf16 autocast with fp32 LayerNorms (CUDA's policy): ours used to fail (2B: q, k, v must
    share dtype; 5B kernels: shift bf16 vs x fp32). Output and input gradient within 2 x diffusers' own autocast
    error vs fp32 (house rule)."""
    ours, ref, run = _autocast_case(family, tmp_path, (2, 3, 4, 8, 12))
    expected, expected_grad = run(ref, False, True)
    plain, plain_grad = run(ref, True, True)
    out, grad = run(ours, True, False)
    assert_parity(out.bfloat16(), expected, plain.bfloat16(), atol=1e-3)
    assert_parity(grad.bfloat16(), expected_grad, plain_grad.bfloat16(), atol=1e-5, name="d latents")


def test_autocast_kernels(triton_kernels, tmp_path):
    """The 5B kernel path (expert_adaln on the fp32 norm_final output) under the same autocast."""
    ours, ref, run = _autocast_case("5b", tmp_path, (1, 1, 4, 2, 4))
    ours.use_kernels = True
    expected, expected_grad = run(ref, False, True)
    plain, plain_grad = run(ref, True, True)
    out, grad = run(ours, True, False)
    assert_parity(out.bfloat16(), expected, plain.bfloat16(), atol=1e-3)
    assert_parity(grad.bfloat16(), expected_grad, plain_grad.bfloat16(), atol=1e-5, name="d latents")


# ---- diffusers-format export ---------------------------------------------------------------------------------

EXPORT_FAMILIES = {"2b": {}, "5b": {"use_rotary_positional_embeddings": True},
                   "5b-i2v": {"use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True,
                              "in_channels": 8},
                   "1.5": {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "patch_bias": False}}


@pytest.mark.parametrize("family", sorted(EXPORT_FAMILIES))
def test_save_transformer_loads_in_diffusers_and_back(family, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    from cogvideox.export import save_transformer
    from cogvideox.weights import load_transformer
    from diffusers_models import diffusers_rotary_emb

    model, cfg = tiny_model(5, **EXPORT_FAMILIES[family])
    model.eval()
    path = save_transformer(model, tmp_path / "transformer")
    back = load_transformer(path)
    assert back.config == cfg
    theirs_state, ours_state = back.state_dict(), model.state_dict()
    assert theirs_state.keys() == ours_state.keys()
    assert all(torch.equal(theirs_state[k], ours_state[k]) for k in ours_state)

    ref = CogVideoXTransformer3DModel.from_pretrained(path).eval()    # strict: no missing / unexpected key
    shape = (2, 4 if cfg.patch_size_t else 3, cfg.in_channels, 8, 12)
    g = torch.Generator().manual_seed(5)
    x, text, t = torch.randn(shape, generator=g), torch.randn(2, 5, 24, generator=g), torch.tensor([3, 811])
    with torch.no_grad():
        expected = ref(x, text, t, image_rotary_emb=diffusers_rotary_emb(ref, shape), return_dict=False)[0]
        assert_parity(model(x, text, t), expected, rtol=1e-5, atol=0)


def test_save_transformer_rejects_2d1d_and_non_models(tmp_path):
    from cogvideox.export import save_transformer

    cfg = TransformerConfig.preset("tiny")
    with pytest.raises(ValueError, match="2d\\+1d"):
        save_transformer(CogVideoXTransformer(cfg, attention_layout="2d+1d"), tmp_path)
    with pytest.raises(TypeError, match="CogVideoXTransformer"):
        save_transformer(torch.nn.Linear(2, 2), tmp_path)


def test_save_vae_round_trip(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    from cogvideox.config import VAEConfig
    from cogvideox.export import save_vae
    from cogvideox.vae import CogVideoXVAE, load_vae

    vae = randomize_(CogVideoXVAE(VAEConfig.preset("tiny", latent_channels=4)), 0)
    path = save_vae(vae, tmp_path / "vae")
    back = load_vae(path)
    assert back.config == vae.config and all(torch.equal(a, b) for a, b in
                                             zip(back.state_dict().values(), vae.state_dict().values()))
    ref = AutoencoderKLCogVideoX.from_pretrained(path)
    theirs = ref.state_dict()
    assert theirs.keys() == vae.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in vae.state_dict().items())


# ---- python -m cogvideox train / encode-dataset ----------------------------------------------------------------

def make_dataset(directory, n=3, seed=0, frames=2, h=4, w=6, channels=4, L=5, D=24, prefix="clip", image=False):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        sample = {"latents": torch.randn(frames, channels, h, w, generator=g),
                  "prompt_embeds": torch.randn(L, D, generator=g)}
        if image:   # as encode-dataset --i2v: one noisy frame of the clip
            sample["image_latents"] = sample["latents"][:1] + 0.05 * torch.randn(1, channels, h, w, generator=g)
        save_file(sample, str(directory / f"{prefix}{i}.safetensors"))
    return directory


def _cli(*argv):
    from cogvideox.__main__ import main
    return main([str(a) for a in argv])


def _eval_loss(model, data_dir):
    """A fixed-noise, fixed-timestep v-MSE over the data set: the fit, free of the training draws' variance."""
    from cogvideox.train_cli import LatentDataset

    i2v = model.config.in_channels == 2 * model.config.out_channels
    data = LatentDataset(str(data_dir), image=i2v)
    batch = data.batch(range(len(data)))
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (len(data),), generator=g)
    noise = torch.randn(batch["latents"].shape, generator=g)
    x_t = scheduler.add_noise(TABLE, batch["latents"], noise, t)
    if i2v:      # [noisy | image, zero frames], no image dropout
        x_t = torch.cat([x_t, training.image_condition(batch["image_latents"], x_t.shape[1])], dim=2)
    with torch.no_grad():
        return training.v_mse_loss(TABLE, model(x_t, batch["prompt_embeds"], t), batch["latents"], noise, t).item()


TRAIN = ("train", "--preset", "tiny", "--random-init", "--lr", "3e-3", "--seed", "1", "--no-progress")


def test_train_cli_fits_saves_for_diffusers_and_resumes_bit_exactly(tmp_path):
    import json

    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    from cogvideox.weights import load_transformer

    data = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert _cli(*TRAIN, "--data", data, "--out", run, "--steps", 12, "--save-every", 6, "--batch-size", 1,
                "--checkpointing", 1) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in log)
    torch.manual_seed(1)
    initial = CogVideoXTransformer(TransformerConfig.preset("tiny"))
    trained = load_transformer(str(run / "checkpoint-000012" / "transformer"))
    before, after = _eval_loss(initial, data), _eval_loss(trained, data)
    assert after < 0.9 * before, (before, after)      # measured: 1.32 -> 1.09 (fixed-noise v-MSE)

    # diffusers loads the checkpoint and computes what we compute
    ref = CogVideoXTransformer3DModel.from_pretrained(str(run / "checkpoint-000012" / "transformer")).eval()
    x, text, t = torch.randn(1, 2, 4, 4, 6), torch.randn(1, 5, 24), torch.tensor([250])
    with torch.no_grad():
        assert_parity(trained(x, text, t), ref(x, text, t, return_dict=False)[0], rtol=1e-5, atol=0)

    # resume from step 6 in another directory: the same steps 7..12, bit for bit
    resumed = tmp_path / "resumed"
    assert _cli(*TRAIN, "--data", data, "--out", resumed, "--steps", 12, "--checkpointing", 1,
                "--resume", run / "checkpoint-000006") == 0
    log2 = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in log2] == strip[6:]
    a = load_file(str(run / "checkpoint-000012" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "checkpoint-000012" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --resume latest: the newest checkpoint in --out, the log continues
    assert _cli(*TRAIN, "--data", data, "--out", run, "--steps", 13, "--resume", "latest") == 0
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()][-2:] == [12, 13]


def _assert_resumed_bit_exactly(run, resumed, log, resumed_at, steps):
    """The resumed run's log equals the original's from step resumed_at + 1 on (timings aside), and the final
    checkpoints' weights are bitwise equal."""
    import json

    from safetensors.torch import load_file

    log2 = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert ([{k: v for k, v in r.items() if k != "seconds"} for r in log2]
            == [{k: v for k, v in r.items() if k != "seconds"} for r in log[resumed_at:]])
    name = f"checkpoint-{steps:06d}/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(run / name)), load_file(str(resumed / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli_stages_and_buckets_resume_bit_exactly(tmp_path, capsys):
    """Two latents shapes (32x48 pixels, 5 frames; 64x96, 9 frames) under --stages: stage 0 trains on the small
    bucket only, stage 1 on both; log.jsonl names each step's stage and shape; a resume from step 2 (inside stage
    0) reproduces steps 3..6 across the stage boundary, log and weights bit for bit."""
    import json


    data = make_dataset(tmp_path / "data", n=4)
    make_dataset(data, n=2, seed=1, frames=3, h=8, w=12, prefix="big")
    flags = (*TRAIN, "--data", data, "--batch-size", 2, "--stages", "3:32x48x5,3:64x96x9", "--steps", 6)
    assert _cli(*flags, "--out", tmp_path / "run", "--save-every", 2) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 0, 0, 1, 1, 1]
    assert all(r["shape"] == [2, 4, 4, 6] for r in log[:3])
    # stage 1's first epoch: the small bucket's 2 batches and the big bucket's 1, in a seeded order
    assert sorted(tuple(r["shape"]) for r in log[3:]) == [(2, 4, 4, 6), (2, 4, 4, 6), (3, 4, 8, 12)]
    assert all(len(r["timesteps"]) == 2 and math.isfinite(r["loss"]) for r in log)

    assert _cli(*flags, "--out", tmp_path / "resumed", "--resume", tmp_path / "run" / "checkpoint-000002") == 0
    _assert_resumed_bit_exactly(tmp_path / "run", tmp_path / "resumed", log, resumed_at=2, steps=6)
    # another schedule would be another data order: refused
    assert _cli(*TRAIN, "--data", data, "--batch-size", 2, "--stages", "2:32x48x5,4:64x96x9", "--steps", 6,
                "--out", tmp_path / "other", "--resume", tmp_path / "run" / "checkpoint-000002") == 1
    assert "data order" in capsys.readouterr().err


def test_train_cli_pack_mixes_shapes_in_one_step_and_resumes(tmp_path):
    """--pack (multi-resolution frame packing): every step's batch mixes the two latents shapes and texts of two
    lengths in one packed sequence; the loss is finite; a resume reproduces the run bit for bit."""
    import json


    data = make_dataset(tmp_path / "data", n=2)
    make_dataset(data, n=2, seed=1, frames=3, h=8, w=12, L=3, prefix="big")
    flags = (*TRAIN, "--data", data, "--batch-size", 4, "--pack", "--steps", 3)
    assert _cli(*flags, "--out", tmp_path / "run", "--save-every", 1) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    for r in log:
        assert sorted(map(tuple, r["shape"])) == [(2, 4, 4, 6)] * 2 + [(3, 4, 8, 12)] * 2   # the whole set a step
        assert len(r["timesteps"]) == 4 and math.isfinite(r["loss"])
    assert _cli(*flags, "--out", tmp_path / "resumed", "--resume", tmp_path / "run" / "checkpoint-000001") == 0
    _assert_resumed_bit_exactly(tmp_path / "run", tmp_path / "resumed", log, resumed_at=1, steps=3)


@pytest.mark.parametrize("flags", [("--autocast", "bf16"), ("--dtype", "bf16"), ("--loss", "v-mse", "--timesteps",
                                                                          "uniform", "--warmup-steps", "2")])
def test_train_cli_precision_and_options(tmp_path, flags):
    import json

    data = make_dataset(tmp_path / "data", n=2)
    assert _cli(*TRAIN, "--data", data, "--out", tmp_path / "run", "--steps", 2, *flags) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    if "--warmup-steps" in flags:
        assert [r["lr"] for r in log] == [1.5e-3, 3e-3]
    if "--dtype" in flags:
        from safetensors.torch import load_file
        state = load_file(str(tmp_path / "run" / "checkpoint-000002" / "transformer" /
                              "diffusion_pytorch_model.safetensors"))
        assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_train_cli_lora_exports_merged_and_resumes(tmp_path):
    """--lora-rank: only adapters train; transformer/ holds the merged model (diffusers loads it and computes what
    our adapted model computes); resume from step 2 reproduces step 4's adapters bit for bit."""
    pytest.importorskip("peft", reason="peft (the 'train' extra) is not installed")
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    data = make_dataset(tmp_path / "data", n=2)
    run = tmp_path / "run"
    assert _cli(*TRAIN, "--data", data, "--out", run, "--steps", 4, "--save-every", 2, "--lora-rank", 4) == 0
    adapters = load_file(str(run / "checkpoint-000004" / "lora.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    torch.manual_seed(1)
    ours = CogVideoXTransformer(TransformerConfig.preset("tiny"))
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    training.add_lora(ours, rank=4)
    ours.load_state_dict(adapters, strict=False)
    ours.eval()
    ref = CogVideoXTransformer3DModel.from_pretrained(str(run / "checkpoint-000004" / "transformer")).eval()
    x, text, t = torch.randn(1, 2, 4, 4, 6), torch.randn(1, 5, 24), torch.tensor([250])
    with torch.no_grad():
        assert_parity(ref(x, text, t, return_dict=False)[0], ours(x, text, t), rtol=1e-5, atol=1e-7)
    merged = training.merged_state(ours)
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(".to_qkv.weight" in k or ".to_out.weight" in k for k in changed)

    assert _cli(*TRAIN, "--data", data, "--out", tmp_path / "resumed", "--steps", 4, "--lora-rank", 4,
                "--resume", run / "checkpoint-000002") == 0
    again = load_file(str(tmp_path / "resumed" / "checkpoint-000004" / "lora.safetensors"))
    assert again.keys() == adapters.keys() and all(torch.equal(again[k], adapters[k]) for k in adapters)


def test_train_cli_bad_arguments(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", n=1)
    with pytest.raises(SystemExit):
        _cli("train", "--data", data, "--out", tmp_path / "r")                       # no model
    assert "--model DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(*TRAIN, "--data", data, "--out", tmp_path / "r", "--resume", "latest")
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(*TRAIN, "--data", tmp_path / "nothing", "--out", tmp_path / "r", "--steps", 1)
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(*TRAIN, "--data", data, "--out", tmp_path / "r", "--fsdp")
    assert "torchrun" in capsys.readouterr().err
    from cogvideox.export import save_transformer
    i2v = save_transformer(CogVideoXTransformer(TransformerConfig.preset("tiny", in_channels=8)), tmp_path / "i2v")
    with pytest.raises(SystemExit):
        _cli("train", "--model", i2v, "--data", data, "--out", tmp_path / "r")
    err = capsys.readouterr().err
    assert "image_latents" in err and "encode-dataset --i2v" in err
    for spec, message in (("3:32x48", "STEPS:HEIGHTxWIDTHxFRAMES"), ("0:32x48x5", "steps"),
                          ("3:32x48x6", "4k + 1")):
        with pytest.raises(SystemExit):
            _cli(*TRAIN, "--data", data, "--out", tmp_path / "r", "--stages", spec)
        assert message in capsys.readouterr().err
    assert _cli(*TRAIN, "--data", data, "--out", tmp_path / "r", "--stages", "3:16x16x5") == 1   # nothing fits
    assert "no bucket of stage 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("train", "--model", tmp_path, "--data", data, "--out", tmp_path / "r")
    assert "config.json" in capsys.readouterr().err


def test_batch_order_buckets_stages_and_ranks():
    from cogvideox.train_cli import BatchOrder, parse_stages

    shapes = [(2, 4, 4, 6)] * 5 + [(3, 4, 8, 12)] * 4 + [(2, 4, 6, 4)] * 2       # 32x48, 64x96, 48x32 pixels
    order = BatchOrder(shapes, batch=1, world=2, seed=0)
    epoch = [order(step, r)[1] for step in range(5) for r in range(2)]       # 2 + 2 + 1 global batches of 2
    assert all(len(b) == 1 for b in epoch)
    pairs = [epoch[i] + epoch[i + 1] for i in range(0, 10, 2)]
    assert all(len({shapes[i] for i in p}) == 1 for p in pairs)              # both ranks share the step's shape
    assert len({i for p in pairs for i in p}) == 10                          # drop_last: one of the 5 left out
    assert [order(s, 1) for s in range(12)] == [BatchOrder(shapes, 1, 2, 0)(s, 1) for s in range(12)]
    assert [order(s, 0) for s in range(12)] != [BatchOrder(shapes, 1, 2, 1)(s, 0) for s in range(12)]

    stages = parse_stages("3:32x48x5,4:96x64x9", batch_size=2)
    assert [(s.steps, s.height, s.width, s.frames, s.batch_size) for s in stages] == [(3, 32, 48, 5, 2),
                                                                                      (4, 96, 64, 9, 2)]
    staged = BatchOrder(shapes, batch=2, world=1, seed=0, stages=stages)
    got = [staged(step, 0) for step in range(12)]
    assert [st for st, _ in got] == [0] * 3 + [1] * 9
    # stage 0 (32x48, 5 frames) fits the first and the portrait bucket, stage 1 every bucket
    assert {shapes[i] for _, b in got[:3] for i in b} <= {(2, 4, 4, 6), (2, 4, 6, 4)}
    assert (3, 4, 8, 12) in {shapes[i] for _, b in got[3:] for i in b}
    # each stage's stream starts at its own step 0: stage 1's first epoch (2 + 2 + 1 batches) is whole
    assert sorted(len(b) for _, b in got[3:8]) == [2] * 5
    assert [s.height for s in parse_stages("paper", 1)] == [256, 480, 768, 768]
    with pytest.raises(ValueError, match="no bucket of stage 0"):
        BatchOrder(shapes, 2, 1, 0, parse_stages("1:16x16x5", 2))
    with pytest.raises(ValueError, match="global batch of 2 x 3"):
        BatchOrder(shapes, 3, 2, 0)


def _png_clip(folder, frames=9, h=32, w=48, seed=0):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(frames):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_encode_dataset_png_frames_with_precomputed_embeddings(tmp_path):
    """PNG frame folders + a tiny random VAE + precomputed prompt embeddings (no T5 needed)."""
    from safetensors.torch import load_file, save_file

    from cogvideox.config import VAEConfig
    from cogvideox.export import save_vae
    from cogvideox.train_cli import LatentDataset, read_video, video_tensor
    from cogvideox.vae import CogVideoXVAE, load_vae

    vae_dir = save_vae(randomize_(CogVideoXVAE(VAEConfig.preset("tiny", latent_channels=4)), 0), tmp_path / "vae")
    videos = tmp_path / "videos"
    _png_clip(videos / "a", seed=0)
    _png_clip(videos / "b", seed=1)
    embeds = {"a": torch.randn(5, 24), "b": torch.randn(5, 24)}
    save_file(embeds, str(tmp_path / "embeds.safetensors"))
    out = tmp_path / "data"
    assert _cli("encode-dataset", "--videos", videos, "--vae", vae_dir, "--prompt-embeds",
                tmp_path / "embeds.safetensors", "--out", out, "--seed", 3) == 0
    a = load_file(str(out / "a.safetensors"))
    assert a["latents"].shape == (3, 4, 4, 6) and torch.equal(a["prompt_embeds"], embeds["a"])
    vae = load_vae(vae_dir)
    with torch.no_grad():
        z = vae.encode(video_tensor(read_video(str(videos / "a")), None, None, None, "a"))
        expected = (z.sample(torch.Generator().manual_seed(3)) * vae.config.scaling_factor)[0].permute(1, 0, 2, 3)
    torch.testing.assert_close(a["latents"], expected, rtol=0, atol=0)
    assert len(LatentDataset(str(out))) == 2
    # and the folder trains
    assert _cli(*TRAIN, "--data", out, "--out", tmp_path / "run", "--steps", 2) == 0


def test_image_condition():
    first = torch.randn(3, 1, 4, 2, 3)
    cond = training.image_condition(first, 5, drop=torch.tensor([False, True, False]))
    assert cond.shape == (3, 5, 4, 2, 3)
    assert torch.equal(cond[0, 0], first[0, 0]) and torch.equal(cond[2, 0], first[2, 0])
    assert not cond[1].any() and not cond[:, 1:].any()
    assert torch.equal(training.image_condition(first, 1), first)
    with pytest.raises(ValueError, match="first"):
        training.image_condition(first[:, 0], 5)
    with pytest.raises(ValueError, match="drop"):
        training.image_condition(first, 5, drop=torch.zeros(2, dtype=torch.bool))


def test_encode_dataset_i2v_and_train_an_i2v_model(tmp_path):
    """encode-dataset --i2v stores the first frame, noise-augmented, encoded and scaled (checked against the
    computation by hand); train fine-tunes a tiny I2V model (in_channels 8): a few steps lower the fixed-noise loss
    of the conditioned model, and diffusers loads the checkpoint and computes what we compute on [noisy | image]."""
    import json

    from diffusers import CogVideoXTransformer3DModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cogvideox.config import VAEConfig
    from cogvideox.export import save_transformer, save_vae
    from cogvideox.train_cli import read_video, video_tensor
    from cogvideox.vae import CogVideoXVAE, load_vae
    from cogvideox.weights import load_transformer

    vae_dir = save_vae(randomize_(CogVideoXVAE(VAEConfig.preset("tiny", latent_channels=4)), 0), tmp_path / "vae")
    videos = tmp_path / "videos"
    _png_clip(videos / "a", frames=5, seed=0)
    save_file({"a": torch.randn(5, 24)}, str(tmp_path / "embeds.safetensors"))
    encoded = tmp_path / "encoded"
    assert _cli("encode-dataset", "--videos", videos, "--vae", vae_dir, "--prompt-embeds",
                tmp_path / "embeds.safetensors", "--out", encoded, "--seed", 3, "--i2v") == 0
    a = load_file(str(encoded / "a.safetensors"))
    vae, g = load_vae(vae_dir), torch.Generator().manual_seed(3)
    video = video_tensor(read_video(str(videos / "a")), None, None, None, "a")         # (1, 3, 5, 32, 48)
    with torch.no_grad():
        vae.encode(video).sample(g)                                     # the video latents' draw comes first
        sigma = float(torch.exp(-3.0 + 0.5 * torch.randn(1, generator=g)))
        noisy = video[:, :, :1] + sigma * torch.randn(1, 3, 1, 32, 48, generator=g)
        expected = (vae.encode(noisy).sample(g) * vae.config.scaling_factor)[0].permute(1, 0, 2, 3)
    assert a["image_latents"].shape == (1, 4, 4, 6) and a["latents"].shape == (2, 4, 4, 6)
    torch.testing.assert_close(a["image_latents"], expected, rtol=0, atol=0)
    with safe_open(str(encoded / "a.safetensors"), "pt") as f:
        assert float(f.metadata()["image_noise_sigma"]) == sigma
    assert "image_latents" in json.loads((encoded / "dataset.json").read_text())

    torch.manual_seed(0)
    model_dir = save_transformer(CogVideoXTransformer(TransformerConfig.preset("tiny", in_channels=8)),
                                 tmp_path / "i2v")
    i2v = ("train", "--model", model_dir, "--lr", "3e-3", "--seed", "1", "--no-progress")
    assert _cli(*i2v, "--data", encoded, "--out", tmp_path / "smoke", "--steps", 1) == 0   # the encoded folder
    data = make_dataset(tmp_path / "data", image=True)
    run = tmp_path / "run"
    assert _cli(*i2v, "--data", data, "--out", run, "--steps", 12) == 0
    before = _eval_loss(load_transformer(str(model_dir)), data)
    trained = load_transformer(str(run / "checkpoint-000012" / "transformer"))
    after = _eval_loss(trained, data)
    assert after < 0.9 * before, (before, after)      # measured: 1.40 -> 0.97 (fixed-noise v-MSE, CPU fp32)
    ref = CogVideoXTransformer3DModel.from_pretrained(str(run / "checkpoint-000012" / "transformer")).eval()
    assert ref.config.in_channels == 8
    x, text, t = torch.randn(1, 2, 8, 4, 6), torch.randn(1, 5, 24), torch.tensor([250])
    with torch.no_grad():
        assert_parity(trained(x, text, t), ref(x, text, t, return_dict=False)[0], rtol=1e-5, atol=0)


def test_train_cli_i2v_15_passes_ofs(tmp_path):
    """A 1.5-I2V config (ofs embedding, temporal patches): the forward requires ofs, so a finished run means train
    passed it (2.0, as the pipeline)."""
    from cogvideox.export import save_transformer

    cfg = TransformerConfig.preset("tiny", in_channels=8, ofs_embed_dim=24, patch_size_t=2, patch_bias=False,
                                   use_rotary_positional_embeddings=True)
    model_dir = save_transformer(CogVideoXTransformer(cfg), tmp_path / "i2v15")
    data = make_dataset(tmp_path / "data", n=2, image=True)
    assert _cli("train", "--model", model_dir, "--data", data, "--out", tmp_path / "run", "--steps", 2,
                "--no-progress") == 0


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(data, out, *extra, steps=1):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cogvideox", *TRAIN, "--data", str(data), "--out", str(out),
           "--steps", str(steps), *map(str, extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two_rank_step_by_hand(data, lora_rank=0):
    """One data-parallel step rebuilt in one process: each rank's samples, timestep interval and noise, the
    gradients averaged, clipped, AdamW (of the LoRA adapters alone with lora_rank). -> (model after the step,
    mean loss)."""
    from cogvideox.train_cli import BatchOrder, LatentDataset

    torch.manual_seed(1)
    model = CogVideoXTransformer(TransformerConfig.preset("tiny")).train()
    if lora_rank:
        training.add_lora(model, rank=lora_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    dataset, grads, losses = LatentDataset(str(data)), [], []
    for rank in range(2):
        g = torch.Generator().manual_seed(1_000 + rank)
        batch = dataset.batch(BatchOrder(dataset.shapes, 1, 2, seed=1)(0, rank)[1])
        t = training.explicit_uniform_timesteps(1, rank, 2, generator=g)
        noise = torch.randn(batch["latents"].shape, generator=g)
        x_t = scheduler.add_noise(TABLE, batch["latents"], noise, t)
        model.zero_grad()
        loss = training.cogvideox_loss(TABLE, model(x_t, batch["prompt_embeds"], t), batch["latents"], x_t, t)
        loss.backward()
        grads.append([p.grad.clone() for p in params])
        losses.append(loss.item())
    for p, g0, g1 in zip(params, *grads):
        p.grad = (g0 + g1) / 2
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4).step()
    return model, sum(losses) / 2


def _assert_same_step(model, checkpoint, rtol=1e-6):
    from cogvideox.weights import load_transformer

    trained = load_transformer(str(checkpoint / "transformer"))
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        if name.endswith("norm_k.bias"):
            # A bias on every key shifts each query's logits by one constant: softmax ignores it, so its gradient
            # is rounding noise (~1e-10) that AdamW's m / sqrt(v) turns into +-lr steps of arbitrary sign.
            assert p.grad.abs().max() < 1e-8
            continue
        torch.testing.assert_close(q, p, rtol=rtol, atol=1e-8, msg=name)


def test_train_cli_ddp_two_gloo_processes(tmp_path):
    """torchrun, 2 CPU processes (gloo): one DDP step equals the step rebuilt by hand from both ranks' draws."""
    import json

    data = make_dataset(tmp_path / "data", n=4)
    _torchrun(data, tmp_path / "run")
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= t < 500 for t in record["timesteps"])              # rank 0's half of [0, 1000)
    state = torch.load(tmp_path / "run" / "checkpoint-000001" / "training_state.pt", weights_only=False)
    assert state["world"] == 2 and len(state["rng"]) == 2
    model, loss = _two_rank_step_by_hand(data)
    assert abs(record["loss"] - loss) <= 1e-6 * abs(loss)
    _assert_same_step(model, tmp_path / "run" / "checkpoint-000001")


def test_train_cli_fsdp2_two_gloo_processes_and_resume(tmp_path):
    """--fsdp (fully_shard per block, with activation checkpointing): the first step equals the data-parallel step
    rebuilt by hand; resuming from the gathered step-1 checkpoint reproduces step 3 bit for bit."""
    from safetensors.torch import load_file

    data = make_dataset(tmp_path / "data", n=4)
    _torchrun(data, tmp_path / "run", "--fsdp", "--checkpointing", 1, "--save-every", 1, steps=3)
    model, _ = _two_rank_step_by_hand(data)
    _assert_same_step(model, tmp_path / "run" / "checkpoint-000001", rtol=1e-5)
    _torchrun(data, tmp_path / "resumed", "--fsdp", "--checkpointing", 1, "--resume",
              tmp_path / "run" / "checkpoint-000001", steps=3)
    name = "checkpoint-000003/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "run" / name)), load_file(str(tmp_path / "resumed" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli_fsdp2_lora_two_gloo_processes_and_resume(tmp_path):
    """--fsdp --lora-rank (frozen base weights and trainable adapters in the same fully_shard units): the first
    step equals the LoRA data-parallel step rebuilt in one process (the adapters, and the merged model diffusers
    loads); resuming from the gathered step-1 checkpoint reproduces step 2's adapters bit for bit."""
    pytest.importorskip("peft", reason="peft (the 'train' extra) is not installed")
    from safetensors.torch import load_file

    data = make_dataset(tmp_path / "data", n=4)
    _torchrun(data, tmp_path / "run", "--fsdp", "--lora-rank", 4, "--save-every", 1, steps=2)
    model, _ = _two_rank_step_by_hand(data, lora_rank=4)
    first = tmp_path / "run" / "checkpoint-000001"
    adapters, expected = load_file(str(first / "lora.safetensors")), training.lora_state(model)
    assert adapters.keys() == expected.keys() and len(adapters) == 2 * 2 * 2     # A, B; to_qkv, to_out; 2 blocks
    for k in expected:
        torch.testing.assert_close(adapters[k], expected[k], rtol=1e-5, atol=1e-8, msg=k)
    assert any(k.endswith("lora_B.default.weight") and adapters[k].abs().max() > 0 for k in adapters)
    from cogvideox.weights import load_transformer
    merged = load_transformer(str(first / "transformer")).state_dict()     # diffusers' keys back to ours
    by_hand = training.merged_state(model)
    assert merged.keys() == by_hand.keys()
    for k in by_hand:
        torch.testing.assert_close(merged[k], by_hand[k], rtol=1e-5, atol=1e-8, msg=k)

    _torchrun(data, tmp_path / "resumed", "--fsdp", "--lora-rank", 4, "--resume", first, steps=2)
    name = "checkpoint-000002/lora.safetensors"
    a, b = load_file(str(tmp_path / "run" / name)), load_file(str(tmp_path / "resumed" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merged_state_from_a_state_dict_is_merged_state():
    """What FSDP checkpoints use (the gathered state dict) gives the single-process merge bit for bit."""
    pytest.importorskip("peft", reason="peft (the 'train' extra) is not installed")
    model, _ = tiny_model(7)
    training.add_lora(model, rank=3, alpha=6.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    a, b = training.merged_state(model), training.merged_state_from(model, model.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in tiny_model(7)[0].state_dict().items())


def _tiny_t5(model_dir):
    """A random 1-layer T5 encoder (d_model 24) and a word-level tokenizer, both built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "beach", "dog", "in", "the", "snow"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(model_dir / "tokenizer"))
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32, num_layers=1,
                            num_heads=2)).save_pretrained(str(model_dir / "text_encoder"))


def test_encode_dataset_with_t5_and_mp4(tmp_path):
    """--model DIR with vae/, text_encoder/, tokenizer/ (a tiny T5 made here): prompts from NAME.txt."""
    import numpy as np
    from safetensors.torch import load_file

    from cogvideox import pipeline as P
    from cogvideox.config import VAEConfig
    from cogvideox.export import save_vae
    from cogvideox.vae import CogVideoXVAE

    model_dir = tmp_path / "model"
    save_vae(randomize_(CogVideoXVAE(VAEConfig.preset("tiny", latent_channels=4)), 0), model_dir / "vae")
    _tiny_t5(model_dir)
    videos = tmp_path / "videos"
    _png_clip(videos / "cat", frames=6, h=40, w=40)
    (videos / "cat.txt").write_text("a cat on a beach\n")
    have_mp4 = P._have("imageio", "imageio_ffmpeg")
    if have_mp4:
        P.save_frames(np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8),
                      str(videos / "dog.mp4"))
        (videos / "dog.txt").write_text("a dog in the snow")
    out = tmp_path / "data"
    assert _cli("encode-dataset", "--videos", videos, "--model", model_dir, "--out", out, "--max-text-length", 5,
                "--height", 32, "--width", 48) == 0
    cat = load_file(str(out / "cat.safetensors"))
    assert cat["latents"].shape == (2, 4, 4, 6)                    # frames 6 -> the first 5 -> 2 latent frames
    encoder, tokenizer = P.load_text_encoder(str(model_dir), torch.float32, "cpu")
    expected = P.encode_prompt(encoder, tokenizer, ["a cat on a beach"], 5, "cpu", torch.float32)[0]
    assert torch.equal(cat["prompt_embeds"], expected)
    if have_mp4:
        dog = load_file(str(out / "dog.safetensors"))
        assert dog["latents"].shape == (3, 4, 4, 6)
        assert not torch.equal(dog["prompt_embeds"], cat["prompt_embeds"])


def test_add_lora_trains_only_the_adapters():
    pytest.importorskip("peft", reason="peft (the 'train' extra) is not installed")
    model, cfg = tiny_model(6)
    batch, t = tiny_batch(cfg, 6), torch.tensor([100, 600])
    with torch.no_grad():
        before = model(batch["latents"], batch["prompt_embeds"], t)
    training.add_lora(model, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and (".to_qkv." in n or ".to_out." in n) for n in trainable)
    assert len(trainable) == 2 * 2 * cfg.num_layers                  # A and B, two targets, every block
    with torch.no_grad():
        assert torch.equal(model(batch["latents"], batch["prompt_embeds"], t), before)   # B = 0 at init
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        training.train_step(model, batch, opt, TABLE, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        assert not torch.equal(model(batch["latents"], batch["prompt_embeds"], t), before)


# ---- the train benchmark suite -------------------------------------------------------------------------------

def test_train_bench_suite_lists_and_runs_a_step():
    from bench.runner import Context
    from bench.suites import SUITES

    suite = SUITES["train"]
    ctx = Context(device=torch.device("cpu"), size="small", dtype=torch.float32, compile=False)
    (case,) = [c for c in suite.cases(ctx) if c.name == "train-step 5b"]
    variants = case.build()
    assert {v.pass_ for v in variants} == {"train-full", "train-full-ckpt", "train-lora", "train-lora-ckpt"}
    assert {v.impl for v in variants} == {"ours", "ours-eager", "diffusers", "diffusers-compile"}
    assert all(v.skip for v in variants if "compile" in v.impl or v.impl == "ours")   # no compiling on CPU
    assert all(v.paper is None for v in variants)              # the anchors are for the full-size 5B rows only
    full = [c for c in suite.cases(Context(device=torch.device("cpu"), size="full", dtype=torch.bfloat16))
            if c.name == "train-step 5b"][0]
    assert full.shape["seq_len"] == 226 + 13 * 30 * 45
    for v in variants:
        if v.skip is None and v.pass_ in ("train-full-ckpt", "train-lora") and v.impl in ("ours-eager", "diffusers"):
            step = v.make()
            first, second = step().item(), step().item()
            assert math.isfinite(first) and second != first          # the optimizer step changed the model


# ---- progressive resolution and buckets -----------------------------------------------------------------------
def test_paper_stages_and_stage_at():
    from cogvideox.training import Stage, paper_stages, stage_at

    stages = paper_stages()
    assert [(s.height, s.width, s.frames, s.batch_size, s.steps) for s in stages] == [
        (256, 384, 49, 2000, 400_000), (480, 720, 49, 1000, 220_000), (768, 1360, 81, 250, 120_000),
        (768, 1360, 81, 100, 10_000)]
    assert paper_stages(fps=16)[2].frames == 161
    assert stage_at(stages, 0)[0] == 0 and stage_at(stages, 399_999)[0] == 0 and stage_at(stages, 400_000)[0] == 1
    assert stage_at(stages, 620_000)[0] == 2 and stage_at(stages, 10 ** 9)[0] == 3
    with pytest.raises(ValueError, match="frames must be 4k"):
        Stage(1, 256, 384, 48, 2)
    with pytest.raises(ValueError, match="step"):
        stage_at(stages, -1)


def test_stage_size_keeps_the_aspect_ratio():
    from cogvideox.training import Stage, stage_size

    s = Stage(1, 480, 720, 49, 1)
    assert stage_size(1080, 1920, s) == (400, 720)       # 16:9: short side 480 would make 853 > 720 wide: capped
    assert stage_size(720, 960, s) == (480, 640)          # 4:3 keeps its ratio
    assert stage_size(1920, 1080, s) == (720, 400)        # portrait
    h, w = stage_size(333, 500, Stage(1, 256, 384, 49, 1))
    assert h % 16 == 0 and w % 16 == 0 and h <= 256 and w <= 384


def test_bucket_batches():
    from cogvideox.training import bucket_batches

    shapes = [(49, 480, 720)] * 5 + [(81, 768, 1360)] * 3 + [(49, 256, 384)] * 4
    g = torch.Generator().manual_seed(0)
    batches = bucket_batches(shapes, 2, g)
    assert sorted(i for b in batches for i in b) == list(range(12))
    assert all(len({shapes[i] for i in b}) == 1 for b in batches)
    again = bucket_batches(shapes, 2, torch.Generator().manual_seed(0))
    assert again == batches and bucket_batches(shapes, 2, torch.Generator().manual_seed(1)) != batches
    full = bucket_batches(shapes, 2, torch.Generator().manual_seed(0), drop_last=True)
    assert all(len(b) == 2 for b in full) and len(full) == 5
