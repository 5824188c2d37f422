"""The sampling pipeline and the CLI against diffusers 0.42.1 CogVideoX pipelines (tiny random models, CPU).

- the sampler loop alone is checked bit for bit: the same diffusers transformer drives both pipelines;
- with OUR transformer loaded from the diffusers model's saved weights, latents match to fp32 round-off;
- the T5 path: a tiny T5EncoderModel + tokenizer saved to disk, loaded offline, equal to `_get_t5_prompt_embeds`.
"""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cogvideox import pipeline as P
from tests.conftest import assert_parity
from tests.diffusers_models import (diffusers_rotary_emb, randomize_, save_pretrained,
                                    tiny_diffusers_transformer)

diffusers = pytest.importorskip("diffusers", reason="diffusers (the test extra) is the oracle")
from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,  # noqa: E402
                       CogVideoXImageToVideoPipeline, CogVideoXPipeline)

SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             clip_sample=False, prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
             steps_offset=0, timestep_spacing="trailing")
SAMPLER_CLS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}
SHIFT = {"2b": 3.0, "5b": 1.0, "1.5": 1.0, "5b-i2v": 1.0, "1.5-i2v": 1.0}
H, W, FRAMES, STEPS = 64, 96, 9, 3          # tiny latents 8 x 12, 3 latent frames (4 for 1.5)


class Adapter(torch.nn.Module):
    """A diffusers transformer behind our call signature (it builds the RoPE table as the pipelines do)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, latents, text, timestep, ofs=None):
        rope = diffusers_rotary_emb(self.model, latents.shape)
        return self.model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep, ofs=ofs,
                          image_rotary_emb=rope, return_dict=False)[0]


class VaeAdapter:
    """diffusers' AutoencoderKLCogVideoX behind our VAE interface (encode -> distribution, decode -> tensor)."""

    def __init__(self, vae):
        self.vae = vae

    def encode(self, x):
        return self.vae.encode(x).latent_dist

    def decode(self, z):
        return self.vae.decode(z).sample


def tiny_vae(seed=0, invert=False):
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, sample_height=H, sample_width=W, scaling_factor=0.7,
                                 invert_scale_latents=invert)
    return randomize_(vae, seed, std=0.2).eval()


def factors_of(vae):
    c = vae.config
    return P.VaeFactors(2 ** (len(c.block_out_channels) - 1), c.temporal_compression_ratio, c.scaling_factor,
                        c.invert_scale_latents)


def embeds(dtype, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 5, 24, generator=g).to(dtype) for _ in range(2)]   # positive, negative


def run_diffusers(model, sampler, family, pos, neg, guidance, dynamic, seed, vae=None, image=None):
    cls = CogVideoXImageToVideoPipeline if image is not None else CogVideoXPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
               scheduler=SAMPLER_CLS[sampler](**SCHED, snr_shift_scale=SHIFT[family]))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=image) if image is not None else {}
    return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_frames=FRAMES, height=H, width=W,
                num_inference_steps=STEPS, guidance_scale=guidance, use_dynamic_cfg=dynamic,
                generator=torch.Generator().manual_seed(seed), output_type="latent", return_dict=False, **kw)[0]


def run_ours(model, sampler, family, pos, neg, guidance, dynamic, seed, vae=None, image=None, factors=None):
    return P.generate(model, pos, neg, num_frames=FRAMES, height=H, width=W, steps=STEPS, guidance_scale=guidance,
                      use_dynamic_cfg=dynamic, sampler=sampler, snr_shift_scale=SHIFT[family],
                      generator=torch.Generator().manual_seed(seed), vae=vae, image=image,
                      factors=factors or P.VaeFactors(), decode=False, progress=False)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_diffusers_transformer(f, seed=i) for i, f in enumerate(SHIFT)}


# ---- the loop, bit for bit --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["2b", "5b", "1.5"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
@pytest.mark.parametrize("dtype,guidance,dynamic", [(torch.float32, 6.0, False), (torch.bfloat16, 6.0, True),
                                                     (torch.float32, 1.0, False)])
def test_loop_matches_diffusers_bitwise(models, family, sampler, dtype, guidance, dynamic):
    model = copy.deepcopy(models[family]).to(dtype)   # a copy: .to(bf16) would round the fp64 sincos buffer
    pos, neg = embeds(dtype, seed=1)
    ref = run_diffusers(model, sampler, family, pos, neg if guidance > 1 else None, guidance, dynamic, seed=3)
    out = run_ours(Adapter(model), sampler, family, pos, neg, guidance, dynamic, seed=3)
    assert out.latents.dtype == dtype and out.latents.shape == ref.shape
    assert out.dropped_frames == (1 if family == "1.5" else 0)
    assert out.latents.shape[1] == (4 if family == "1.5" else 3)
    assert torch.equal(out.latents, ref)


