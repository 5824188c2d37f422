"""kernels: forward, backward and forward+backward of every fused op against the baselines a user would pick.

Per op three implementations: "eager", the sequence of PyTorch ops diffusers 0.42.1 runs for the same work (two
streams, each normalized and modulated, then the cat; LayerNorm then apply_rotary_emb with a precomputed table;
the cat of first-frame copies and the clone of the conv cache, its Conv3d padding H and W itself); "compile",
torch.compile of the op's pure-torch reference; "ours", the public op (Triton on CUDA). Throughput is GB/s over
the minimum bytes (bench/flops.py) and % of the measured copy bandwidth. Shapes: CogVideoX-2B / -5B blocks
(B = 2, S = 226 + 13x30x45 = 17,776, D = 1920 / 3072, 30 / 48 heads of 64; rope3d on the strided q slice of the fused (B, S, 3, H, Dh) QKV output, as the model calls it) and the
VAE's full-resolution pad (1, 128, 9, 480, 720); small stand-ins on a CPU. Row names carry the shape they ran.
`python -m bench kernels --static` prints what the sm_90 builds predict instead (static_rows, below).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from .. import flops
from ..runner import Case, Context, Suite, Variant

DIT = {"2b": {"dim": 1920, "heads": 30}, "5b": {"dim": 3072, "heads": 48}}
DIT_SMALL = {"2b": {"dim": 256, "heads": 4}, "5b": {"dim": 384, "heads": 6}}
FULL = {"batch": 2, "text_len": 226, "grid": (13, 30, 45), "vae": (1, 128, 9, 480, 720)}
SMALL = {"batch": 2, "text_len": 16, "grid": (3, 6, 8), "vae": (1, 32, 5, 24, 36)}
# How cogvideox.vae pads H and W around its k3 convs: in the padded copy (1, 1) or inside the conv (0, 0).
VAE_PAD_HW = (0, 0)
BACKENDS = {"eager": "diffusers' op sequence, eager", "compile": "torch.compile(<op>_ref)"}


def _ours_backend(x: torch.Tensor) -> tuple[str, str | None]:
    """What the public op runs on x, and why it is not worth timing (None when it is)."""
    from kernels._dispatch import use_triton
    if not use_triton(x):
        return "torch-reference", None
    if not x.is_cuda:
        return "triton-interpreter", "the Triton interpreter (TRITON_INTERPRET=1) checks numerics, its timings " \
                                     "mean nothing; Triton rows need a GPU"
    return "triton", None


def _compiled(fn):
    """torch.compile(fn), compiled at its first call (so a skipped compile row costs nothing). Static shapes: each
    case compiles its own graphs; a fresh Dynamo cache per case keeps the recompile limit (after which Dynamo
    silently falls back to eager) out of reach."""
    state = {}

    def call(*args):
        if "f" not in state:
            torch._dynamo.reset()
            state["f"] = torch.compile(fn, dynamic=False)
        return state["f"](*args)
    return call


def _variants(ctx: Context, impl: str, call, inputs: list, grad_outputs, bytes_by_pass: dict,
              backend: str | None = None, skip: str | None = None) -> list[Variant]:
    """Three rows for one implementation. call(*inputs) returns the outputs that receive gradients (a tuple)."""
    if impl == "compile":
        skip = skip or ctx.no_compile_reason
    backend = backend or BACKENDS.get(impl)
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd():
        def run():
            with torch.no_grad():
                return call(*inputs)
        return run

    def bwd():
        outs = call(*inputs)
        grads = grad_outputs(outs)
        return lambda: torch.autograd.grad(outs, diff, grads, retain_graph=True)

    def fwd_bwd():
        grads = grad_outputs(call(*inputs))
        return lambda: torch.autograd.grad(call(*inputs), diff, grads)

    return [Variant(impl, make, pass_=p, skip=skip, bytes=bytes_by_pass[p], backend=backend)
            for p, make in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd))]


def _est_bytes(nbytes: dict) -> int:
    # Three implementations each hold their inputs and outputs; one of them at a time adds its saved tensors,
    # gradients and the references' fp32 temporaries (about two forward+backward's worth).
    return 3 * nbytes["fwd"] + 2 * nbytes["fwd+bwd"]


def _grads_like(outs):
    g = torch.Generator(device=outs[0].device).manual_seed(1)
    return tuple(torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with t's strides (a strided view stays a strided view of a fresh buffer)."""
    if t.is_contiguous():
        return t.detach().clone().requires_grad_(True)
    base = t._base if t._base is not None else t
    view = base.detach().clone().as_strided(t.shape, t.stride(), t.storage_offset())
    return view.requires_grad_(True)


