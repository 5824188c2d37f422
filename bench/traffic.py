"""The memory traffic of one transformer block outside its GEMMs and attention, counted from the ops it runs.

`block_traffic("5b")` runs one `CogVideoXBlock` forward on meta tensors (shapes only: no memory, no compute, any
machine) under a dispatch mode that sees every aten and custom op the block issues below autograd, and adds up, for
each op that makes new data (views and allocations excluded), the bytes of its tensor inputs and outputs: what that
op reads and writes from DRAM if nothing stays in cache. GEMMs (mm / addmm / _addmm_activation) and attention are
counted apart: they are compute-bound. The result is given in units of B*S*D*2 bytes (one bf16 pass over the
residual stream), the unit of the kernel-speed target "the memory-bound part of a block at most 12 units in eager
mode".

The block runs as on a GPU with the fused kernels (KERNEL_OPS); `gelu_epilogue` says whether FeedForward takes the
GEMM's GELU epilogue, which it does on CUDA in inference (cogvideox.transformer._gelu_epilogue): on meta tensors
that choice is made here, not by the device. This is an accounting of bytes, not a timing.
"""
from __future__ import annotations

import collections
from contextlib import contextmanager
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
# _unsafe_view: a view whose schema does not say so (reshape returns it after a copy)
NO_DATA = {"aten::new_empty", "aten::new_empty_strided", "aten::detach", "aten::lift_fresh", "aten::_unsafe_view"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()   # op name -> bytes read + written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if func.is_view or name.startswith("aten::empty") or name in NO_DATA:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.bytes["gemm" if name in GEMMS else name] += sum(t.numel() * t.element_size() for t in tensors)
        return out


@contextmanager
def _as_on_gpu(gelu_epilogue: bool):
    import cogvideox.transformer as tr

    def no_attention(q, k, v, **_):   # compute-bound, counted apart: its output only stands in
        return torch.empty_like(q)

    with mock.patch.object(tr, "attention", no_attention), \
            mock.patch.object(tr, "_gelu_epilogue", lambda h, fc1: gelu_epilogue):
        yield tr


def block_traffic(model: str = "5b", batch: int = 2, text_len: int = 226, grid=(13, 30, 45),
                  dtype: torch.dtype = torch.bfloat16, gelu_epilogue: bool = True, grad: bool = False) -> dict:
    """One block of preset `model` on (batch, text_len + T*Hg*Wg) tokens -> {"unit_bytes", "ops": {op: units},
    "memory_bound": units, "gemm": units}. grad: the forward as training runs it (autograd recording: the
    GELU epilogue is then never taken, whatever gelu_epilogue says)."""
    from cogvideox.config import TransformerConfig

    cfg = TransformerConfig.preset(model)
    D, S = cfg.inner_dim, text_len + grid[0] * grid[1] * grid[2]
    unit = batch * S * D * torch.finfo(dtype).bits // 8
    with _as_on_gpu(gelu_epilogue and not grad) as tr, torch.device("meta"):
        block = tr.CogVideoXBlock(cfg).to(dtype).requires_grad_(grad)
        x = torch.empty(batch, S, D, dtype=dtype, requires_grad=grad)
        emb = torch.empty(batch, cfg.time_embed_dim, dtype=dtype)
        rope = (torch.zeros(3), torch.ones(3)) if cfg.use_rotary_positional_embeddings else None
        # the previous block's pending feed-forward residual, folded into this block's first norm
        residual = tr.Residual(torch.empty_like(x), torch.empty(batch, 2, D, dtype=dtype))
        counter = _Counter()
        with torch.set_grad_enabled(grad), counter:
            block(x, emb, text_len, grid, rope, tr.KERNEL_OPS, 0, None, None, residual)
    ops = {name: b / unit for name, b in counter.bytes.items()}
    return {"model": model, "batch": batch, "tokens": S, "dtype": str(dtype).replace("torch.", ""),
            "gelu_epilogue": gelu_epilogue and not grad, "grad": grad, "unit_bytes": unit,
            "ops": {k: v for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if k != "gemm"},
            "memory_bound": sum(v for k, v in ops.items() if k != "gemm"), "gemm": ops.get("gemm", 0.0)}


def format_traffic(rows: list[dict]) -> str:
    lines = ["Block memory traffic outside GEMMs and attention, COUNTED from the ops one block forward runs (meta",
             "tensors, bench/traffic.py), in units of B*S*D*2 bytes; target <= 12 in eager inference. Not measured.",
             "", "| model | tokens | forward | memory-bound | by op |", "|---|---|---|---|---|"]
    for r in rows:
        kind = "training (autograd)" if r["grad"] else ("inference, GELU in the FC1 epilogue" if r["gelu_epilogue"]
                                                         else "inference, separate GELU")
        by_op = ", ".join(f"{k.split('::')[-1]} {v:.2f}" for k, v in r["ops"].items() if v >= 0.005)
        lines.append(f"| {r['model']} | {r['batch']} x {r['tokens']} | {kind} | {r['memory_bound']:.2f} | {by_op} |")
    return "\n".join(lines)


def traffic_rows(models=("2b", "5b")) -> list[dict]:
    return [block_traffic(m, gelu_epilogue=epi, grad=grad) for m in models
            for epi, grad in ((True, False), (False, False), (False, True))]
