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
    tiled path runs (a 64 x 96 video, the tiny transformer's sample size, spans 2 x 3 tiles)."""
    from cogvideox.vae import CogVideoXVAE

    t, v = TransformerConfig.preset("tiny"), VAEConfig.preset("tiny")
    assert v.latent_channels == t.out_channels == t.in_channels
    torch.manual_seed(0)
    vae = CogVideoXVAE(v).eval()
    assert vae.tile_grid("decode") == ((6, 5), (5, 4), (8, 8), (40, 32))
    z = torch.randn(1, t.out_channels, 1, t.sample_height, t.sample_width)
    tiled, untiled = vae.decode(z, tiling=True), vae.decode(z, tiling=False)
    assert tiled.shape == untiled.shape == (1, 3, 1, 8 * t.sample_height, 8 * t.sample_width)
    assert (tiled - untiled).abs().max() > 0   # the tiled path really ran
    assert vae.encode(tiled, tiling=True).mode().shape == z.shape
