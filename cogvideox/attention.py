"""attention(q, k, v): the one seam every attention call in the model goes through.

Layout: q, k, v are (B, S, H, Dh) (the natural layout after the fused QKV projection); the output is (B, S, H, Dh).
(Initial version: torch SDPA only. The backend registry is being built.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
