"""Context parallelism (cogvideox/parallel.py) against one process, in real gloo process groups on CPU.

Every worker builds the same tiny model and inputs (same seeds), runs the one-process forward and backward, then
the sharded ones, and compares: outputs, every parameter gradient (after `reduce_gradients`) and the input
gradients, fp32, relative error <= 1e-5. Sequence lengths, text lengths and head counts are chosen so that nothing
divides by the degree (uneven shards and head groups, a shard boundary inside the text, empty head groups).
"""
import copy
import os

import pytest
import torch

from cogvideox import parallel as cp
from cogvideox.config import TransformerConfig
from cogvideox.transformer import CogVideoXTransformer, compile_blocks
from diffusers_models import randomize_, tiny_transformer_kwargs
from distributed import run_workers

# 3 heads (uneven on 2 and 4 ranks, an empty group on 4), 29 text tokens (a shard boundary inside the text)
HEADS, TEXT = 3, 29
SHAPES = {"2b": (2, 3, 4, 6, 10), "5b": (2, 3, 4, 6, 10), "1.5": (2, 4, 4, 6, 8), "1.5-i2v": (2, 2, 8, 4, 6),
          "5b-i2v": (2, 3, 8, 8, 12)}


def _model(family, seed=0):
    kwargs = tiny_transformer_kwargs(family, num_attention_heads=HEADS)
    if family == "5b-i2v":   # the learned table needs the training grid and max_text_seq_length text tokens
        kwargs["max_text_seq_length"] = TEXT
    torch.manual_seed(seed)
    return randomize_(CogVideoXTransformer(TransformerConfig(**kwargs)), seed=seed)


def _inputs(model, shape, seed=1, text_len=TEXT):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(shape, generator=g)
    text = torch.randn(shape[0], text_len, model.config.text_embed_dim, generator=g)
    timestep = torch.randint(0, 1000, (shape[0],), generator=g)
    ofs = torch.full((1,), 2.0) if model.config.ofs_embed_dim else None
    return latents, text, timestep, ofs


def _rel(a, b, scale=None):
    """max |a - b| / max |b|, or / `scale` when given (for tensors that are zero in exact arithmetic)."""
    if b.numel() == 0:
        return 0.0 if a.shape == b.shape else float("inf")
    denom = b.double().abs().max().item() if scale is None else scale
    return (a.double() - b.double()).abs().max().item() / max(denom, 1e-30)


def _errors(model, x, pm, backward=True):
    """-> {name: relative error} of the sharded forward (and backward) against the one-process one."""
    ref_model, cp_model = model, copy.deepcopy(model)
    latents, text, timestep, ofs = x
    w = torch.randn(latents.shape[:2] + (ref_model.config.out_channels,) + latents.shape[3:],
                    generator=torch.Generator().manual_seed(7))
    runs = {}
    for name, m, par in (("ref", ref_model, None), ("cp", cp_model, pm)):
        lat, txt = latents.clone().requires_grad_(backward), text.clone().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            out = m(lat, txt, timestep, ofs, parallel=par)
        if backward:
            (out * w).sum().backward()
            cp.reduce_gradients(m.parameters(), par)
        runs[name] = out.detach(), lat.grad, txt.grad, {k: p.grad for k, p in m.named_parameters()}
    (o_ref, l_ref, t_ref, g_ref), (o_cp, l_cp, t_cp, g_cp) = runs["ref"], runs["cp"]
    errors = {"out": _rel(o_cp, o_ref)}
    if backward:
        errors.update({"d_latents": _rel(l_cp, l_ref), "d_text": _rel(t_cp, t_ref)})
        # A gradient that is zero in exact arithmetic is rounding noise in both runs (norm_k.bias without RoPE:
        # one vector added to every key shifts each query's logits by a constant, to which softmax is blind): such a
        # tensor is measured against the largest parameter gradient instead of its own noise.
        largest = max(g.abs().max().item() for g in g_ref.values() if g is not None)
        for k, g in g_ref.items():
            if g is not None:
                zero = g.abs().max().item() <= 1e-5 * largest
                errors[f"d_{k}"] = _rel(g_cp[k], g, largest if zero else None)
    return errors


def _check(errors, where, tol=1e-5):
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{where}: relative errors above {tol}: {bad}"