@pytest.mark.parametrize("family", ["5b-i2v", "1.5-i2v"])
@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_image_to_video_matches_diffusers_bitwise(models, family, sampler):
    from PIL import Image

    vae = tiny_vae(invert=family == "1.5-i2v")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))  # resized
    pos, neg = embeds(torch.float32, seed=2)
    ref = run_diffusers(models[family], sampler, family, pos, neg, 6.0, False, seed=4, vae=vae, image=img)
    out = run_ours(Adapter(models[family]), sampler, family, pos, neg, 6.0, False, seed=4, vae=VaeAdapter(vae),
                   image=P.prepare_image(img, H, W), factors=factors_of(vae))
    assert torch.equal(out.latents, ref)


def test_image_scaling_rules():
    """Scaled x sf for 1.0, x 1/sf for 1.5 (invert_scale_latents), zeros after the first frame."""
    class Fixed:
        def encode(self, x):
            class D:
                def sample(self, g):
                    return torch.full((1, 4, 1, 2, 3), 2.0)
            return D()

    cfg = type("C", (), {"patch_size_t": None})()
    img = torch.zeros(1, 3, 16, 24)
    lat = P.image_latents(Fixed(), img, 3, cfg, P.VaeFactors(scaling_factor=0.5), torch.float32, "cpu", None)
    assert lat.shape == (1, 3, 4, 2, 3) and torch.all(lat[:, 0] == 1.0) and torch.all(lat[:, 1:] == 0)
    lat = P.image_latents(Fixed(), img, 3, cfg, P.VaeFactors(scaling_factor=0.5, invert_scale_latents=True),
                          torch.float32, "cpu", None)
    assert torch.all(lat[:, 0] == 4.0)


# ---- our transformer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,sampler", [("2b", "ddim"), ("5b", "dpm"), ("1.5", "ddim"), ("1.5", "dpm")])
def test_our_transformer_matches_diffusers_pipeline(models, tmp_path, family, sampler):
    weights = pytest.importorskip("cogvideox.weights")
    model = models[family]
    ours = weights.load_transformer(save_pretrained(model, tmp_path / "transformer"), dtype=torch.float32)
    pos, neg = embeds(torch.float32, seed=5)
    ref = run_diffusers(model, sampler, family, pos, neg, 6.0, True, seed=6)
    out = run_ours(ours, sampler, family, pos, neg, 6.0, True, seed=6).latents
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, err


def test_our_transformer_bf16_pipeline_parity_rule(models, tmp_path):
    """bf16 end to end (latents re-rounded every step): ours is within 2x diffusers' own bf16 error of the fp32
    run, plus a small atol (the house parity rule)."""
    weights = pytest.importorskip("cogvideox.weights")
    model = models["5b"]
    path = save_pretrained(model, tmp_path / "transformer")
    ours = weights.load_transformer(path, dtype=torch.bfloat16)
    pos, neg = embeds(torch.float32, seed=9)
    ref = run_diffusers(model, "dpm", "5b", pos, neg, 6.0, False, seed=10)
    plain = run_diffusers(copy.deepcopy(model).to(torch.bfloat16), "dpm", "5b", pos.bfloat16(), neg.bfloat16(), 6.0,
                          False, seed=10)
    out = run_ours(ours, "dpm", "5b", pos.bfloat16(), neg.bfloat16(), 6.0, False, seed=10).latents
    assert out.dtype == torch.bfloat16
    assert_parity(out, ref, plain, atol=1e-3, name="bf16 latents")


# ---- T5 ----------------------------------------------------------------------------------------------------
WORDS = "a cat dog runs on the beach at sunset red blue car video of in slowly".split()


def save_tiny_t5(directory, d_model=24):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    # A unigram vocabulary written by hand: fully offline, no sentencepiece training needed.
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - 0.1 * i)
              for i, w in enumerate(WORDS)] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -5.0)])
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(os.path.join(directory, "tokenizer"))
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=32, num_layers=2, num_heads=3,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   use_cache=False)
    randomize_(T5EncoderModel(cfg), 0, std=0.3).save_pretrained(os.path.join(directory, "text_encoder"))


