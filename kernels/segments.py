"""Segments: the layout of a packed sequence (multi-resolution frame packing, arXiv 2408.06072 §3).

Several videos, each with its own text, laid end to end in the token dimension of one (1, N, ...) tensor:

    tokens  [ text_0 | vision_0 | text_1 | vision_1 | ... ]        segment i = rows [cu_seqlens[i], cu_seqlens[i+1])

Segment i is a joint sequence of its own: text_lens[i] text tokens, then the T*Hg*Wg vision tokens of its latent
grid grids[i] (row-major (t, y, x)), with RoPE positions start[i] + index * step[i] per axis. Every per-token op
(expert_adaln*, rope3d) treats a segment exactly as it treats one batch element of an unpacked (B, S, ...) call;
attention() keeps each segment's tokens to themselves. A batch of packed rows is the same thing flattened: the
segments of all rows end to end (nothing couples two segments, so row boundaries carry no information).

This is flash-attention's varlen layout (cu_seqlens, max_seqlen) plus the per-segment facts the fused ops need.
The kernels take the tensors (int32 on the device: one small copy per packed batch, data under torch.compile),
the host keeps the tuples (the pure-torch references loop over segments, the launch grid needs max_len).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ._dispatch import check_finite_float


def _as_ints(name: str, values, n: int | None = None) -> tuple[int, ...]:
    values = tuple(values)
    if n is not None and len(values) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must hold ints >= 0, got {values}")
    return values


class Segments:
    """The packed layout: per segment a text length, a latent grid (T, Hg, Wg) and RoPE start/step triples.

    text_lens: n ints; grids: n (T, Hg, Wg) triples (a (0, 0, 0) grid: a text-only segment); start, step: n float
    triples each, or None for integer positions (0 and 1). device: where the kernels' tensors live.

    Attributes (host): n, text_lens, grids, start, step, lengths (text + vision tokens), offsets (n + 1 token
    offsets), total (N), max_len. Device tensors: cu_seqlens (n + 1,) int32, text_lens_t (n,) int32, grids_t (n, 3)
    int32, start_t / step_t (n, 3) fp32.
    """

    def __init__(self, text_lens: Sequence[int], grids: Iterable[Sequence[int]], start=None, step=None,
                 device=None):
        self.text_lens = _as_ints("text_lens", text_lens)
        self.n = len(self.text_lens)
        if self.n == 0:
            raise ValueError("Segments needs at least one segment")
        self.grids = tuple(_as_ints("grids[%d]" % i, g, 3) for i, g in enumerate(grids))
        if len(self.grids) != self.n:
            raise ValueError(f"grids must have one (T, Hg, Wg) per segment ({self.n}), got {len(self.grids)}")
        self.start = self._triples("start", start, 0.0)
        self.step = self._triples("step", step, 1.0)
        self.lengths = tuple(L + g[0] * g[1] * g[2] for L, g in zip(self.text_lens, self.grids))
        offsets = [0]
        for n in self.lengths:
            offsets.append(offsets[-1] + n)
        self.offsets = tuple(offsets)
        self.total, self.max_len = offsets[-1], max(self.lengths)
        if self.total >= 2**31:
            raise ValueError(f"a packed sequence of {self.total} tokens exceeds the int32 offsets (2^31 - 1)")
        device = torch.device("cpu") if device is None else torch.device(device)
        self.device = device
        self.cu_seqlens = torch.tensor(self.offsets, dtype=torch.int32, device=device)
        self.text_lens_t = torch.tensor(self.text_lens, dtype=torch.int32, device=device)
        self.grids_t = torch.tensor(self.grids, dtype=torch.int32, device=device).reshape(self.n, 3)
        self.start_t = torch.tensor(self.start, dtype=torch.float32, device=device).reshape(self.n, 3)
        self.step_t = torch.tensor(self.step, dtype=torch.float32, device=device).reshape(self.n, 3)

    def _triples(self, name, values, default):
        if values is None:
            return ((default,) * 3,) * self.n
        values = tuple(tuple(check_finite_float(f"{name}[{i}]", f) for f in v) for i, v in enumerate(values))
        if len(values) != self.n or any(len(v) != 3 for v in values):
            raise ValueError(f"{name} must hold one (t, h, w) triple per segment ({self.n}), got {values}")
        return values

    def to(self, device) -> "Segments":
        """The same layout with its tensors on `device`."""
        return Segments(self.text_lens, self.grids, self.start, self.step, device)

    def ranges(self) -> list[tuple[int, int]]:
        """[(first token, end token)] of each segment."""
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    def check(self, name: str, t: torch.Tensor, token_dim: int = 1) -> None:
        """ValueError unless t is a (1, N, ...) packed tensor of this layout (N = self.total) on its device."""
        if t.dim() <= token_dim or t.shape[0] != 1 or t.shape[token_dim] != self.total:
            raise ValueError(f"{name} must be a packed (1, N={self.total}, ...) tensor for these segments, "
                             f"got shape {tuple(t.shape)}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device} but the segments' tensors are on {self.device}; "
                             f"use segments.to({str(t.device)!r})")

    def __repr__(self) -> str:
        return f"Segments(n={self.n}, text_lens={self.text_lens}, grids={self.grids}, total={self.total})"


def check_segments(segments) -> Segments:
    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a kernels.Segments, got {type(segments).__name__}")
    return segments


def segment_rows(p: torch.Tensor, segments: Segments) -> torch.Tensor:
    """(n, E, D) per-segment, per-expert vectors -> (1, N, D) per-token rows: segment i's text rows take expert 0,
    its vision rows expert 1 (E = 1: every row of segment i takes p[i, 0])."""
    n, E, D = p.shape
    rows = []
    for i, (L, length) in enumerate(zip(segments.text_lens, segments.lengths)):
        if E == 1:
            rows.append(p[i, :1].expand(length, D))
        else:
            rows += [p[i, :1].expand(L, D), p[i, 1:].expand(length - L, D)]
    return torch.cat(rows, dim=0)[None]


def segment_sum(t: torch.Tensor, segments: Segments, E: int) -> torch.Tensor:
    """(1, N, D) per-token values -> (n, E, D) sums over each segment's expert tokens (the adjoint of
    segment_rows)."""
    out = []
    for (a, b), L in zip(segments.ranges(), segments.text_lens):
        seg = t[0, a:b]
        out.append(seg.sum(0, keepdim=True) if E == 1 else torch.stack([seg[:L].sum(0), seg[L:].sum(0)]))
    return torch.stack(out)
