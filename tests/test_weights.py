"""load_transformer: diffusers-format directories (single file, sharded), dtypes, and broken checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cogvideox.weights import CheckpointError, load_transformer
from diffusers_models import save_pretrained, tiny_diffusers_transformer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 1.5-I2V checkpoint (ofs embedding, Linear patch embedding) written by diffusers' save_pretrained."""
    return save_pretrained(tiny_diffusers_transformer("1.5-i2v", seed=11), tmp_path_factory.mktemp("ckpt"))


def _copy(src, dst, state=None, config=None):
    """A copy of the checkpoint directory `src` at `dst` with its state dict and/or config replaced."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg if config is None else config(cfg), f)
    tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    save_file(tensors if state is None else state(tensors), os.path.join(dst, "diffusion_pytorch_model.safetensors"))
    return str(dst)


def test_sharded_equals_single_file(checkpoint, tmp_path):
    ref = tiny_diffusers_transformer("1.5-i2v", seed=11)
    sharded = save_pretrained_sharded(ref, tmp_path)
    assert any(f.endswith(".safetensors.index.json") for f in os.listdir(sharded))
    assert sum(f.endswith(".safetensors") for f in os.listdir(sharded)) > 1
    a, b = load_transformer(checkpoint).state_dict(), load_transformer(sharded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_pretrained_sharded(model, directory):
    model.save_pretrained(str(directory), safe_serialization=True, max_shard_size="20KB")
    return str(directory)


def test_dtype_and_device(checkpoint, tmp_path):
    model = load_transformer(checkpoint)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert not model.training
    bf16 = save_pretrained(tiny_diffusers_transformer("5b-i2v", seed=3).bfloat16(), tmp_path / "bf16")
    assert {t.dtype for t in load_transformer(bf16).state_dict().values()} == {torch.bfloat16}  # kept as stored
    model = load_transformer(bf16, dtype=torch.float32, device="cpu", use_kernels=False)
    assert {t.dtype for t in model.state_dict().values()} == {torch.float32}
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"} and model.use_kernels is False


def test_every_bad_key_in_one_error(checkpoint, tmp_path):
    def break_state(t):
        t = dict(t)
        del t["transformer_blocks.0.attn1.to_k.weight"]
        del t["ofs_embedding.linear_2.bias"]
        t["transformer_blocks.1.ff.net.2.weight"] = t["transformer_blocks.1.ff.net.2.weight"][:, :-1].contiguous()
        t["transformer_blocks.0.attn1.extra.weight"] = torch.zeros(3)
        return t
    path = _copy(checkpoint, tmp_path / "broken", state=break_state)
    with pytest.raises(CheckpointError) as info:
        load_transformer(path)
    msg = str(info.value)
    for needle in ("missing keys (2)", "transformer_blocks.0.attn1.to_k.weight", "ofs_embedding.linear_2.bias",
                   "unexpected keys (1)", "transformer_blocks.0.attn1.extra.weight", "wrong shapes (1)",
                   "transformer_blocks.1.ff.net.2.weight: checkpoint (32, 127), model (32, 128)", path):
        assert needle in msg, (needle, msg)


def test_truncated_file(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "truncated")
    file = os.path.join(path, "diffusion_pytorch_model.safetensors")
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_transformer(path)
    with open(file, "wb") as f:
        f.write(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_transformer(path)


def test_bad_config(checkpoint, tmp_path):
    path = _copy(checkpoint, tmp_path / "cfg", config=lambda c: {**c, "qk_norm": "rms_norm"})
    with pytest.raises(CheckpointError, match=r"config.json: .*unknown key qk_norm"):
        load_transformer(path)
    path = _copy(checkpoint, tmp_path / "cfg2", config=lambda c: {**c, "num_layers": 3})   # config/weights disagree
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): transformer_blocks\.2\."):
        load_transformer(path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_transformer(str(tmp_path))


def test_no_diffusers_import(checkpoint):
    """Loading and running the model never imports diffusers (a test-only dependency)."""
    code = ("import sys, torch; from cogvideox.weights import load_transformer; "
            f"m = load_transformer({checkpoint!r}); "
            "m(torch.randn(1, 2, 8, 4, 4), torch.randn(1, 5, 24), torch.tensor([3]), torch.tensor([2.0])); "
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
