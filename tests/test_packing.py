"""Multi-resolution frame packing (arXiv 2408.06072 §3): several videos of different lengths and sizes, each with
its own text and timestep, in ONE packed sequence, against each video run alone.

The model's packed forward (`CogVideoXTransformer(list_of_videos, list_of_texts, timesteps)`) runs every per-token
op once over the packed (1, N, D) sequence with a `kernels.Segments` layout and a variable-length attention backend
(cogvideox/attention.py VARLEN_BACKENDS); video i's prediction and every gradient must equal the unpacked model's
on video i alone (fp32, relative 1e-5), for each model family, with the references and with the Triton kernels.
"""
import pytest
import torch

import kernels
from cogvideox.attention import VARLEN_BACKENDS, AttentionBackendError, attention
from cogvideox.config import TransformerConfig
from cogvideox.transformer import CogVideoXTransformer
from diffusers_models import randomize_, tiny_transformer_kwargs

# (F, H, W) latent shapes of three videos: different lengths and resolutions; and their text lengths
VIDEOS = {"2b": [(2, 4, 6), (1, 6, 4), (3, 2, 2)], "5b": [(2, 4, 6), (1, 6, 4), (3, 2, 2)],
          "1.5": [(2, 4, 6), (4, 6, 4), (2, 2, 2)]}
TEXTS = [5, 3, 7]


