"""Issue 12 (robustness), outside the kernels: checkpoints that must not load, inputs the command line and the
pipeline must refuse before any work, outputs that are never left half-written, and the tiny presets."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvideox.config import TransformerConfig, VAEConfig
from cogvideox.weights import CheckpointError, load_transformer
from diffusers_models import save_pretrained, tiny_diffusers_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- checkpoints -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny 2B checkpoint in several shards with an index (diffusers' save_pretrained)."""
    d = tmp_path_factory.mktemp("sharded")
    tiny_diffusers_transformer("2b", seed=5).save_pretrained(str(d / "ckpt"), safe_serialization=True,
                                                             max_shard_size="20KB")
    return str(d / "ckpt")


def _clone(src, dst):
    """A copy of a checkpoint folder (plain files)."""
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return str(dst)


def _index(path):
    name = next(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    return os.path.join(path, name)


def _edit_json(file, edit):
    with open(file) as f:
        data = json.load(f)
    with open(file, "w") as f:
        json.dump(edit(data), f)


def test_sharded_fixture_loads(sharded):
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    load_transformer(sharded)


def test_int_and_bool_tensors_are_refused(sharded, tmp_path):
    """int8 / bool weights used to be cast to float without a word (off by up to 16.8)."""
    path = _clone(sharded, tmp_path / "c")
    shard = os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0])
    tensors = load_file(shard)
    k1, k2 = sorted(tensors)[:2]
    tensors[k1] = (tensors[k1] * 10).to(torch.int8)
    tensors[k2] = tensors[k2] > 0
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="not floating point") as info:
        load_transformer(path)
    assert f"{k1}: torch.int8" in str(info.value) and f"{k2}: torch.bool" in str(info.value)


def test_index_cannot_reach_outside_the_folder(sharded, tmp_path):
    path = _clone(sharded, tmp_path / "c")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    os.rename(os.path.join(path, shard), tmp_path / "outside.safetensors")   # a real, readable file outside
    _edit_json(_index(path), lambda d: {**d, "weight_map": {k: ("../outside.safetensors" if v == shard else v)
                                                            for k, v in d["weight_map"].items()}})
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_transformer(path)
    _edit_json(_index(path), lambda d: {**d, "weight_map": {k: (str(tmp_path / "outside.safetensors")
                                                                if v == "../outside.safetensors" else v)
                                                            for k, v in d["weight_map"].items()}})
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_transformer(path)
    # a symlink inside the folder that leads out of it
    _edit_json(_index(path), lambda d: {**d, "weight_map": {k: (shard if v.endswith("outside.safetensors") else v)
                                                            for k, v in d["weight_map"].items()}})
    os.symlink(tmp_path / "outside.safetensors", os.path.join(path, shard))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_transformer(path)
    os.remove(os.path.join(path, shard))   # a symlink that stays inside is fine
    os.rename(tmp_path / "outside.safetensors", os.path.join(path, "real.bin"))
    os.symlink("real.bin", os.path.join(path, shard))
    load_transformer(path)