def test_t5_embeddings_match_diffusers(tmp_path):
    save_tiny_t5(tmp_path)
    encoder, tokenizer = P.load_text_encoder(str(tmp_path), torch.float32, "cpu")
    stub = CogVideoXPipeline.__new__(CogVideoXPipeline)
    stub.__dict__.update(tokenizer=tokenizer, text_encoder=encoder)
    prompts = ["a cat runs on the beach at sunset", "", " ".join(WORDS * 30)]   # the last is truncated at 226
    for max_len in (226, 5):
        with torch.no_grad():  # as inside the pipeline's __call__ (grad mode changes CPU kernels' round-off)
            ref = stub._get_t5_prompt_embeds(prompts, max_sequence_length=max_len, device="cpu", dtype=torch.float32)
        ours = P.encode_prompt(encoder, tokenizer, prompts, max_length=max_len, device="cpu", dtype=torch.float32)
        assert ours.shape == (3, max_len, 24) and torch.equal(ours, ref)
    # the pad positions are not masked: their outputs differ from a masked encoding
    ids = tokenizer(prompts[:1], padding="max_length", max_length=226, return_tensors="pt")
    masked = encoder(ids.input_ids, attention_mask=ids.attention_mask)[0]
    assert not torch.allclose(masked, P.encode_prompt(encoder, tokenizer, prompts[:1], 226, "cpu"))


def save_model_dir(root, model, family="2b", vae=None):
    save_pretrained(model, os.path.join(root, "transformer"))
    save_pretrained(vae or tiny_vae(), os.path.join(root, "vae"))
    sched = CogVideoXDDIMScheduler(**SCHED, snr_shift_scale=SHIFT[family])
    sched.save_pretrained(os.path.join(root, "scheduler"))
    save_tiny_t5(root)
    return str(root)


def test_model_directory_end_to_end_with_prompts(models, tmp_path):
    """Text prompts through our T5 path, our transformer from disk, against diffusers given the same prompts."""
    pytest.importorskip("cogvideox.weights")
    from transformers import AutoTokenizer, T5EncoderModel

    root = save_model_dir(tmp_path, models["5b"], "5b")
    m = P.load_models(root, torch.float32, "cpu")
    assert m.snr_shift_scale == 1.0 and m.factors.spatial == 8 and m.factors.scaling_factor == 0.7
    enc, tok = P.load_text_encoder(root, torch.float32, "cpu")
    pos = P.encode_prompt(enc, tok, ["a red car"], max_length=5)
    neg = P.encode_prompt(enc, tok, [""], max_length=5)
    out = P.generate(m.transformer, pos, neg, num_frames=FRAMES, height=H, width=W, steps=STEPS,
                     snr_shift_scale=m.snr_shift_scale, generator=torch.Generator().manual_seed(0),
                     decode=False, progress=False).latents
    pipe = CogVideoXPipeline(tokenizer=AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
                             text_encoder=T5EncoderModel.from_pretrained(os.path.join(root, "text_encoder")),
                             vae=tiny_vae(), transformer=models["5b"],
                             scheduler=CogVideoXDDIMScheduler.from_pretrained(os.path.join(root, "scheduler")))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a red car", num_frames=FRAMES, height=H, width=W, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(0), output_type="latent", max_sequence_length=5,
               return_dict=False)[0]
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6


def test_model_directory_errors(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        P.check_model_dir(str(tmp_path / "nope"), need_text_encoder=False)
    save_pretrained(models["2b"], tmp_path / "transformer")
    with pytest.raises(FileNotFoundError, match="scheduler/scheduler_config.json.*vae/config.json"):
        P.check_model_dir(str(tmp_path), need_text_encoder=False)
    with pytest.raises(FileNotFoundError, match="text_encoder/config.json"):
        P.check_model_dir(str(tmp_path), need_text_encoder=True)
    CogVideoXDDIMScheduler(**{**SCHED, "timestep_spacing": "leading"}).save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match="timestep_spacing='leading'"):
        P.read_scheduler_config(str(tmp_path))


# ---- arguments and output ----------------------------------------------------------------------------------
def test_generate_rejects_bad_arguments(models):
    pos, neg = embeds(torch.float32)
    a = Adapter(models["2b"])
    kw = dict(num_frames=FRAMES, height=H, width=W, steps=2, progress=False)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        P.generate(a, pos, neg, **{**kw, "height": 60})
    with pytest.raises(ValueError, match="frames must be 1 \\+ a multiple of 4"):
        P.generate(a, pos, neg, **{**kw, "num_frames": 10})
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        P.generate(a, pos, None, **kw)
    with pytest.raises(ValueError, match="image"):
        P.generate(a, pos, neg, image=torch.zeros(1, 3, H, W), **kw)
    with pytest.raises(ValueError, match="sampler"):
        P.generate(a, pos, neg, sampler="euler", **kw)
    with pytest.raises(ValueError, match="num_steps"):
        P.generate(a, pos, neg, **{**kw, "steps": 0})