def _parity_worker(rank, world, cases):
    """cases: (settings, family, latent shape, text length); one process group, a mesh per setting."""
    meshes = {}
    for settings, family, shape, text_len in cases:
        key = tuple(sorted(settings.items()))
        if key not in meshes:
            meshes[key] = cp.init_parallel(cp.Parallel(**settings))
        model = _model(family)
        errors = _errors(model, _inputs(model, shape, text_len=text_len), meshes[key])
        _check(errors, f"{settings} {family} {shape} text {text_len} rank {rank}")


def _cases(settings, families):
    return [(settings, f, SHAPES[f], TEXT) for f in families]


def test_two_ranks_ulysses_and_ring():
    run_workers(_parity_worker, 2, _cases({"ulysses": 2}, ["2b", "5b", "1.5"])
                + _cases({"ring": 2}, ["5b", "1.5-i2v"]))


def test_three_ranks_ulysses_and_ring():
    run_workers(_parity_worker, 3, _cases({"ring": 3}, ["5b", "1.5"]) + _cases({"ulysses": 3}, ["2b", "5b-i2v"]))


def test_four_ranks_hybrid_and_awkward_layouts():
    """2 x 2 hybrid; 4-way Ulysses with 3 heads (one empty head group); 4-way ring; and odd layouts: text shorter
    than a shard, one latent frame, no text at all, batch 1."""
    hybrid = {"ulysses": 2, "ring": 2}
    run_workers(_parity_worker, 4, _cases(hybrid, ["2b", "5b", "1.5"]) + _cases({"ulysses": 4}, ["5b"])
                + _cases({"ring": 4}, ["2b"])
                + [(hybrid, "5b", (1, 1, 4, 2, 2), 3), (hybrid, "2b", (2, 3, 4, 4, 6), 1),
                   (hybrid, "1.5", (1, 2, 4, 2, 4), 0)])


def _misc_worker(rank, world):
    """Two ranks: CFG combine, the errors that need a process group, and collectives broken on purpose."""
    with pytest.raises(cp.ParallelError, match="world size is 2"):
        cp.init_parallel(cp.Parallel(ulysses=3))
    with pytest.raises(cp.ParallelError, match="exceeds the world size"):
        cp.init_parallel(cp.Parallel(ring=2, vae=3))
    pm = cp.init_parallel(cp.Parallel(cfg=2))
    both = cp.cfg_combine(torch.full((1, 3), float(pm.cfg_rank)), pm)
    assert both.tolist() == [[0.0] * 3, [1.0] * 3], both
    with pytest.raises(cp.ParallelError, match="ranks disagree on latents shape"):
        cp.check_same(pm, "latents shape", (1, 3 + rank, 4))

    # Break a collective on purpose: the parity check must see it.
    model = _model("5b")
    x = _inputs(model, SHAPES["5b"])
    ring, shift = cp.init_parallel(cp.Parallel(ring=2)), cp._ring_shift
    cp._ring_shift = lambda t, group, n, r, incoming: shift(t, group, n, (r + 1) % n, incoming)   # wrong order
    try:
        err = _errors(model, x, ring, backward=False)["out"]
    finally:
        cp._ring_shift = shift
    assert err > 1e-3, f"K/V sent the wrong way round the ring went unnoticed (error {err})"
    ulysses, exchange = cp.init_parallel(cp.Parallel(ulysses=2)), cp.parallel_attention
    cp.parallel_attention = lambda q, k, v, pm, seq_len, local: local(q, k, v)          # a dropped all-to-all
    try:
        err = _errors(model, x, ulysses, backward=False)["out"]
    finally:
        cp.parallel_attention = exchange
    assert err > 1e-3, f"a dropped Ulysses exchange went unnoticed (error {err})"
    _check(_errors(model, x, ulysses, backward=False), "restored")


def test_cfg_errors_and_broken_collectives():
    run_workers(_misc_worker, 2)


def _compile_worker(rank, world):
    from torch._dynamo.utils import counters

    model = _model("5b")
    for settings in ({"ulysses": 2}, {"ring": 2}):
        pm = cp.init_parallel(cp.Parallel(**settings))
        torch._dynamo.reset()
        counters.clear()
        compiled = compile_blocks(copy.deepcopy(model), backend="eager")
        for shape in ((1, 3, 4, 6, 10), (1, 2, 4, 8, 12), (1, 3, 4, 4, 14)):
            x = _inputs(model, shape)
            with torch.no_grad():
                expected = model(*x, parallel=pm)
                got = compiled(*x, parallel=pm)
            assert _rel(got, expected) <= 1e-6, settings
        breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
        assert breaks == 0, (settings, dict(counters["graph_break"]))
        assert graphs <= 2, f"{settings}: {graphs} graphs for three resolutions (at most one recompilation)"