def test_single_file_symlink_cannot_leave_the_folder(tmp_path):
    ckpt = save_pretrained(tiny_diffusers_transformer("2b", seed=5), tmp_path / "elsewhere")
    os.makedirs(tmp_path / "c")
    os.rename(os.path.join(ckpt, "config.json"), tmp_path / "c" / "config.json")
    os.symlink(os.path.join(ckpt, "diffusion_pytorch_model.safetensors"),
               tmp_path / "c" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_transformer(str(tmp_path / "c"))


def test_key_in_two_shards_is_an_error(sharded, tmp_path):
    path = _clone(sharded, tmp_path / "c")
    a, b = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[:2]
    ta, tb = load_file(os.path.join(path, a)), load_file(os.path.join(path, b))
    key = sorted(ta)[0]
    tb[key] = torch.randn_like(ta[key])                  # "last one wins" would load this copy
    save_file(tb, os.path.join(path, b))
    with pytest.raises(CheckpointError, match=f"stored in two shards: {key}"):
        load_transformer(path)


@pytest.mark.parametrize("content,needle", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"null", "must be a JSON object, got NoneType"),
])
def test_malformed_config_json(sharded, tmp_path, content, needle):
    path = _clone(sharded, tmp_path / "c")
    with open(os.path.join(path, "config.json"), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_transformer(path)
    assert os.path.join(path, "config.json") in str(info.value)


@pytest.mark.parametrize("field,value,needle", [
    ("num_layers", "1", "num_layers must be an int, got '1'"),
    ("num_attention_heads", 2.0, "num_attention_heads must be an int, got 2.0"),
    ("use_rotary_positional_embeddings", 1, "use_rotary_positional_embeddings must be a bool"),
    ("norm_eps", "1e-5", "norm_eps must be a finite number"),
    ("num_layers", 0, "num_layers must be > 0"),
])
def test_config_field_types(sharded, tmp_path, field, value, needle):
    path = _clone(sharded, tmp_path / "c")
    _edit_json(os.path.join(path, "config.json"), lambda d: {**d, field: value})
    with pytest.raises(CheckpointError, match=needle) as info:
        load_transformer(path)
    assert os.path.join(path, "config.json") in str(info.value)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: {**d, "norm_num_groups": 0}, "norm_num_groups must be > 0"),
    (lambda d: {**d, "block_out_channels": 8}, "block_out_channels must be a list of ints"),
    (lambda d: {**d, "down_block_types": 3}, "down_block_types=3"),
    (lambda d: {**d, "scaling_factor": float("nan")}, "scaling_factor must be a finite number"),
])
def test_vae_config_field_types(tmp_path, edit, needle):
    from cogvideox.vae import load_vae

    os.makedirs(tmp_path / "vae")
    cfg = {"_class_name": "AutoencoderKLCogVideoX", "block_out_channels": [8, 8], "latent_channels": 4,
           "norm_num_groups": 2, "temporal_compression_ratio": 2.0, "layers_per_block": 1}
    with open(tmp_path / "vae" / "config.json", "w") as f:
        json.dump(edit(cfg), f)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_vae(str(tmp_path / "vae"))
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("index,needle", [
    ({"weight_map": ["a.safetensors"]}, "weight_map must be an object"),
    ({"metadata": {}}, "weight_map must be an object"),
    ([1], "must be a JSON object, got list"),
])
def test_malformed_index(sharded, tmp_path, index, needle):
    path = _clone(sharded, tmp_path / "c")
    with open(_index(path), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_transformer(path)
    assert _index(path) in str(info.value)


def test_loader_dtype_argument(sharded):
    from cogvideox.vae import load_vae

    for load in (load_transformer, load_vae):
        with pytest.raises(TypeError, match="dtype must be None or a torch.dtype"):
            load("/nonexistent", dtype="bf16")          # refused before any file is read
        with pytest.raises(ValueError, match="dtype must be a floating dtype"):
            load("/nonexistent", dtype=torch.int8)
    assert {t.dtype for t in load_transformer(sharded, dtype=torch.float16).state_dict().values()} == {torch.float16}


def test_config_dataclasses_check_types():
    with pytest.raises(ValueError, match="num_layers must be an int"):
        TransformerConfig.preset("tiny", num_layers=True)
    with pytest.raises(ValueError, match="dropout"):
        TransformerConfig.preset("tiny", dropout=1.5)
    with pytest.raises(ValueError, match="norm_eps must be a finite number"):
        VAEConfig.preset("tiny", norm_eps=float("inf"))
    assert VAEConfig(temporal_compression_ratio=4.0).temporal_compression_ratio == 4   # diffusers types it float
    assert TransformerConfig(norm_eps=1).norm_eps == 1.0 and isinstance(TransformerConfig(norm_eps=1).norm_eps, float)


# ---- presets -----------------------------------------------------------------------------------------------
def test_tiny_presets_fit_together_and_the_tiny_vae_tiles():
    """The tiny transformer's latents are the tiny VAE's, and the tiny VAE's default tiles tile evenly, so its
    tiled path runs (the tiny transformer's 64 x 96 px sample spans 2 x 3 tiles; 7 x 6 latents, 2 x 2, here)."""
    from cogvideox.vae import CogVideoXVAE

    t, v = TransformerConfig.preset("tiny"), VAEConfig.preset("tiny")
    assert v.latent_channels == t.out_channels == t.in_channels
    torch.manual_seed(0)
    vae = CogVideoXVAE(v).eval()
    assert vae.tile_grid("encode") == ((48, 40), (40, 32), (1, 1), (5, 4))   # tile, stride, blend, kept
    assert vae.tile_grid("decode") == ((6, 5), (5, 4), (8, 8), (40, 32))
    assert vae.plan("decode", (1, 4, 1, t.sample_height, t.sample_width), torch.float32, "cpu", tiling=True)[1]
    z = torch.randn(1, t.out_channels, 1, 7, 6)
    tiled, untiled = vae.decode(z, tiling=True), vae.decode(z, tiling=False)
    assert tiled.shape == untiled.shape == (1, 3, 1, 56, 48)
    assert (tiled - untiled).abs().max() > 0   # the tiled path really ran


# ---- non-finite numbers ------------------------------------------------------------------------------------
def _tiny_model():
    from cogvideox.transformer import CogVideoXTransformer

    torch.manual_seed(0)
    return CogVideoXTransformer(TransformerConfig.preset("tiny")).eval()


@pytest.mark.parametrize("kw,needle", [
    ({"guidance_scale": float("inf")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
    ({"snr_shift_scale": float("nan")}, "snr_shift_scale must be a finite number"),
    ({"snr_shift_scale": float("inf")}, "snr_shift_scale must be a finite number"),
])
def test_pipeline_refuses_non_finite_numbers(kw, needle):
    from cogvideox import pipeline as P

    pos = torch.randn(1, 5, 24)
    with pytest.raises(ValueError, match=needle):
        P.generate(_tiny_model(), pos, pos.clone(), num_frames=5, height=64, width=96, steps=1, progress=False,
                   **kw)


def test_sampler_and_scheduler_refuse_non_finite_numbers():
    from cogvideox import pipeline as P
    from cogvideox import scheduler as S

    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        P.denoise(_tiny_model(), torch.randn(1, 2, 4, 8, 12), torch.randn(2, 5, 24), steps=1,
                  guidance_scale=float("nan"), progress=False)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="snr_shift_scale must be a finite number > 0"):
            S.alphas_cumprod(bad)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        S.dynamic_cfg_scale(float("inf"), 999, 50)
    with pytest.raises(ValueError, match="fps must be"):
        P.save_frames(torch.zeros(1, 2, 2, 3, dtype=torch.uint8).numpy(), "/nonexistent/x", fps=float("nan"))


def test_scheduler_config_with_nan_shift(tmp_path):
    from cogvideox import pipeline as P

    os.makedirs(tmp_path / "scheduler")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"snr_shift_scale": NaN}')   # json reads NaN
    with pytest.raises(CheckpointError, match="snr_shift_scale must be a finite number"):
        P.read_scheduler_config(str(tmp_path))
    (tmp_path / "scheduler" / "scheduler_config.json").write_bytes(b"\xff")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        P.read_scheduler_config(str(tmp_path))


# ---- the command line: every input checked before any model is built ------------------------------------------
TINY_RUN = ["generate", "--preset", "tiny", "--random-init", "--frames", "5", "--steps", "1", "--no-progress"]


@pytest.fixture
def no_model(monkeypatch):
    """Building a model fails the test: the CLI must have refused the input before."""
    from cogvideox import transformer

    def refuse(*a, **k):
        raise AssertionError("a model was built before the input was checked")
    monkeypatch.setattr(transformer.CogVideoXTransformer, "__init__", refuse)


def _bad_inputs(tmp_path):
    """(extra argv, expected message) for inputs that must be refused."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "junk.safetensors").write_bytes(os.urandom(200))
    (d / "junk.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    torch.save({"prompt_embeds": "a cat"}, d / "string.pt")
    torch.save({"prompt_embeds": torch.zeros(0, 5, 24)}, d / "empty.pt")
    torch.save({"prompt_embeds": torch.full((1, 5, 24), float("nan"))}, d / "nan.pt")
    torch.save({"prompt_embeds": torch.randn(1, 5, 24), "negative_prompt_embeds": [1, 2]}, d / "neglist.pt")
    (d / "notimage.png").write_text("not an image")
    (d / "file").write_text("a regular file")
    (d / "frames").mkdir()
    (d / "frames" / "notes.txt").write_text("keep me")
    p = ["--prompt", "a cat"]
    o = ["--out", str(tmp_path / "o")]
    return {
        "guidance-inf": (["--guidance", "inf", *p, *o], "--guidance must be a finite number"),
        "guidance-nan": (["--guidance", "nan", *p, *o], "--guidance must be a finite number"),
        "fps-0": (["--fps", "0", *p, *o], "--fps must be > 0"),
        "embeds-corrupt-safetensors": (["--prompt-embeds", str(d / "junk.safetensors"), *o], "cannot be read"),
        "embeds-corrupt-pt": (["--prompt-embeds", str(d / "junk.pt"), *o], "cannot be read"),
        "embeds-string": (["--prompt-embeds", str(d / "string.pt"), *o], "prompt_embeds must be a tensor"),
        "embeds-batch-0": (["--prompt-embeds", str(d / "empty.pt"), *o], "B, L > 0"),
        "embeds-nan": (["--prompt-embeds", str(d / "nan.pt"), *o], "finite"),
        "embeds-negative-list": (["--prompt-embeds", str(d / "neglist.pt"), *o],
                                 "negative_prompt_embeds must be a tensor"),
        "image-not-an-image": (["--preset", "5b-i2v", "--image", str(d / "notimage.png"), *p, *o],
                               "not a readable image"),
        "out-under-a-file": ([*p, "--out", str(d / "file" / "video.mp4")], "is a file, not a folder"),
        "out-is-a-file": ([*p, "--out", str(d / "file")], "exists and is a file, not a folder"),
        "out-folder-with-other-files": ([*p, "--out", str(d / "frames")], "holding other files than frames"),
        "out-not-writable": ([*p, "--out", "/proc/cogvideox-test/video.mp4"], "cannot write in /proc"),
    }


@pytest.mark.parametrize("case", [
    "guidance-inf", "guidance-nan", "fps-0", "embeds-corrupt-safetensors", "embeds-corrupt-pt", "embeds-string",
    "embeds-batch-0", "embeds-nan", "embeds-negative-list", "image-not-an-image", "out-under-a-file",
    "out-is-a-file", "out-folder-with-other-files", "out-not-writable"])
def test_cli_refuses_bad_inputs_before_any_model(tmp_path, capsys, no_model, case):
    """One `error:` line, exit 2, nothing written, no model built."""
    from cogvideox.__main__ import main

    extra, needle = _bad_inputs(tmp_path)[case]
    argv = list(TINY_RUN)
    if "--preset" in extra:   # the I2V case picks its own preset
        i = extra.index("--preset")
        argv[argv.index("tiny")] = extra[i + 1]
        extra = extra[:i] + extra[i + 2:]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(argv + extra)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert e.value.code == 2 and len(errors) == 1 and needle in errors[0], err
    assert sorted(os.listdir(tmp_path)) == before          # nothing written
    assert (tmp_path / "in" / "frames" / "notes.txt").read_text() == "keep me"


def test_cli_replaces_an_earlier_frame_folder_whole(tmp_path, capsys):
    from cogvideox.__main__ import main

    out = tmp_path / "clip"
    out.mkdir()
    (out / "frame_0099.png").write_bytes(b"old")       # a frame of an earlier, longer run
    assert main(TINY_RUN + ["--prompt", "a", "--out", str(out)]) == 0
    written = [ln[len("wrote: "):] for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote: ")]
    assert sorted(os.listdir(out)) == [f"frame_{i:04d}.png" for i in range(len(written))] and len(written) < 99
    assert sorted(os.listdir(tmp_path)) == ["clip"]     # no temporary left beside it


# ---- outputs are never half-written ------------------------------------------------------------------------
def test_failed_frame_folder_leaves_nothing(tmp_path, monkeypatch):
    from PIL import Image

    from cogvideox import pipeline as P

    frames = torch.randint(0, 256, (3, 4, 6, 3), dtype=torch.uint8).numpy()
    calls = []
    real_save = Image.Image.save

    def save_then_fail(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, path, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        P.save_frames(frames, str(tmp_path / "clip"))
    assert os.listdir(tmp_path) == []                       # neither the folder nor its temporary
    assert os.path.dirname(calls[0]) != str(tmp_path / "clip")   # frames went to a temporary folder
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert len(P.save_frames(frames, str(tmp_path / "clip"))) == 3 and os.listdir(tmp_path) == ["clip"]
    # a failed rewrite keeps the earlier folder as it was
    real_rename = os.rename

    def rename_fails_on_the_new_folder(src, dst):
        if ".partial-" in str(src):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_fails_on_the_new_folder)
    with pytest.raises(OSError, match="Input/output"):
        P.save_frames(frames[:1], str(tmp_path / "clip"))
    assert os.listdir(tmp_path) == ["clip"] and len(os.listdir(tmp_path / "clip")) == 3


def test_failed_mp4_leaves_nothing(tmp_path, monkeypatch):
    import types

    from cogvideox import pipeline as P

    class Writer:
        def __init__(self, path):
            self.f = open(path, "wb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def append_data(self, frame):
            if self.f.tell():
                raise RuntimeError("ffmpeg died")
            self.f.write(frame.tobytes())

    monkeypatch.setitem(sys.modules, "imageio", types.SimpleNamespace(get_writer=lambda p, **k: Writer(p)))
    monkeypatch.setattr(P, "_have", lambda *m: True)
    (tmp_path / "v.mp4").write_bytes(b"an earlier video")
    frames = torch.randint(0, 256, (3, 4, 6, 3), dtype=torch.uint8).numpy()
    with pytest.raises(RuntimeError, match="ffmpeg died"):
        P.save_frames(frames, str(tmp_path / "v.mp4"))
    assert os.listdir(tmp_path) == ["v.mp4"] and (tmp_path / "v.mp4").read_bytes() == b"an earlier video"


# ---- the transformer's argument errors ---------------------------------------------------------------------
def test_transformer_input_errors_name_the_argument():
    model = _tiny_model()
    x, text = torch.randn(1, 1, 4, 8, 12), torch.randn(1, 5, 24)
    with pytest.raises(ValueError, match="batch"):
        model(x[:0], text[:0], torch.tensor([], dtype=torch.int64))
    with pytest.raises(TypeError, match="timestep"):
        model(x, text, None)
    with pytest.raises(TypeError, match="timestep"):
        model(x, text, "500")
    with pytest.raises(ValueError, match="timestep"):
        model(x, text, float("nan"))
    assert model(x, text, 500).shape == x.shape


# ---- fast --help, bench --compare on a bad file ------------------------------------------------------------
@pytest.mark.parametrize("module,argv", [("cogvideox", ["generate", "--help"]), ("cogvideox", ["--help"]),
                                         ("bench", ["--help"])])
def test_help_does_not_import_torch(module, argv):
    code = ("import runpy, sys; sys.argv = [%r] + %r\n"
            "try:\n    runpy.run_module(%r, run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')") % (module, argv, module)
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_bench_compare_with_a_file_that_is_not_json(tmp_path, capsys):
    from bench.cli import main

    bad = tmp_path / "old.json"
    for content in (b"not json at all", b"\xff\xfe", b"[]"):
        bad.write_bytes(content)
        for argv in (["--compare", str(bad), "--against", str(bad)], ["--compare", str(bad), "kernels"]):
            assert main(argv + ["--out", str(tmp_path / "run")]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and str(bad) in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


# ---- bench: what the rows and the report claim ---------------------------------------------------------------
def _bench_ctx(size="small", **kw):
    from bench.harness import Ceilings
    from bench.runner import Context

    ceilings = Ceilings(copy_gbps=1.0, matmul_tflops=1.0, copy_bytes=1 << 28, matmul_n=4096, matmul_dtype="fp32",
                        copy_timing={}, matmul_timing={})
    return Context(device=torch.device("cpu"), size=size, dtype=torch.float32, budget_s=0.001, compile=False,
                   ceilings=ceilings, **kw)


def _copy_suite(n_skipped=0):
    from bench.runner import Case, Suite, Variant

    x = torch.randn(1 << 12)

    def build():
        return ([Variant("ours", lambda: (lambda: x.clone()), bytes=2 * x.numel() * 4, max_reps=3)]
                + [Variant(f"backend-{i % 2}", skip="flash_attn is not installed") for i in range(n_skipped)])
    return Suite("kernels", "copy", lambda ctx: [Case("copy 4096", {"n": 4096}, build)])


def test_small_rows_have_no_ceiling_and_cpu_rows_no_peak_memory(tmp_path):
    """1.0 GB/s "ceilings" that a 16 KiB copy beats many times over: no % at small size, one at full size;
    CPU peak memory is n/a, with the reason, never a number that depends on the run order."""
    from bench import report
    from bench.runner import CPU_NO_PEAK_MEM, SMALL_NO_CEILING, plan, run_planned

    for size, has_pct in (("small", False), ("full", True)):
        ctx = _bench_ctx(size)
        (p,) = plan([_copy_suite()], ctx)
        (row,), _ = run_planned(p, ctx, progress=lambda line: None)
        assert row["gbps"] > 0 and (row["pct_of_ceiling"] is not None) == has_pct, row
        assert row["peak_mem_bytes"] is None and row["peak_mem_kind"] == CPU_NO_PEAK_MEM
    ctx = _bench_ctx("small")
    (p,) = plan([_copy_suite()], ctx)
    rows, summary = run_planned(p, ctx, progress=lambda line: None)
    doc = {"created": "now", "size": "small", "argv": [], "device": {"name": "cpu", "type": "cpu"},
           "environment": {"torch": "x", "triton": "x", "cuda": None, "driver": None, "git": {"commit": "c"}},
           "ceilings": ctx.ceilings.as_dict(), "telemetry": {"available": False, "reason": "cpu"},
           "suites": {"kernels": summary}, "rows": rows}
    text = report.render(doc, [], None)
    assert SMALL_NO_CEILING in text and CPU_NO_PEAK_MEM in text
    assert "| n/a |" in text and "(copy)" not in text


def test_skipped_rows_are_grouped_on_the_console():
    from bench.runner import plan, run_planned

    ctx = _bench_ctx()
    (p,) = plan([_copy_suite(n_skipped=9)], ctx)
    lines = []
    rows, _ = run_planned(p, ctx, progress=lines.append)
    assert len(rows) == 10 and sum(r["status"] == "skipped" for r in rows) == 9
    skipped = [ln for ln in lines if "skipped" in ln]
    assert len(skipped) == 2, lines                      # one line per (impl, reason), not one per row
    assert any("backend-0: skipped: flash_attn is not installed (5 rows" in ln for ln in skipped), skipped


def test_small_row_names_give_the_shapes_that_ran():
    from bench.suites import attention, e2e, vae

    ctx = _bench_ctx()
    names = [c.name for s in (attention, vae, e2e) for c in s.cases(ctx)]
    assert names and not [n for n in names if any(r in n for r in ("480x720", "768x1360", "256x384"))], names
    assert "vae decode 32x48 3 latents" in names and "e2e 2b 9x32x48" in names
    assert "attention-op 2b latent 3x12x16 3d" in names


def test_e2e_split_is_the_median_calls_and_fits_in_the_total(monkeypatch):
    """Scripted call times (warm-up, the timing estimate, then two timed calls): the row's time is the median of
    the timed calls, and the split must not come from one call that was slower than that median."""
    import time

    import cogvideox.pipeline as pipeline
    import cogvideox.vae as vae_mod
    from bench.runner import run_variant
    from bench.suites import e2e

    vae_seconds = iter([0.001, 0.02, 0.01, 0.06])       # the last call is far slower than the median

    class FakeVAE(torch.nn.Module):
        def __init__(self, *a, **k):
            super().__init__()

        def decode(self, z):
            time.sleep(next(vae_seconds))

    def fake_generate(transformer, pos, neg, *, vae, **kw):
        vae.decode(None)

    monkeypatch.setattr(vae_mod, "CogVideoXVAE", FakeVAE)
    monkeypatch.setattr(pipeline, "generate", fake_generate)
    ctx = _bench_ctx(models=("2b",))
    ctx.budget_s = 1.0
    (case,) = e2e.cases(ctx)
    (variant,) = case.build()
    row = run_variant("e2e", case, variant, ctx)
    e = row["extra"]
    assert row["status"] == "ok" and row["reps"] == 2, row
    total = row["median_ms"] / 1e3
    assert e["vae_s"] <= total and e["vae_s"] + e["transformer_s"] + e["scheduler_s"] <= total * 1.0001, (e, total)


def test_report_plots_keep_every_label_inside_the_image(tmp_path, monkeypatch):
    """The kernels plot's y label was cut off (the rotated case names take the height): every title, axis label
    and tick label must lie inside what is saved."""
    matplotlib = pytest.importorskip("matplotlib", reason="the plots need matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from bench import report

    outside = []
    real_savefig = Figure.savefig

    def checking_savefig(fig, path, *a, **k):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        area = (fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans) if k.get("bbox_inches") == "tight"
                else fig.bbox)
        for ax in fig.axes:
            (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
            ticks = [lab for pos, lab in zip(ax.get_xticks(), ax.get_xticklabels()) if x0 <= pos <= x1]
            ticks += [lab for pos, lab in zip(ax.get_yticks(), ax.get_yticklabels()) if y0 <= pos <= y1]
            for t in [ax.title, ax.xaxis.label, ax.yaxis.label, *ticks]:   # the drawn ones
                b = t.get_window_extent(renderer)
                if t.get_text() and (b.x0 < area.x0 - 1 or b.y0 < area.y0 - 1 or b.x1 > area.x1 + 1
                                     or b.y1 > area.y1 + 1):
                    outside.append((os.path.basename(path), t.get_text()))
        return real_savefig(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", checking_savefig)
    rows = []
    for op in ("expert_adaln", "expert_adaln_residual", "rope3d", "causal_pad3d", "group_norm_silu_pad+zq"):
        for model in ("2b", "5b"):
            for p in ("fwd", "bwd", "fwd+bwd"):
                for impl in ("eager", "ours"):
                    rows.append({"suite": "kernels", "case": f"{op} {model}", "impl": impl, "pass": p,
                                 "status": "ok", "pct_of_ceiling": 40.0, "gbps": 400.0, "median_ms": 1.0})
    for res, seq in (("256x384x6s", 5218), ("480x720x6s", 17776)):
        rows.append({"suite": "attention", "case": f"step 5b 3d {res}", "impl": "ours", "pass": "step",
                     "status": "ok", "median_ms": seq / 10, "extra": {"model": "5b", "layout": "3d", "seq_len": seq}})
    files, _ = report.make_plots({"rows": rows, "size": "full", "device": {"name": "NVIDIA H100 80GB HBM3"}},
                                 str(tmp_path))
    assert sorted(files) == ["dit_step_vs_seq.png", "kernels_pct_of_ceiling.png"]
    assert not outside, outside