# ---- eager baselines: what diffusers runs (two streams, text first in the cat) ---------------------------------

def _eager_adaln(enc, hid, shift, scale, w, b, eps):
    # CogVideoXLayerNormZero on each stream (one LayerNorm), then the processor's cat([text, vision]).
    D = hid.shape[-1]
    h = F.layer_norm(hid, (D,), w, b, eps) * (1 + scale[:, 1])[:, None] + shift[:, 1][:, None]
    e = F.layer_norm(enc, (D,), w, b, eps) * (1 + scale[:, 0])[:, None] + shift[:, 0][:, None]
    return (torch.cat([e, h], dim=1),)


def _eager_adaln_residual(enc, hid, a_enc, a_hid, gate, shift, scale, w, b, eps):
    hid = hid + gate[:, 1][:, None] * a_hid
    enc = enc + gate[:, 0][:, None] * a_enc
    return (enc, hid) + _eager_adaln(enc, hid, shift, scale, w, b, eps)


def _tag(*dims) -> str:
    return "x".join(map(str, dims))


def _dit_case(op: str, model: str, shp: dict, ctx: Context) -> Case:
    B, L, grid = shp["batch"], shp["text_len"], shp["grid"]
    dims = (DIT if ctx.full else DIT_SMALL)[model]
    D, H = dims["dim"], dims["heads"]
    S = L + grid[0] * grid[1] * grid[2]
    tag = f"{_tag(B, S, H, D // H)} qkv-slice" if op == "rope3d" else _tag(B, S, D)
    item = torch.tensor([], dtype=ctx.dtype).element_size()
    if op == "rope3d":
        shape = {"B": B, "S": S, "H": H, "Dh": D // H, "text_len": L, "grid": list(grid)}
        nbytes = flops.rope3d_bytes(B, S, H, D // H, item)
    elif op == "expert_adaln":
        shape = {"B": B, "S": S, "D": D, "E": 2, "text_len": L}
        nbytes = flops.expert_adaln_bytes(B, S, D, 2, item)
    else:
        shape = {"B": B, "S": S, "D": D, "E": 2, "text_len": L}
        nbytes = flops.expert_adaln_residual_bytes(B, S, D, 2, item)

    def build() -> list[Variant]:
        import kernels
        dev, dt = ctx.device, ctx.dtype
        g = torch.Generator(device=dev).manual_seed(0)

        def rnd(*s, scale=1.0):
            return torch.randn(*s, generator=g, device=dev, dtype=dt) * scale

        if op == "rope3d":
            return _rope_variants(ctx, kernels, rnd, B, S, H, D // H, L, grid, nbytes)
        x, y = rnd(B, S, D), rnd(B, S, D)
        gate, shift, scale = rnd(B, 2, D, scale=0.1), rnd(B, 2, D, scale=0.1), rnd(B, 2, D, scale=0.1)
        w, b = 1 + rnd(D, scale=0.1), rnd(D, scale=0.1)
        eps = 1e-5
        backend, why = _ours_backend(x)
        out = []
        if op == "expert_adaln":
            enc, hid = _leaf(x[:, :L]), _leaf(x[:, L:])
            lv = [_leaf(t) for t in (x, shift, scale, w, b)]
            ev = [enc, hid] + [_leaf(t) for t in (shift, scale, w, b)]
            out += _variants(ctx, "eager", lambda *a: _eager_adaln(*a, eps), ev, _grads_like, nbytes)
            ref = _compiled(kernels.expert_adaln_ref)

            def comp(xx, sh, sc, ww, bb):
                return (ref(xx, sh, sc, L, ww, bb, eps),)
            out += _variants(ctx, "compile", comp, [_leaf(t) for t in (x, shift, scale, w, b)], _grads_like,
                             nbytes)
            out += _variants(ctx, "ours",
                             lambda xx, sh, sc, ww, bb: (kernels.expert_adaln(xx, sh, sc, L, ww, bb, eps),),
                             lv, _grads_like, nbytes, backend=backend, skip=why)
        else:
            ev = [_leaf(x[:, :L]), _leaf(x[:, L:]), _leaf(y[:, :L]), _leaf(y[:, L:])] + \
                 [_leaf(t) for t in (gate, shift, scale, w, b)]
            out += _variants(ctx, "eager", lambda *a: _eager_adaln_residual(*a, eps), ev, _grads_like, nbytes)
            ref = _compiled(kernels.expert_adaln_residual_ref)

            def comp(xx, yy, ga, sh, sc, ww, bb):
                return tuple(ref(xx, yy, ga, sh, sc, L, ww, bb, eps))
            out += _variants(ctx, "compile", comp, [_leaf(t) for t in (x, y, gate, shift, scale, w, b)], _grads_like,
                             nbytes)
            out += _variants(
                ctx, "ours", lambda xx, yy, ga, sh, sc, ww, bb: tuple(
                    kernels.expert_adaln_residual(xx, yy, ga, sh, sc, L, ww, bb, eps)),
                [_leaf(t) for t in (x, y, gate, shift, scale, w, b)], _grads_like, nbytes, backend=backend, skip=why)
        return out

    return Case(f"{op} {model} {tag}", shape, build, est_bytes=_est_bytes(nbytes))


def _rope_variants(ctx: Context, kernels, rnd, B, S, H, Dh, L, grid, nbytes) -> list[Variant]:
    from kernels.rope3d import default_axes_dim, rope3d_table
    # the model's q: a strided slice of the fused QKV projection, (B, S, 3, H, Dh)[:, :, 0]
    x = rnd(B, S, 3, H, Dh)[:, :, 0]
    w, b = 1 + rnd(Dh, scale=0.1), rnd(Dh, scale=0.1)
    eps = 1e-6
    axes = default_axes_dim(Dh)
    backend, why = _ours_backend(x)
    out = []
    try:
        from diffusers.models.embeddings import apply_rotary_emb
    except ImportError as e:
        apply_rotary_emb, eager_skip = None, f"diffusers not importable: {e}"
    else:
        eager_skip = None
    cos, sin = rope3d_table(grid, axes_dim=axes, device=x.device)        # precomputed, as the pipeline does

    def eager(xx, ww, bb):
        # diffusers: q.view(B, S, H, Dh).transpose(1, 2) -> norm_q -> rotate the vision rows in place.
        q = F.layer_norm(xx.transpose(1, 2), (Dh,), ww, bb, eps)            # (B, H, S, Dh)
        q[:, :, L:] = apply_rotary_emb(q[:, :, L:], (cos, sin))
        return (q,)
    out += _variants(ctx, "eager", eager, [_leaf(t) for t in (x, w, b)], _grads_like, nbytes, skip=eager_skip)
    ref = _compiled(kernels.rope3d_ref)

    def comp(xx, ww, bb):
        return (ref(xx, L, grid, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 10000.0, axes, ww, bb, eps),)
    out += _variants(ctx, "compile", comp, [_leaf(t) for t in (x, w, b)], _grads_like, nbytes)
    out += _variants(ctx, "ours", lambda xx, ww, bb: (kernels.rope3d(xx, L, grid, weight=ww, bias=bb, eps=eps),),
                     [_leaf(t) for t in (x, w, b)], _grads_like, nbytes, backend=backend, skip=why)
    return out


# ---- VAE ops --------------------------------------------------------------------------------------------------

def _eager_pad(h, kt, pad_hw):
    # diffusers CogVideoXCausalConv3d: cat of kt - 1 first-frame copies, conv_cache = last kt - 1 frames (clone);
    # its Conv3d pads H and W inside the convolution, so no F.pad is run here unless the op is asked to pad
    h = torch.cat([h[:, :, :1]] * (kt - 1) + [h], dim=2)
    cache = h[:, :, h.shape[2] - (kt - 1):].clone()
    if pad_hw[0] or pad_hw[1]:
        h = F.pad(h, (pad_hw[1], pad_hw[1], pad_hw[0], pad_hw[0]))
    return h, cache


def _vae_case(op: str, ctx: Context, zq: bool = False) -> Case:
    B, C, T, H, W = (FULL if ctx.full else SMALL)["vae"]
    kt, pad_hw, groups = 3, VAE_PAD_HW, 32 if C >= 32 else C
    item = torch.tensor([], dtype=ctx.dtype).element_size()
    if op == "causal_pad3d":
        nbytes = flops.causal_pad3d_bytes(B, C, T, H, W, kt, pad_hw, item)
        name = op
    else:
        gn = importlib.import_module("kernels.group_norm_silu_pad")   # the package re-exports the function
        fits = tuple(pad_hw) == (0, 0) and gn.fused_blocks(C // groups, T, kt - 1, H * W) is not None
        nbytes = flops.group_norm_silu_pad_bytes(B, C, T, H, W, kt, pad_hw, zq, item, fits=fits)
        name = op + ("+zq" if zq else "")
    shape = {"B": B, "C": C, "T": T, "H": H, "W": W, "kernel_t": kt, "pad_hw": list(pad_hw)}
    if op != "causal_pad3d":
        shape.update(num_groups=groups, zq=zq)

    def first(outs):
        return _grads_like(outs[:1])

    def build() -> list[Variant]:
        import kernels
        g = torch.Generator(device=ctx.device).manual_seed(0)

        def rnd(*s, scale=1.0):
            return torch.randn(*s, generator=g, device=ctx.device, dtype=ctx.dtype) * scale

        x = rnd(B, C, T, H, W)
        backend, why = _ours_backend(x)
        if op == "causal_pad3d":
            ref = _compiled(kernels.causal_pad3d_ref)

            def comp(xx):
                return ref(xx, kt, None, pad_hw, "first")[:1]
            return (_variants(ctx, "eager", lambda xx: _eager_pad(xx, kt, pad_hw)[:1], [_leaf(x)], first, nbytes)
                    + _variants(ctx, "compile", comp, [_leaf(x)], first, nbytes)
                    + _variants(ctx, "ours", lambda xx: kernels.causal_pad3d(xx, kt, None, pad_hw, "first")[:1],
                                [_leaf(x)], first, nbytes, backend=backend, skip=why))
        w, b = 1 + rnd(C, scale=0.1), rnd(C, scale=0.1)
        extra = [rnd(B, C, T, H, W, scale=0.5) + 1, rnd(B, C, T, H, W, scale=0.5)] if zq else []
        eps = 1e-6

        def eager(xx, ww, bb, *zz):
            h = F.group_norm(xx, groups, ww, bb, eps)
            if zz:
                h = h * zz[0] + zz[1]          # SpatialNorm3D: norm(f) * conv_y(zq) + conv_b(zq)
            return _eager_pad(F.silu(h), kt, pad_hw)[:1]

        ref = _compiled(kernels.group_norm_silu_pad_ref)

        def comp(xx, ww, bb, *zz):
            return ref(xx, groups, ww, bb, eps, kt, None, pad_hw, *(zz or (None, None)))[:1]

        def ours(xx, ww, bb, *zz):
            return kernels.group_norm_silu_pad(xx, groups, ww, bb, eps, kt, None, pad_hw,
                                               *(zz or (None, None)))[:1]

        def leaves():
            return [_leaf(t) for t in [x, w, b] + extra]
        return (_variants(ctx, "eager", eager, leaves(), first, nbytes)
                + _variants(ctx, "compile", comp, leaves(), first, nbytes)
                + _variants(ctx, "ours", ours, leaves(), first, nbytes, backend=backend, skip=why))

    return Case(f"{name} vae {_tag(B, C, T, H, W)}", shape, build, est_bytes=_est_bytes(nbytes))


def cases(ctx: Context) -> list[Case]:
    shp = FULL if ctx.full else SMALL
    out = [_dit_case(op, m, shp, ctx) for op in ("expert_adaln", "expert_adaln_residual", "rope3d")
           for m in ctx.models if m in DIT]
    out += [_vae_case("causal_pad3d", ctx), _vae_case("group_norm_silu_pad", ctx),
            _vae_case("group_norm_silu_pad", ctx, zq=True)]
    return out


def notes(ctx: Context) -> list[str]:
    if ctx.device.type == "cuda":
        return []
    return ["CPU run: small shapes; 'ours' runs the torch reference on a CPU. The Triton rows and the real "
            "CogVideoX shapes (S = 17,776, D = 1920 / 3072; VAE 1x128x9x480x720) need a GPU."]


SUITE = Suite("kernels", "fused ops fwd/bwd/fwd+bwd vs diffusers' eager ops and torch.compile (GB/s, % of copy)",
              cases, notes)


# ---- static: what the sm_90 builds at the real launch arguments predict (no GPU needed) -------------------------

def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def static_cases(models=("2b", "5b")) -> list[tuple]:
    """(op, model/shape tag, pass, launcher, args, minimum bytes) at CogVideoX's shapes, bf16 on meta tensors: the
    arguments the model's own calls pass (rope3d gets the strided q slice of the fused QKV output; the VAE ops run
    as cogvideox.vae calls them, on the first decoder chunk at 480 x 720 and on the latent-resolution block)."""
    import sys

    import kernels  # noqa: F401  (imports the modules the launchers live in)
    ea, rp = sys.modules["kernels.expert_adaln"], sys.modules["kernels.rope3d"]
    cp, gn = sys.modules["kernels.causal_pad3d"], sys.modules["kernels.group_norm_silu_pad"]
    B, L, grid = FULL["batch"], FULL["text_len"], FULL["grid"]
    S = L + grid[0] * grid[1] * grid[2]
    out = []
    for m in models:
        D, H = DIT[m]["dim"], DIT[m]["heads"]
        x, mod, w = _meta(B, S, D), _meta(B, 2, D), _meta(D)
        stats = _meta(B, S, dtype=torch.float32)                 # the forward's saved mean / rstd
        tag = f"{m} {B}x{S}x{D}"
        nb = flops.expert_adaln_bytes(B, S, D, 2)
        out += [("expert_adaln", tag, "fwd", ea.expert_adaln_fwd, (x, None, None, mod, mod, L, w, w, 1e-5), nb["fwd"]),
                ("expert_adaln", tag, "bwd", ea.expert_adaln_bwd, (x, None, x, stats, stats, None, None, mod, L, w, w),
                 nb["bwd"])]
        nb = flops.expert_adaln_residual_bytes(B, S, D, 2)
        out += [("expert_adaln_residual", tag, "fwd", ea.expert_adaln_fwd, (x, x, mod, mod, mod, L, w, w, 1e-5),
                 nb["fwd"]),
                ("expert_adaln_residual", tag, "bwd", ea.expert_adaln_bwd,
                 (x, x, x, stats, stats, x, mod, mod, L, w, w), nb["bwd"])]
        Dh = D // H
        q = _meta(B, S, 3, H, Dh)[:, :, 0]                       # (B, S, H, Dh), the model's strided q slice
        start, step, wq = _meta(3, dtype=torch.float32), _meta(3, dtype=torch.float32), _meta(Dh)
        axes = rp.default_axes_dim(Dh)
        nb = flops.rope3d_bytes(B, S, H, Dh)
        tag = f"{m} {B}x{S}x{H}x{Dh} qkv-slice"
        out += [("rope3d", tag, "fwd", rp.rope3d_fwd, (q, L, grid, start, step, 10000.0, axes, wq, wq, 1e-6),
                 nb["fwd"]),
                ("rope3d", tag, "bwd", rp.rope3d_bwd,
                 (_meta(B, S, H, Dh), q, L, grid, start, step, 10000.0, axes, wq, wq, 1e-6), nb["bwd"])]
        # q and k in one launch: the (B, S, 2H, Dh) view of both, (2, Dh) weights (norm_q, norm_k stacked); bytes
        # those of 2H heads plus the second weight / bias row (read twice forward, read + two written backward)
        qk, wqk = _meta(B, S, 3 * H * Dh).unflatten(-1, (3, H, Dh))[:, :, :2].flatten(2, 3), _meta(2, Dh)
        nb = flops.rope3d_bytes(B, S, 2 * H, Dh)
        tag = f"{m} {B}x{S}x{2 * H}x{Dh} qk-view"
        out += [("rope3d", tag, "fwd", rp.rope3d_fwd, (qk, L, grid, start, step, 10000.0, axes, wqk, wqk, 1e-6),
                 nb["fwd"] + 2 * Dh * 2),
                ("rope3d", tag, "bwd", rp.rope3d_bwd,
                 (_meta(B, S, 2 * H, Dh), qk, L, grid, start, step, 10000.0, axes, wqk, wqk, 1e-6),
                 nb["bwd"] + 3 * Dh * 2)]
    for shape, groups in (((1, 128, 9, 480, 720), 32), ((1, 512, 3, 60, 90), 32)):
        Bv, C, T, Hv, Wv = shape
        ph = VAE_PAD_HW
        xs, tag = _meta(*shape), "x".join(map(str, shape))
        Tp, Ho, Wo = T + 2, Hv + 2 * ph[0], Wv + 2 * ph[1]
        dout, dnc = _meta(Bv, C, Tp, Ho, Wo), None          # as the bench: a gradient for out alone
        nb = flops.causal_pad3d_bytes(Bv, C, T, Hv, Wv, 3, ph)
        out += [("causal_pad3d", f"{tag} pad{ph[0]}", "fwd", cp.causal_pad3d_fwd, (xs, 3, None, *ph, "first"),
                 nb["fwd"]),
                ("causal_pad3d", f"{tag} pad{ph[0]}", "bwd", cp.causal_pad3d_bwd,
                 (dout, dnc, T, 3, *ph, "first", False), nb["bwd"])]
        cw, mean = _meta(C), _meta(Bv, groups, dtype=torch.float32)
        nb = flops.group_norm_silu_pad_bytes(Bv, C, T, Hv, Wv, 3, ph, zq=True)
        out += [("group_norm_silu_pad+zq", f"{tag} pad{ph[0]}", "fwd", gn.group_norm_silu_pad_fwd,
                 (xs, groups, cw, cw, 1e-6, 3, None, *ph, xs, xs, True), nb["fwd"]),
                ("group_norm_silu_pad+zq", f"{tag} pad{ph[0]}", "bwd", gn.group_norm_silu_pad_bwd,
                 (dout, dnc, xs, cw, cw, xs, xs, mean, mean, groups, 3, False, *ph, True), nb["bwd"])]
    # a small layer whose (b, group) chunk is exactly gn.FUSED_MAX elements (4 channels x 2 frames x 32 x 32): one
    # program per chunk, one launch each way
    Bv, C, T, Hv, Wv = shape = (1, 128, 2, 32, 32)
    xs, cw, mean = _meta(*shape), _meta(C), _meta(Bv, 32, dtype=torch.float32)
    nb = flops.group_norm_silu_pad_bytes(Bv, C, T, Hv, Wv, 3, (0, 0), zq=True, fits=True)
    tag = "x".join(map(str, shape)) + " pad0 fits"
    out += [("group_norm_silu_pad+zq", tag, "fwd", gn.group_norm_silu_pad_fwd,
             (xs, 32, cw, cw, 1e-6, 3, None, 0, 0, xs, xs, True), nb["fwd"]),
            ("group_norm_silu_pad+zq", tag, "bwd", gn.group_norm_silu_pad_bwd,
             (_meta(Bv, C, T + 2, Hv, Wv), None, xs, cw, cw, xs, xs, mean, mean, 32, 3, False, 0, 0, True), nb["bwd"])]
    return out


def static_rows(models=("2b", "5b"), filter: str | None = None) -> list[dict]:
    """One row per (op, shape, pass): the launches' builds summed up (see kernels._static)."""
    from kernels import _static
    rows = []
    for op, tag, pass_, launcher, args, must in static_cases(models):
        if filter and filter not in f"{op} {tag}":
            continue
        builds = _static.inspect_launcher(launcher, *args)
        moved = sum(b.bytes_moved for b in builds)
        rows.append({"op": op, "shape": tag, "pass": pass_, "builds": builds, "must": must, "moved": moved,
                     "passes": _static.passes(builds)})
    return rows


def format_static(rows: list[dict]) -> str:
    """The static table: per launch registers, spills, warps, resident programs per SM (H100), SASS global access
    widths; per op the minimum bytes against the bytes its launches move (the copy-bandwidth bound)."""
    from kernels._static import widths
    head = ("| op | shape | pass | kernel | grid | warps | regs | spill | smem | progs/SM | LDG bits x n | "
            "STG bits x n | MB moved | MB min | min/moved |")
    lines = ["sm_90 builds at CogVideoX's launch arguments, bf16, as triton's launcher specializes them "
             "(kernels._static); nothing ran on a GPU: these are predictions.",
             "progs/SM: resident programs per H100 SM; LDG / STG: global loads / stores in the SASS by width; "
             "MB moved: per launch, one pass over each tensor it loads or stores as blocks; MB min: the op's minimum "
             "(bench/flops.py); min/moved: the % of copy bandwidth the op reaches if every pass streams at copy speed.",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        for i, b in enumerate(r["builds"]):
            first = i == 0
            lines.append("| " + " | ".join([
                r["op"] if first else "", r["shape"] if first else "", r["pass"] if first else "", b.name,
                "x".join(map(str, b.grid)), str(b.num_warps), str(b.n_regs),
                "yes" if b.spills else "no", str(b.shared), str(b.resident), widths(b.ldg), widths(b.stg),
                f"{b.bytes_moved / 1e6:.0f}",
                f"{r['must'] / 1e6:.0f}" if first else "",
                f"{r['must'] / max(r['moved'], 1):.0%}" if first else ""]) + " |")
    return "\n".join(lines)