def test_compile_blocks_under_context_parallelism():
    """fullgraph=True (a graph break would raise), the functional collectives traced, <= 1 recompilation."""
    run_workers(_compile_worker, 2)


# ---- settings and errors ------------------------------------------------------------------------------------------
def test_parse_and_validate():
    assert cp.Parallel.parse("ulysses=2,ring=2,cfg=2") == cp.Parallel(2, 2, 2)
    assert cp.Parallel.parse("ring=3, vae=2") == cp.Parallel(ring=3, vae=2)
    assert cp.Parallel(ulysses=3, ring=2).world_size == 6
    for bad, msg in (("ulysses=2,ulysses=3", "twice"), ("tp=2", "not one of"), ("ring=x", "not an integer"),
                     ("ring=0", "positive"), ("cfg=3", "cfg must be 1 or 2"), ("", "key=value")):
        with pytest.raises(cp.ParallelError, match=msg):
            cp.Parallel.parse(bad)


def test_sizes_cover_every_token_once():
    for n_tokens in (0, 1, 5, 226 + 13 * 30 * 45, 17777):
        for n in (1, 2, 3, 4, 7, 8):
            ranges = cp.shard_ranges(n_tokens, n)
            assert ranges[0][0] == 0 and ranges[-1][1] == n_tokens
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(cp.shard_sizes(n_tokens, n)) - min(cp.shard_sizes(n_tokens, n)) <= 1
    assert cp.head_groups(30, 4) == [8, 8, 7, 7] and cp.head_groups(30, 8) == [4] * 6 + [3] * 2


def test_needs_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(cp.ParallelError, match="torchrun"):
        cp.init_parallel(cp.Parallel(ring=2))


def test_cuda_run_with_too_few_gpus(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(cp.ParallelError, match="1 CUDA device"):
        cp.init_parallel(cp.Parallel(ring=2), device="cuda")


# ---- the command line under torchrun -------------------------------------------------------------------------------
def _generate(tmp_path, name, nproc=None, parallel=None, timeout=240):
    import subprocess
    import sys

    out = tmp_path / f"{name}.safetensors"
    args = ["-m", "cogvideox", "generate", "--preset", "tiny", "--random-init", "--prompt", "a cat", "--steps", "3",
            "--frames", "9", "--height", "48", "--width", "80", "--out", str(tmp_path / f"{name}_frames"),
            "--save-latents", str(out), "--no-progress", "--sampler", "dpm"]
    if nproc is not None:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args,
                "--parallel", parallel]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(str(out))["latents"], run


def _frames(folder):
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("frame_*.png"))]).astype(int)


@pytest.mark.parametrize("nproc,parallel", [(2, "cfg=2"), (4, "ulysses=2,ring=2,vae=2")])
def test_torchrun_generate_writes_the_one_process_latents(tmp_path, nproc, parallel):
    """A 3-step tiny DPM run (stochastic sampler: every rank must draw the same noise) at 48 x 80: the latents that
    rank 0 writes equal one process's, and so do the frames (decoded on 2 ranks with vae=2, to within one
    8-bit level: 1e-6 differences may round a pixel the other way); only rank 0 writes."""
    one, _ = _generate(tmp_path, "one")
    many, run = _generate(tmp_path, "many", nproc, parallel)
    assert _rel(many, one) <= 1e-5
    a, b = _frames(tmp_path / "one_frames"), _frames(tmp_path / "many_frames")
    assert a.shape == b.shape == (9, 48, 80, 3) and abs(a - b).max() <= 1
    for written in ("many.safetensors", "frame_0000.png"):   # by rank 0 alone
        assert run.stdout.count(written) == 1, run.stdout


def test_cli_parallel_errors(capsys):
    from cogvideox.__main__ import main

    base = ["generate", "--preset", "tiny", "--random-init", "--prompt", "x", "--out", "/tmp/never_written"]
    for extra, msg in ((["--parallel", "ring=2"], "needs torchrun"), (["--parallel", "ring=two"], "not an integer"),
                       (["--parallel", "pp=2"], "not one of")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