def test_png_writers_and_uint8(tmp_path):
    from PIL import Image

    video = torch.rand(1, 3, 2, 5, 7) * 2.4 - 1.2          # out of range values get clamped
    frames = P.to_uint8(video)
    ref = ((video.permute(0, 2, 3, 4, 1) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert frames.shape == (1, 2, 5, 7, 3) and np.array_equal(frames, ref)
    P.write_png(str(tmp_path / "a.png"), frames[0, 0])
    assert np.array_equal(np.array(Image.open(tmp_path / "a.png")), frames[0, 0])
    paths = P.save_frames(frames[0], str(tmp_path / "clip"))
    assert [os.path.basename(p) for p in paths] == ["frame_0000.png", "frame_0001.png"]
    assert np.array_equal(np.array(Image.open(paths[1])), frames[0, 1])


# ---- CLI ---------------------------------------------------------------------------------------------------
def _cli(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "cogvideox", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_cli_random_init_tiny_writes_output(tmp_path):
    out = tmp_path / "video.mp4"
    r = _cli("generate", "--preset", "tiny", "--random-init", "--prompt", "a cat", "--out", str(out),
             "--steps", "2", "--sampler", "dpm")
    assert r.returncode == 0, r.stderr
    assert "random" in r.stdout.lower()
    written = [ln.split(": ", 1)[1] for ln in r.stdout.splitlines() if ln.startswith("wrote: ")]
    assert written and all(os.path.isfile(p) for p in written), r.stdout
    assert str(tmp_path) in written[0]
    # the attention backend choice is logged once (INFO, shown on stderr by the CLI)
    assert r.stderr.count("cogvideox.attention: attention backend for cpu") == 1, r.stderr


def test_cli_bad_flags_fail_clearly(tmp_path, capsys):
    from cogvideox.__main__ import main

    cases = [
        (["generate", "--preset", "tiny", "--random-init", "--out", "x"], "--prompt or --prompt-embeds"),
        (["generate", "--prompt", "a", "--out", "x"], "--model DIR or --preset"),
        (["generate", "--preset", "tiny", "--prompt", "a", "--out", "x"], "--random-init"),
        (["generate", "--preset", "huge", "--random-init", "--prompt", "a", "--out", "x"], "invalid choice"),
        (["generate", "--preset", "tiny", "--random-init", "--prompt", "a", "--out", "x", "--steps", "0"], "--steps"),
        (["generate", "--preset", "tiny", "--random-init", "--prompt", "a", "--out", "x", "--height", "70"],
         "height"),
        (["generate", "--preset", "tiny", "--random-init", "--prompt", "a", "--out", "x", "--frames", "8"], "frames"),
        (["generate", "--preset", "tiny", "--random-init", "--prompt", "a", "--out", "x", "--sampler", "euler"],
         "invalid choice"),
        (["generate", "--model", str(tmp_path / "none"), "--prompt", "a", "--out", "x"], "not a directory"),
        (["generate", "--model", str(tmp_path), "--prompt", "a", "--out", "x"], "missing"),
        (["generate", "--preset", "tiny", "--random-init", "--prompt", "a", "--out", "x",
          "--image", str(tmp_path / "no.png")], "--image"),
        (["generate", "--preset", "tiny", "--random-init", "--prompt", "a", "--prompt-embeds", "f", "--out", "x"],
         "not both"),
    ]
    for argv, expect in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and expect in err, (argv, err)


def test_cli_model_dir_image_to_video_matches_diffusers(models, tmp_path, capsys):
    """The whole CLI path: T5 from disk, our transformer and VAE from disk, I2V, DPM, CFG, decode, PNG frames;
    against CogVideoXImageToVideoPipeline given the same files, prompt, image and seed."""
    pytest.importorskip("cogvideox.vae")
    from PIL import Image
    from transformers import AutoTokenizer, T5EncoderModel

    from cogvideox.__main__ import main

    vae = tiny_vae(seed=1)
    root = save_model_dir(tmp_path / "model", models["5b-i2v"], "5b-i2v", vae=vae)
    image_path = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image_path)
    argv = ["generate", "--model", root, "--prompt", "a red car", "--image", str(image_path), "--out",
            str(tmp_path / "clip"), "--steps", "2", "--sampler", "dpm", "--seed", "7", "--no-progress"]
    assert main(argv) == 0
    written = [ln[len("wrote: "):] for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote: ")]
    assert len(written) == FRAMES
    ours = np.stack([np.array(Image.open(p)) for p in written])

    pipe = CogVideoXImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer")),
        text_encoder=T5EncoderModel.from_pretrained(os.path.join(root, "text_encoder")), vae=vae,
        transformer=models["5b-i2v"],
        scheduler=CogVideoXDPMScheduler.from_pretrained(os.path.join(root, "scheduler")))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=Image.open(image_path), prompt="a red car", num_frames=FRAMES, height=H, width=W,
               num_inference_steps=2, generator=torch.Generator().manual_seed(7), output_type="np",
               max_sequence_length=5, return_dict=False)[0][0]
    ref = (ref * 255).round().astype(np.uint8)                 # diffusers' numpy_to_pil quantisation
    assert ours.shape == ref.shape == (FRAMES, H, W, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1   # fp32 round-off may flip one level


def test_cli_prompt_embeds_file_and_latents_without_vae(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    from cogvideox.__main__ import main

    g = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(1, 5, 24, generator=g)}, str(tmp_path / "pe.safetensors"))
    save_file({"prompt_embeds": torch.randn(1, 5, 23, generator=g)}, str(tmp_path / "bad.safetensors"))
    base = ["generate", "--preset", "tiny", "--random-init", "--frames", "5", "--steps", "2", "--no-progress"]
    with pytest.raises(SystemExit) as e:
        main(base + ["--prompt-embeds", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "text width 24" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "cogvideox.vae", None)     # as if our VAE module were absent
    out = tmp_path / "noise.mp4"
    assert main(base + ["--prompt-embeds", str(tmp_path / "pe.safetensors"), "--guidance", "1",
                        "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text and "saving the latents" in text
    lat = load_file(str(tmp_path / "noise.latents.safetensors"))["latents"]
    assert lat.shape == (1, 2, 4, 8, 12) and torch.isfinite(lat).all()


def test_decode_drops_padded_front_frame_and_unscales(models):
    """1.5: the extra latent frame is generated in front and dropped before decode; decode sees latents / sf,
    channels before frames (diffusers' decode_latents)."""
    seen = {}

    class RecordingVae:
        def decode(self, z):
            seen["z"] = z
            return torch.zeros(z.shape[0], 3, 4 * z.shape[2] - 3, H, W)

    pos, neg = embeds(torch.float32, seed=8)
    f = P.VaeFactors(scaling_factor=0.5)
    out = P.generate(Adapter(models["1.5"]), pos, neg, num_frames=FRAMES, height=H, width=W, steps=2,
                     vae=RecordingVae(), factors=f, generator=torch.Generator().manual_seed(0), progress=False)
    assert out.latents.shape[1] == 4 and out.dropped_frames == 1
    assert torch.equal(seen["z"], 1 / 0.5 * out.latents[:, 1:].permute(0, 2, 1, 3, 4))
    assert out.video.shape == (1, 3, FRAMES, H, W)


def test_mp4_branch_uses_imageio_writer(tmp_path, monkeypatch):
    """imageio is optional and absent in CI: check the mp4 branch's calls against a recording stand-in."""
    import types

    calls = {"frames": []}

    class Writer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls["closed"] = True

        def append_data(self, frame):
            calls["frames"].append(frame)

    def get_writer(path, **kw):
        calls.update(path=path, **kw)
        open(path, "wb").close()   # the real writer creates the file, which is then renamed into place
        return Writer()

    monkeypatch.setitem(sys.modules, "imageio", types.SimpleNamespace(get_writer=get_writer))
    monkeypatch.setattr(P, "_have", lambda *m: True)
    frames = np.random.default_rng(0).integers(0, 256, (3, 16, 32, 3), dtype=np.uint8)
    out = str(tmp_path / "v.mp4")
    assert P.save_frames(frames, out, fps=16) == [out]
    # written under a temporary name beside the target (same extension, for imageio), then renamed
    assert os.path.dirname(calls["path"]) == str(tmp_path) and calls["path"].endswith(".mp4") and calls["path"] != out
    assert os.listdir(tmp_path) == ["v.mp4"] and calls["fps"] == 16 and calls["closed"]
    assert len(calls["frames"]) == 3 and np.array_equal(calls["frames"][2], frames[2])


def test_cli_corrupt_checkpoint_is_a_clear_error(models, tmp_path, capsys):
    from cogvideox.__main__ import main

    root = save_model_dir(tmp_path / "model", models["2b"], "2b")
    weights = [f for f in os.listdir(os.path.join(root, "transformer")) if f.endswith(".safetensors")][0]
    path = os.path.join(root, "transformer", weights)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert main(["generate", "--model", root, "--prompt", "a cat", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and weights in err and "truncated or corrupt" in err