def _model(family, use_kernels, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = TransformerConfig(**tiny_transformer_kwargs(family, **overrides))
    return randomize_(CogVideoXTransformer(cfg, use_kernels=use_kernels), seed=seed)


def _videos(model, shapes, texts=TEXTS, seed=1):
    g = torch.Generator().manual_seed(seed)
    C, Dt = model.config.in_channels, model.config.text_embed_dim
    latents = [torch.randn(F, C, H, W, generator=g) for F, H, W in shapes]
    text = [torch.randn(L, Dt, generator=g) for L in texts[:len(shapes)]]
    t = torch.randint(0, 1000, (len(shapes),), generator=g)
    return latents, text, t


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _packed_and_alone(model, latents, text, t, backward=True):
    """-> (packed outputs, alone outputs, packed grads, alone grads) with grads of every parameter and input."""
    runs = []
    for packed in (True, False):
        lat = [x.clone().requires_grad_(backward) for x in latents]
        txt = [x.clone().requires_grad_(backward) for x in text]
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            if packed:
                outs = model(lat, txt, t)
            else:
                outs = [model(a[None], b[None], t[i:i + 1])[0] for i, (a, b) in enumerate(zip(lat, txt))]
        grads = {}
        if backward:
            w = torch.Generator().manual_seed(3)
            loss = sum((o * torch.randn(o.shape, generator=w)).sum() for o in outs)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            grads.update({f"latents[{i}]": x.grad for i, x in enumerate(lat)})
            grads.update({f"text[{i}]": x.grad for i, x in enumerate(txt)})
        runs.append(([o.detach() for o in outs], grads))
    return runs[0][0], runs[1][0], runs[0][1], runs[1][1]


def _assert_equal_runs(model, latents, text, t, tol=1e-5):
    po, ao, pg, ag = _packed_and_alone(model, latents, text, t)
    for i, (a, b) in enumerate(zip(po, ao)):
        assert a.shape == b.shape
        assert _rel(a, b) <= tol, f"video {i}: {_rel(a, b)}"
    assert pg.keys() == ag.keys()
    biggest = max(g.abs().max().item() for g in ag.values())
    for name in ag:
        # a gradient that is zero in exact arithmetic is measured against the largest one
        scale = ag[name].abs().max().item()
        err = (pg[name].double() - ag[name].double()).abs().max().item() / max(scale if scale > 1e-3 * biggest
                                                                                else biggest, 1e-30)
        assert err <= tol, f"{name}: {err}"


@pytest.mark.parametrize("family", ["2b", "5b", "1.5"])
def test_packed_equals_alone_references(family):
    model = _model(family, use_kernels=False)
    _assert_equal_runs(model, *_videos(model, VIDEOS[family]))


@pytest.mark.parametrize("family", ["5b", "2b"])
def test_packed_equals_alone_kernels(family, triton_kernels):
    """The Triton kernels (interpreter) with segments: the packed run against the unpacked kernel run."""
    model = _model(family, use_kernels=True)
    _assert_equal_runs(model, *_videos(model, VIDEOS[family][:2]))


def test_packed_checkpointing_is_exact():
    model = _model("5b", use_kernels=False)
    latents, text, t = _videos(model, VIDEOS["5b"])
    po, _, pg, _ = _packed_and_alone(model, latents, text, t)
    model.checkpointing = 1
    co, _, cg, _ = _packed_and_alone(model, latents, text, t)
    for a, b in zip(po, co):
        assert torch.equal(a, b)
    for name in pg:
        assert torch.equal(pg[name], cg[name]), name


def test_one_packed_video_equals_the_unpacked_call():
    model = _model("1.5", use_kernels=False)
    latents, text, t = _videos(model, VIDEOS["1.5"][:1])
    with torch.no_grad():
        packed = model(latents, text, t)[0]
        alone = model(latents[0][None], text[0][None], t)[0]
    assert _rel(packed, alone) <= 1e-6


def test_packed_input_errors():
    model = _model("5b", use_kernels=False)
    latents, text, t = _videos(model, VIDEOS["5b"])
    with pytest.raises(ValueError, match="as many text"):
        model(latents, text[:2], t)
    with pytest.raises(ValueError, match="one timestep per video"):
        model(latents, text, t[:2])
    with pytest.raises(ValueError, match=r"\(F, C, H, W\)"):
        model([latents[0][None]] + latents[1:], text, t)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model([torch.randn(2, 4, 3, 4)] + latents[1:], text, t)
    ablation = CogVideoXTransformer(model.config, use_kernels=False, attention_layout="2d+1d")
    with pytest.raises(ValueError, match="2d\\+1d"):
        ablation(latents, text, t)


# ---- packed attention -------------------------------------------------------------------------------------

def _segments():
    return kernels.Segments([3, 2, 0], [(1, 2, 2), (2, 1, 3), (1, 1, 2)])


def test_packed_attention_equals_attention_per_segment():
    seg = _segments()
    qkv = torch.randn(1, seg.total, 3, 2, 16, requires_grad=True)
    q, k, v = qkv.unbind(2)                                   # strided slices, as the model passes them
    out = attention(q, k, v, segments=seg)
    ref = torch.cat([attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in seg.ranges()], dim=1)
    assert _rel(out, ref) <= 1e-5
    w = torch.randn(out.shape)
    g_out, = torch.autograd.grad((out * w).sum(), qkv)
    g_ref, = torch.autograd.grad((ref * w).sum(), qkv)
    assert _rel(g_out, g_ref) <= 1e-5


def test_flex_backend_forward_on_cpu():
    """FlexAttention with a document block mask (CPU: eager, no grad) against per-segment attention."""
    seg = _segments()
    q, k, v = (torch.randn(1, seg.total, 2, 16) for _ in range(3))
    with torch.no_grad():
        out = attention(q, k, v, segments=seg, backend="flex")
        ref = torch.cat([attention(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in seg.ranges()], dim=1)
    assert _rel(out, ref) <= 1e-5
    with pytest.raises(AttentionBackendError, match="no CPU backward"):
        attention(q.requires_grad_(), k, v, segments=seg, backend="flex")


def test_packed_attention_errors():
    seg = _segments()
    q = torch.randn(1, seg.total, 2, 16)
    with pytest.raises(ValueError, match="packed"):
        attention(q[:, 1:], q[:, 1:], q[:, 1:], segments=seg)
    with pytest.raises(AttentionBackendError, match="unknown packed-attention backend"):
        attention(q, q, q, segments=seg, backend="nope")
    for name in ("flash-attn-2", "sdpa-varlen"):   # CUDA only
        with pytest.raises(AttentionBackendError, match=name):
            attention(q, q, q, segments=seg, backend=name)
    with pytest.raises(TypeError, match="kernels.Segments"):
        attention(q, q, q, segments=[0, 3])
    assert set(VARLEN_BACKENDS) == {"flash-attn-3", "flash-attn-2", "sdpa-varlen", "flex", "sdpa-per-segment"}


def test_segments_layout_and_errors():
    seg = kernels.Segments([3, 0], [(1, 2, 2), (2, 1, 3)], start=[(0, 0, 0), (0, 0.5, 0.25)],
                           step=[(1, 1, 1), (1, 0.5, 0.5)])
    assert seg.lengths == (7, 6) and seg.offsets == (0, 7, 13) and seg.max_len == 7
    assert seg.cu_seqlens.tolist() == [0, 7, 13] and seg.cu_seqlens.dtype == torch.int32
    assert seg.grids_t.tolist() == [[1, 2, 2], [2, 1, 3]] and seg.step_t[1].tolist() == [1, 0.5, 0.5]
    empty = kernels.Segments([2, 0, 1], [(1, 1, 1), (0, 1, 1), (1, 1, 2)])   # an empty segment is allowed
    assert empty.lengths == (3, 0, 3) and empty.offsets == (0, 3, 3, 6)
    q = torch.randn(1, 6, 2, 8)
    out = attention(q, q, q, segments=empty)
    ref = torch.cat([attention(q[:, a:b], q[:, a:b], q[:, a:b]) for a, b in ((0, 3), (3, 6))], dim=1)
    assert _rel(out, ref) <= 1e-6
    with pytest.raises(ValueError, match="one \\(T, Hg, Wg\\) per segment"):
        kernels.Segments([1, 2], [(1, 1, 1)])
    with pytest.raises(ValueError, match="ints >= 0"):
        kernels.Segments([-1], [(1, 1, 1)])
    with pytest.raises(ValueError, match="finite"):
        kernels.Segments([1], [(1, 1, 1)], start=[(0, float("nan"), 0)])
    with pytest.raises(ValueError, match="at least one segment"):
        kernels.Segments([], [])


# ---- training on packed batches -----------------------------------------------------------------------------

def test_packed_train_step_equals_the_unpacked_batch():
    """Videos of one shape: a packed step (one sequence, each its own timestep and noise) makes the same update as
    the unpacked batch with the same draws; videos of different shapes train too (the loss is their mean)."""
    from cogvideox import scheduler, training

    table = scheduler.alphas_cumprod()
    models = [_model("5b", use_kernels=False, dropout=0.0) for _ in range(2)]
    latents, text, _ = _videos(models[0], [(2, 4, 6)] * 2, texts=[6, 6])
    batches = [{"latents": latents, "prompt_embeds": text},
               {"latents": torch.stack(latents), "prompt_embeds": torch.stack(text)}]
    results = []
    for model, batch in zip(models, batches):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # noise for the packed step is drawn per video; at these sizes (multiples of 16 values) the draws equal
        # the one batched draw of the unpacked step
        results.append(training.train_step(model, batch, opt, table, generator=torch.Generator().manual_seed(0),
                                           loss="v-mse"))
    assert torch.equal(results[0].timesteps, results[1].timesteps)
    assert abs(results[0].loss - results[1].loss) <= 1e-5 * abs(results[1].loss)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert _rel(p.detach(), q.detach()) <= 1e-6, name

    model = _model("1.5", use_kernels=False)
    latents, text, _ = _videos(model, VIDEOS["1.5"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    r = training.train_step(model, {"latents": latents, "prompt_embeds": text}, opt, table,
                            generator=torch.Generator().manual_seed(0))
    assert r.timesteps.shape == (3,) and r.loss > 0


def test_compile_blocks_packed_no_graph_break():
    """compile_blocks (fullgraph=True) on a packed forward: no graph break, the same outputs. Each new packing
    layout is a new graph (the layout's sizes are guarded constants): README, frame packing."""
    from torch._dynamo.utils import counters

    from cogvideox.transformer import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    model = _model("5b", use_kernels=False)
    latents, text, t = _videos(model, VIDEOS["5b"])
    with torch.no_grad():
        ref = model(latents, text, t)
        out = compile_blocks(model, backend="eager")(latents, text, t)
    assert not counters["graph_break"]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
