"""Expert adaptive LayerNorm, optionally with the gated residual before it (CogVideoX, arXiv 2408.06072 §2.2).

    x_new = x + gate[b, e(s)] * y                                   (expert_adaln_residual only)
    out   = layer_norm(x_new, weight, bias, eps) * (1 + scale[b, e(s)]) + shift[b, e(s)]

x is the joint sequence (B, S, D) = [text | vision]; e(s) = 0 for s < text_len (the text expert), 1 otherwise.
With E = 1 one expert modulates every token. One LayerNorm weight/bias serves both experts.

TRITON KERNELS: TO BE WRITTEN (helper). The reference below is the readable definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_like, check_shape, check_tensor, check_text_len


def expert_rows(p: torch.Tensor, text_len: int, seq_len: int) -> torch.Tensor:
    """(B, E, D) per-expert vectors -> (B, S, D) per-token view: expert 0 for text rows, expert 1 for vision."""
    B, E, D = p.shape
    if E == 1:
        return p.expand(B, seq_len, D)
    return torch.cat([p[:, :1].expand(B, text_len, D), p[:, 1:].expand(B, seq_len - text_len, D)], dim=1)


def expert_adaln_ref(x, shift, scale, text_len, weight=None, bias=None, eps=1e-5):
    """Pure torch, fp32 inside, one rounding to x.dtype at the end."""
    B, S, D = x.shape
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    normed = F.layer_norm(x.float(), (D,), w, b, eps)
    out = normed * (1 + expert_rows(scale.float(), text_len, S)) + expert_rows(shift.float(), text_len, S)
    return out.to(x.dtype)


def expert_adaln_residual_ref(x, y, gate, shift, scale, text_len, weight=None, bias=None, eps=1e-5):
    """x_new = x + gate * y (rounded to x.dtype), then expert_adaln_ref(x_new, ...)."""
    S = x.shape[1]
    x_new = (x.float() + expert_rows(gate.float(), text_len, S) * y.float()).to(x.dtype)
    return x_new, expert_adaln_ref(x_new, shift, scale, text_len, weight, bias, eps)


def _check(x, mods, text_len, weight, bias):
    check_tensor("x", x, ndim=3)
    B, S, D = x.shape
    check_text_len(text_len, S)
    E = None
    for name, p in mods.items():
        check_tensor(name, p, ndim=3)
        check_like(name, p, "x", x)
        if E is None:
            E = p.shape[1]
            if E not in (1, 2):
                raise ValueError(f"{name} must have shape (B, E, D) with E in (1, 2), got {tuple(p.shape)}")
        check_shape(name, p, (B, E, D))
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1)
            check_like(name, p, "x", x, dtype=False)
            check_shape(name, p, (D,))


def expert_adaln(x, shift, scale, text_len, weight=None, bias=None, eps=1e-5):
    """x: (B, S, D); shift, scale: (B, E, D), E in (1, 2); weight, bias: (D,) or None -> out (B, S, D)."""
    _check(x, {"shift": shift, "scale": scale}, text_len, weight, bias)
    return expert_adaln_ref(x, shift, scale, text_len, weight, bias, eps)


def expert_adaln_residual(x, y, gate, shift, scale, text_len, weight=None, bias=None, eps=1e-5):
    """x, y: (B, S, D); gate, shift, scale: (B, E, D) -> (x_new, out), both (B, S, D)."""
    check_tensor("y", y, ndim=3)
    check_like("y", y, "x", x)
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    _check(x, {"gate": gate, "shift": shift, "scale": scale}, text_len, weight, bias)
    return expert_adaln_residual_ref(x, y, gate, shift, scale, text_len, weight, bias, eps)
