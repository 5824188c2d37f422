"""Context parallelism: one video on N ranks over torch.distributed. Settings, mesh, and every collective.

    settings = Parallel.parse("ulysses=2,ring=2,cfg=2")        # or Parallel(ulysses=2, ring=2, cfg=2)
    mesh = init_parallel(settings)                              # from torchrun's environment; NCCL on CUDA, gloo on CPU
    v = model(latents, text, timestep, parallel=mesh)           # every rank gets the whole output

Layout (torchtitan-style, one DeviceMesh ("cfg", "ring", "ulysses")):
- cfg: the unconditional and conditional halves of a guided batch on different ranks, combined once per step
  (`cfg_combine`, called by the sampler loop).
- ring x ulysses = the sequence group. The joint [text | vision] sequence of S tokens is split ONCE (`shard`) into
  n = ring * ulysses contiguous shards, sizes S // n or S // n + 1 (the first S % n shards one longer): no
  divisibility rule on frames, height, width or text length. Shard i = ring chunk i // ulysses, Ulysses slot
  i % ulysses, so ring chunk r is the concatenation of its Ulysses group's shards. Every element-wise op runs on
  the shard with its global token offset (kernels.expert_adaln / rope3d `offset=`); `attention()` is the only
  function that sees other ranks' tokens; `gather` assembles the output once, at the end.
- Ulysses (arXiv 2309.14509): one all-to-all moves q, k, v together from sequence shards to head groups, one moves
  the output back. Heads are split in UNEVEN groups (30 heads on 4 ranks: 8, 8, 7, 7) rather than padded to a
  multiple: padding costs the same time on the busiest rank (8 heads' worth) but adds memory, traffic and
  compute on padded heads, while uneven groups move exactly the real heads (all_to_all_single takes split sizes).
- Ring (arXiv 2310.01889): each rank keeps its queries; K/V chunks travel around the ring group while each rank
  attends to the chunk it holds; partial outputs are merged with their log-sum-exp in fp32. The backward is a second
  ring pass (dK/dV accumulators travel with their chunk and arrive home after the last step), as ring-flash-attn
  does. Hybrid ulysses x ring (USP, arXiv 2405.07719): Ulysses inside, ring across.
Every collective is a functional collective (torch.distributed._functional_collectives): traceable by
torch.compile with no graph break, asynchronous until first use (so on CUDA the next K/V transfer overlaps the
current chunk's attention), and each op below has its exact adjoint as backward. With one rank, or no mesh, every
function here is the identity and the model runs the plain single-device code.

Gradients: forward and backward are exact. Parameters see only their rank's tokens, so after backward each rank
holds a partial parameter gradient; `reduce_gradients(model.parameters(), mesh)` sums them over the sequence group (what a
data-parallel user expects: then they equal one process's). Input gradients (latents, text) are complete on every
rank (`shard`'s backward is an all-reduce).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

KEYS = ("ulysses", "ring", "cfg", "vae")
# torch 2.13 renamed all_gather_tensor (deprecated there) to all_gather_single; the lent GPUs' torch 2.11 may lack it
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class ParallelError(ValueError):
    """Parallel settings that cannot run here: bad degrees, a missing launcher, too few devices, disagreeing ranks."""


@dataclass(frozen=True)
class Parallel:
    """Degrees of parallelism. ulysses * ring * cfg must equal the world size; vae (the VAE's own degree) <= it."""
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    vae: int = 1

    def __post_init__(self):
        for key in KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelError(f"parallel degree {key} must be a positive int, got {value!r}")
        if self.cfg not in (1, 2):
            raise ParallelError(f"cfg must be 1 or 2 (the guided batch has two halves), got {self.cfg}")

    @property
    def seq(self) -> int:
        """Ranks one sequence is split over."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg

    @classmethod
    def parse(cls, text: str) -> "Parallel":
        """'ulysses=2,ring=2,cfg=2,vae=4' (omitted keys are 1) -> Parallel."""
        if not isinstance(text, str) or not text.strip():
            raise ParallelError(f"--parallel expects key=value pairs such as ulysses=2,ring=2, got {text!r}")
        values = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in KEYS:
                raise ParallelError(f"--parallel: {item.strip()!r} is not one of {', '.join(k + '=N' for k in KEYS)}")
            if key in values:
                raise ParallelError(f"--parallel: {key} is given twice")
            try:
                values[key] = int(value)
            except ValueError:
                raise ParallelError(f"--parallel: {key}={value!r} is not an integer") from None
        return cls(**values)


def shard_sizes(n_tokens: int, n: int) -> list[int]:
    """Contiguous shard lengths of n_tokens over n ranks: the first n_tokens % n shards get one token more.
    Written as (n_tokens + n - 1 - i) // n (the same numbers): pure arithmetic, so under torch.compile a symbolic
    sequence length stays symbolic instead of guarding on n_tokens % n."""
    return [(n_tokens + n - 1 - i) // n for i in range(n)]


def shard_ranges(n_tokens: int, n: int) -> list[tuple[int, int]]:
    """[start, stop) of each of the n contiguous shards (see shard_sizes)."""
    sizes, ranges, start = shard_sizes(n_tokens, n), [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def head_groups(heads: int, n: int) -> list[int]:
    """Heads per Ulysses rank: uneven groups, the first heads % n ranks one more (30 on 4: 8, 8, 7, 7)."""
    return [heads // n + (i < heads % n) for i in range(n)]


@dataclass(frozen=True, eq=False)   # compared and hashed by identity, like the process groups it holds
class ParallelMesh:
    """The process groups of one run (built by `init_parallel`), what the model, attention and VAE take."""
    settings: Parallel
    mesh: object                    # DeviceMesh ("cfg", "ring", "ulysses")
    device: torch.device
    seq_group: object               # ring x ulysses: one sequence's ranks
    ring_group: object
    ulysses_group: object
    cfg_group: object
    vae_group: object               # the first `vae` ranks of the world; None on ranks outside it
    rank: int                       # global rank
    cfg_rank: int
    ring_rank: int
    ulysses_rank: int

    @property
    def seq_rank(self) -> int:
        """This rank's shard index: ring chunk-major, then Ulysses slot."""
        return self.ring_rank * self.settings.ulysses + self.ulysses_rank

    def shard_range(self, n_tokens: int) -> tuple[int, int]:
        """[start, stop) of this rank's shard of a sequence of n_tokens."""
        return shard_ranges(n_tokens, self.settings.seq)[self.seq_rank]


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_parallel(settings: Parallel, device: str | torch.device | None = None) -> ParallelMesh:
    """Join (or reuse) the default process group that torchrun describes and build the mesh for `settings`.

    device None: cuda:LOCAL_RANK when CUDA is available, else CPU. Errors (one line each): no torchrun environment,
    degrees that do not multiply to the world size, fewer CUDA devices than local ranks, vae > world size.
    """
    if not isinstance(settings, Parallel):
        raise TypeError(f"settings must be a Parallel, got {type(settings).__name__}")
    if not dist.is_initialized():
        world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
        if world is None or rank is None:
            raise ParallelError("parallel settings need a process group: launch with torchrun (it sets RANK, "
                                "WORLD_SIZE, MASTER_ADDR, MASTER_PORT), e.g. torchrun --nproc-per-node "
                                f"{settings.world_size} -m cogvideox generate ...")
    else:
        world, rank = dist.get_world_size(), dist.get_rank()
    if settings.world_size != world:
        raise ParallelError(f"ulysses x ring x cfg = {settings.ulysses} x {settings.ring} x {settings.cfg} = "
                            f"{settings.world_size}, but the world size is {world}")
    if settings.vae > world:
        raise ParallelError(f"vae={settings.vae} exceeds the world size {world}")
    local_rank = _env_int("LOCAL_RANK") or 0
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ParallelError(f"rank {rank} needs cuda:{device.index}, but this node has "
                                f"{torch.cuda.device_count()} CUDA device(s): run at most that many ranks per node")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    from torch.distributed.device_mesh import init_device_mesh

    s = settings
    mesh = init_device_mesh(device.type, (s.cfg, s.ring, s.ulysses), mesh_dim_names=("cfg", "ring", "ulysses"))
    # new_group is collective: every rank creates the VAE group, only its members keep it.
    vae_group = dist.new_group(list(range(s.vae))) if s.vae < world else dist.group.WORLD
    return ParallelMesh(
        settings=s, mesh=mesh, device=device,
        seq_group=mesh["ring", "ulysses"]._flatten("seq").get_group() if s.seq > 1 else mesh.get_group("ulysses"),
        ring_group=mesh.get_group("ring"), ulysses_group=mesh.get_group("ulysses"), cfg_group=mesh.get_group("cfg"),
        vae_group=vae_group if rank < s.vae else None, rank=rank,
        cfg_rank=mesh.get_local_rank("cfg"), ring_rank=mesh.get_local_rank("ring"),
        ulysses_rank=mesh.get_local_rank("ulysses"))


def _agree(what: str, value, group=None) -> None:
    """ParallelError on every rank of `group` (None: the world) unless all of them pass the same `value`."""
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    if any(v != values[0] for v in values):
        raise ParallelError(f"{what}: " + "; ".join(f"rank {i}: {v!r}" for i, v in enumerate(values)))


def _sum_grads(parameters, group) -> None:
    """Sum every parameter's gradient over `group`, in place."""
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)


def check_same(pm: ParallelMesh | None, what: str, value) -> None:
    """ParallelError unless every rank passes the same `value` (shapes, settings): checked once, up front, so that
    disagreeing ranks fail with a message instead of hanging in a collective."""
    if pm is None or dist.get_world_size() == 1:
        return
    _agree(f"ranks disagree on {what}", value)


# ---- sequence split and gather (autograd: each the other's adjoint) ----------------------------------------------
def _wait(t):
    return funcol.wait_tensor(t) if isinstance(t, torch.Tensor) else t


class _Shard(torch.autograd.Function):
    """forward: this rank's rows [start, stop) of a replicated tensor (dim 1); backward: the full gradient, the
    sum of every rank's zero-padded shard gradient (an all-reduce), so inputs get their whole gradient everywhere."""

    @staticmethod
    def forward(ctx, x, start: int, stop: int, group):
        ctx.start, ctx.stop, ctx.group, ctx.n = start, stop, group, x.shape[1]
        return x[:, start:stop].clone()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros((grad.shape[0], ctx.n, *grad.shape[2:]))
        full[:, ctx.start:ctx.stop] = grad
        return _wait(funcol.all_reduce(full, "sum", ctx.group)), None, None, None


class _Gather(torch.autograd.Function):
    """forward: every rank's shard (dim 1, uneven sizes) concatenated; backward: this rank's rows of the gradient
    (every rank holds the same downstream gradient, so slicing is the exact adjoint, with no communication)."""

    @staticmethod
    def forward(ctx, x, sizes: list, index: int, group):
        ctx.start, ctx.stop = sum(sizes[:index]), sum(sizes[:index + 1])
        longest = max(sizes)
        padded = F.pad(x, (0, 0) * (x.dim() - 2) + (0, longest - x.shape[1])).contiguous()
        parts = _wait(_all_gather(padded, 0, group)).chunk(len(sizes))   # (B, longest, ...) each
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.start:ctx.stop], None, None, None


def shard(x: torch.Tensor, pm: ParallelMesh | None, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of x's dim 1 (a replicated tensor) as this rank's shard; identity without a mesh."""
    if pm is None or pm.settings.seq == 1:
        return x[:, start:stop]
    return _Shard.apply(x, start, x.shape[1] if stop is None else stop, pm.seq_group)


def gather(x: torch.Tensor, pm: ParallelMesh | None, sizes: Sequence[int]) -> torch.Tensor:
    """Every sequence rank's shard of dim 1 (lengths `sizes`, this rank's at pm.seq_rank), concatenated."""
    if pm is None or pm.settings.seq == 1:
        return x
    return _Gather.apply(x, list(sizes), pm.seq_rank, pm.seq_group)


# ---- attention across ranks ---------------------------------------------------------------------------------------
def _ulysses_exchange(x: torch.Tensor, pm: ParallelMesh, seq_sizes: list, heads: list, to_heads: bool):
    """All-to-all inside the Ulysses group, on (..., S, H, Dh) tensors with any leading dims.

    to_heads: (..., s_mine, H, Dh) -> (..., sum(seq_sizes), heads[mine], Dh): send each rank its head group of my
    tokens, receive my head group of every rank's tokens. Otherwise the inverse. Differentiable (the backward is the
    inverse exchange) and exact."""
    u = pm.ulysses_rank
    per = math.prod(x.shape[:-3]) * x.shape[-1]                       # elements per (token, head)
    if to_heads:
        pieces = x.split(heads, dim=-2)                               # per destination: (..., s_u, h_j, Dh)
        send = [p.numel() for p in pieces]
        recv = [per * s * heads[u] for s in seq_sizes]
        out_shape = lambda j: (*x.shape[:-3], seq_sizes[j], heads[u], x.shape[-1])   # noqa: E731
        cat_dim = -3
    else:
        pieces = x.split(seq_sizes, dim=-3)                           # per destination: (..., s_j, h_u, Dh)
        send = [p.numel() for p in pieces]
        recv = [per * seq_sizes[u] * h for h in heads]
        out_shape = lambda j: (*x.shape[:-3], seq_sizes[u], heads[j], x.shape[-1])   # noqa: E731
        cat_dim = -2
    flat = torch.cat([p.reshape(-1) for p in pieces])
    got = _wait(funcol.all_to_all_single_autograd(flat, recv, send, pm.ulysses_group))
    return torch.cat([p.view(out_shape(j)) for j, p in enumerate(got.split(recv))], dim=cat_dim)


def _chunk_forward(q, k, v):
    """softmax(q k^T / sqrt(Dh)) v and its log-sum-exp for one K/V chunk. q, k, v: (B, H, S, Dh) ->
    out (B, H, Sq, Dh) in q's dtype, lse (B, H, Sq) fp32. torch's flash kernels (CPU and CUDA) return the LSE."""
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.shape[1] == 0:
        return q.new_zeros(q.shape), q.new_full(q.shape[:-1], -math.inf, dtype=torch.float32)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    elif q.is_cuda:   # fp32 on CUDA: the math formula (flash kernels are half precision only)
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        lse = torch.logsumexp(s, -1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.float()).to(q.dtype)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out, lse.float()


def _chunk_backward(dout, q, k, v, out, lse):
    """Gradients of one chunk's share given the FINAL out and lse (so the softmax is the global one): the same
    formula flash attention's backward uses, D = rowsum(dout * out). -> dq, dk, dv in q's dtype."""
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        Sq, Sk = q.shape[-2], k.shape[-2]
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, empty, empty, Sq, Sk, 0.0, False, seed, seed)[:3]
    if q.is_cuda:
        scale = 1 / math.sqrt(q.shape[-1])
        qf, kf, vf, dof = q.float(), k.float(), v.float(), dout.float()
        p = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale - lse[..., None])
        dv = torch.matmul(p.transpose(-1, -2), dof)
        ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - (dof * out.float()).sum(-1, keepdim=True))
        return (torch.matmul(ds, kf) * scale).to(q.dtype), (torch.matmul(ds.transpose(-1, -2), qf) * scale).to(
            k.dtype), dv.to(v.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, False)


def _ring_shift(t: torch.Tensor, group, n: int, r: int, incoming: int):
    """Send t (..., S, Dh) to the next ring rank and receive the previous rank's (..., incoming, Dh): an all-to-all
    with one non-empty split each way (point to point on NCCL), asynchronous until its result is used.
    -> (pending flat tensor, shape to view it as)."""
    per_token = math.prod(t.shape[:-2]) * t.shape[-1]
    send, recv = [0] * n, [0] * n
    send[(r + 1) % n], recv[(r - 1) % n] = t.numel(), per_token * incoming
    got = funcol.all_to_all_single(t.contiguous().reshape(-1), recv, send, group)
    return got, (*t.shape[:-2], incoming, t.shape[-1])


class _RingAttention(torch.autograd.Function):
    """Ring attention over `group` (n ranks, this one r); chunk_sizes[j] = K/V length held by ring rank j.
    q, k, v: (B, H, S, Dh) -> (B, H, Sq, Dh). Forward and backward each pass every K/V chunk around the ring once."""

    @staticmethod
    def forward(ctx, q, k, v, group, n: int, r: int, chunk_sizes: list):
        kv = torch.stack([k, v])                                                   # (2, B, H, Sk, Dh)
        out, lse = None, None
        for step in range(n):
            if step < n - 1:
                nxt = _ring_shift(kv, group, n, r, chunk_sizes[(r - step - 1) % n])
            o_j, lse_j = _chunk_forward(q, kv[0], kv[1])
            if out is None:
                out, lse = o_j.float(), lse_j
            else:   # log-sum-exp merge in fp32; a -inf pair (empty chunk) contributes nothing
                new = torch.logaddexp(lse, lse_j)
                w_old = torch.exp(lse - new).nan_to_num_(0.0)[..., None]
                w_new = torch.exp(lse_j - new).nan_to_num_(0.0)[..., None]
                out, lse = out * w_old + o_j.float() * w_new, new
            if step < n - 1:
                kv = _wait(nxt[0]).view(nxt[1])
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.n, ctx.r, ctx.chunk_sizes = group, n, r, chunk_sizes
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, n, r, sizes = ctx.group, ctx.n, ctx.r, ctx.chunk_sizes
        dout = dout.contiguous()
        kv, dq, dkv = torch.stack([k, v]), torch.zeros(q.shape, dtype=torch.float32, device=q.device), None
        for step in range(n):
            if step < n - 1:
                nxt = _ring_shift(kv, group, n, r, sizes[(r - step - 1) % n])
            dq_j, dk_j, dv_j = _chunk_backward(dout, q, kv[0], kv[1], out, lse)
            dq += dq_j.float()
            mine = torch.stack([dk_j.float(), dv_j.float()])
            dkv = mine if dkv is None else _wait(dkv[0]).view(dkv[1]) + mine      # fixed order: deterministic
            # the accumulator travels with its chunk; after the last step it arrives at the chunk's owner
            dkv = _ring_shift(dkv, group, n, r, sizes[(r - step - 1) % n])
            if step < n - 1:
                kv = _wait(nxt[0]).view(nxt[1])
        dk, dv = _wait(dkv[0]).view(dkv[1]).unbind(0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def parallel_attention(q, k, v, pm: ParallelMesh, seq_len: int, local_attention) -> torch.Tensor:
    """attention() on a sequence of seq_len tokens sharded over pm's sequence group (as `ParallelMesh.shard_range`
    splits it). q, k, v: (B, s, H, Dh), this rank's shard -> (B, s, H, Dh). local_attention(q, k, v) is the
    single-device attention, used on the Ulysses-exchanged tensors when there is no ring."""
    s = pm.settings
    H = q.shape[2]
    sizes = shard_sizes(seq_len, s.seq)                                       # every sequence rank's shard length
    heads = head_groups(H, s.ulysses)
    ring_chunk = sizes[pm.ring_rank * s.ulysses:(pm.ring_rank + 1) * s.ulysses]   # my Ulysses group's shards
    if s.ulysses > 1:
        qkv = _ulysses_exchange(torch.stack([q, k, v]), pm, ring_chunk, heads, to_heads=True)   # (3, B, S_r, h, Dh)
        q, k, v = qkv.unbind(0)
    if s.ring == 1:
        o = local_attention(q, k, v)
    else:
        chunks = [sum(sizes[j * s.ulysses:(j + 1) * s.ulysses]) for j in range(s.ring)]
        o = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pm.ring_group, s.ring,
                                 pm.ring_rank, chunks).transpose(1, 2)
    if s.ulysses > 1:
        o = _ulysses_exchange(o, pm, ring_chunk, heads, to_heads=False)        # (B, s, H, Dh)
    return o


# ---- guidance and gradients ---------------------------------------------------------------------------------------
def cfg_combine(v: torch.Tensor, pm: ParallelMesh | None) -> torch.Tensor:
    """CFG-parallel: rank cfg 0 holds the unconditional half, cfg 1 the conditional one; -> both halves,
    [uncond | cond] on dim 0, on every rank (one all-gather per sampling step)."""
    if pm is None or pm.settings.cfg == 1:
        return v
    return _wait(_all_gather(v.contiguous(), 0, pm.cfg_group))


def reduce_gradients(parameters, pm: ParallelMesh | None) -> None:
    """Sum every parameter's gradient over the sequence group (each rank saw only its tokens), in place."""
    if pm is None or pm.settings.seq == 1:
        return
    _sum_grads(parameters, pm.seq_group)



# ---- the VAE across ranks -----------------------------------------------------------------------------------------
# The VAE's ranks are the vae group (the first `vae` ranks of the world), laid out as temporal x spatial: vae rank
# i = ti * spatial + si (= its global rank). Halos and GroupNorm statistics travel point to point between global
# ranks (isend / irecv): no new process group is needed (new_group is collective over the whole world, whose other
# ranks never call the VAE), and a rank with no chunk in a round simply takes no part. Every transfer is
# differentiable with its exact adjoint (the reverse transfer), so encode can be trained under the split.
@dataclass
class VAESplit:
    """One rank's place in a split VAE run: `temporal` x `spatial` ranks, this one (ti, si); `group` the vae group.
    peers: the global ranks whose GroupNorm statistics are merged with this rank's, in merge order (the ranks
    sharing ti, or all of them for whole-video statistics); None: statistics stay local. sent: bytes sent so far."""
    temporal: int
    spatial: int
    ti: int
    si: int
    group: object
    peers: Optional[tuple] = None
    sent: int = 0

    def rank_of(self, ti: int, si: int) -> int:
        return ti * self.spatial + si


def _p2p(sends, recvs, dtype, device):
    """Post every isend [(dst, tensor)] and irecv [(src, shape)] together, then wait: -> the received tensors. At
    most one message per ordered pair per call, so the pairing of messages never depends on tags."""
    got = [torch.empty(shape, dtype=dtype, device=device) for _, shape in recvs]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst) for dst, t in sends]
    ops += [dist.P2POp(dist.irecv, g, src) for (src, _), g in zip(recvs, got)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return got


class _Exchange(torch.autograd.Function):
    """forward: send tensors[j] to dsts[j] and receive a tensor of shapes[k] from srcs[k] -> (carrier, *received).
    backward: the reverse transfer: received tensors' gradients go back to their sources, sent tensors' gradients
    come back from their destinations. `carrier` passes through unchanged; it is a tensor the caller uses anyway, so
    the backward of an exchange that only sends still runs (autograd skips a node none of whose outputs is used)."""

    @staticmethod
    def forward(ctx, carrier, dsts, srcs, shapes, split, *tensors):
        ctx.dsts, ctx.srcs, ctx.shapes, ctx.sent_shapes = dsts, srcs, shapes, [tuple(t.shape) for t in tensors]
        split.sent += sum(t.numel() * t.element_size() for t in tensors)
        got = _p2p(list(zip(dsts, tensors)), list(zip(srcs, shapes)), carrier.dtype, carrier.device)
        return (carrier.view_as(carrier), *got)

    @staticmethod
    def backward(ctx, dcarrier, *dgot):
        sends = [(src, dcarrier.new_zeros(shape) if g is None else g)
                 for src, g, shape in zip(ctx.srcs, dgot, ctx.shapes)]
        dsent = _p2p(sends, list(zip(ctx.dsts, ctx.sent_shapes)), dcarrier.dtype, dcarrier.device)
        return (dcarrier, None, None, None, None, *dsent)


def exchange(carrier: torch.Tensor, split: VAESplit, sends: Sequence = (), recvs: Sequence = ()):
    """Point-to-point transfer in the VAE group: sends [(global dst, tensor)], recvs [(global src, shape)], every
    tensor in carrier's dtype -> (carrier, [received]). Differentiable when grad mode is on (see _Exchange)."""
    dsts, tensors = [d for d, _ in sends], [t for _, t in sends]
    srcs, shapes = [s for s, _ in recvs], [tuple(shape) for _, shape in recvs]
    if torch.is_grad_enabled() and (carrier.requires_grad or any(t.requires_grad for t in tensors)):
        out = _Exchange.apply(carrier, dsts, srcs, shapes, split, *tensors)
        return out[0], list(out[1:])
    split.sent += sum(t.numel() * t.element_size() for t in tensors)
    return carrier, _p2p(list(zip(dsts, tensors)), list(zip(srcs, shapes)), carrier.dtype, carrier.device)


def halo_rows(x: torch.Tensor, split: VAESplit, top: int, bottom: int) -> torch.Tensor:
    """x: (..., h, W), this rank's rows of a frame split over the spatial ranks -> (..., top + h + bottom, W): `top`
    rows of the rank above and `bottom` rows of the rank below in front and behind, zeros past the frame's edge
    (the zero padding one process would have there)."""
    s, si = split.spatial, split.si
    if s == 1:
        return F.pad(x, (0, 0, top, bottom))
    sends, recvs, where = [], [], []
    up, down = split.rank_of(split.ti, si - 1), split.rank_of(split.ti, si + 1)
    if si > 0:
        if bottom:
            sends.append((up, x[..., :bottom, :]))      # my first rows are the upper rank's bottom halo
        if top:
            recvs.append((up, (*x.shape[:-2], top, x.shape[-1])))
            where.append("top")
    if si < s - 1:
        if top:
            sends.append((down, x[..., x.shape[-2] - top:, :]))
        if bottom:
            recvs.append((down, (*x.shape[:-2], bottom, x.shape[-1])))
            where.append("bottom")
    x, got = exchange(x, split, sends, recvs)
    halos = dict(zip(where, got))
    parts = [halos.get("top", x.new_zeros((*x.shape[:-2], top, x.shape[-1])))] if top else []
    parts.append(x)
    if bottom:
        parts.append(halos.get("bottom", x.new_zeros((*x.shape[:-2], bottom, x.shape[-1]))))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else x


def group_stats(x: torch.Tensor, num_groups: int, eps: float, split: VAESplit):
    """GroupNorm statistics of x (B, C, ...) over every rank in split.peers -> mean, rstd: (B, G) fp32.

    Each rank sends its (count, mean, biased variance) per group to the others, and every rank merges them in the
    same fixed order with Chan et al.'s pairwise formula in fp64 (the shifted form: no sum of squares cancels), so
    all peers get the same bits, within rounding of one process's fp32 var_mean over the whole group."""
    B = x.shape[0]
    var, mean = torch.var_mean(x.float().reshape(B, num_groups, -1), dim=-1, unbiased=False)   # (B, G)
    count = x[0].numel() // num_groups
    mine = torch.stack([torch.full_like(mean, count), mean, var], dim=-1).double()              # (B, G, 3)
    me = split.rank_of(split.ti, split.si)
    others = [p for p in split.peers if p != me]
    _, got = exchange(mine, split, [(p, mine) for p in others], [(p, mine.shape) for p in others])
    stats = dict(zip(others, got))
    stats[me] = mine
    n, m, M2 = None, None, None
    for p in split.peers:                                 # fixed order: the same result on every peer
        n_p, m_p, v_p = stats[p].unbind(-1)
        if n is None:
            n, m, M2 = n_p, m_p, v_p * n_p
            continue
        total = n + n_p
        delta = m_p - m
        m = m + delta * (n_p / total)
        M2 = M2 + v_p * n_p + delta * delta * (n * n_p / total)
        n = total
    return m.float(), torch.rsqrt((M2 / n).float() + eps)


class _Pieces(torch.autograd.Function):
    """forward: this rank's pieces x[:, :, t0:t1, h0:h1] of a tensor every rank holds whole; backward: the whole
    gradient on every rank, the sum over the group of each rank's zero-filled piece gradients (one all-reduce)."""

    @staticmethod
    def forward(ctx, x, boxes, group):
        ctx.shape, ctx.boxes, ctx.group = x.shape, boxes, group
        return tuple(x[:, :, t0:t1, h0:h1].clone() for t0, t1, h0, h1 in boxes)

    @staticmethod
    def backward(ctx, *grads):
        ref = next(g for g in grads if g is not None)
        full = ref.new_zeros(ctx.shape)
        for (t0, t1, h0, h1), g in zip(ctx.boxes, grads):
            if g is not None:
                full[:, :, t0:t1, h0:h1] += g
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=ctx.group)
        return full, None, None


def split_input(x: torch.Tensor, boxes: Sequence, split: VAESplit) -> list:
    """This rank's pieces [(t0, t1, h0, h1)] of x (B, C, T, H, W), which every rank holds whole. With autograd, x's
    gradient is whole on every rank."""
    if torch.is_grad_enabled() and x.requires_grad:
        return list(_Pieces.apply(x, list(boxes), split.group))
    return [x[:, :, t0:t1, h0:h1] for t0, t1, h0, h1 in boxes]


def _assemble(parts, place, shape):
    """The whole tensor of `shape` from every rank's flat buffer (parts) and its pieces' places [((t0, h0), shape)]."""
    out = parts[0].new_empty(shape)
    for part, boxes in zip(parts, place):
        offset = 0
        for (t0, h0), s in boxes:
            n = math.prod(s)
            out[:, :, t0:t0 + s[2], h0:h0 + s[3]] = part[offset:offset + n].view(s)
            offset += n
    return out


def _flat(pieces, place):
    """This rank's pieces flattened into one buffer, zero-padded to the longest rank's (all-gather needs one size)."""
    flat = torch.cat([p.reshape(-1) for p in pieces])
    longest = max(sum(math.prod(s) for _, s in boxes) for boxes in place)
    return F.pad(flat, (0, longest - flat.numel()))


class _GatherPieces(torch.autograd.Function):
    """forward: every rank's output pieces assembled into the whole tensor on every rank (one all-gather of the
    pieces flattened and padded to the longest rank's); backward: this rank's pieces of the gradient (every rank
    holds the same downstream gradient, so slicing is the exact adjoint), no communication."""

    @staticmethod
    def forward(ctx, layout, my_boxes, group, *pieces):
        shape, place = layout
        flat = _flat(pieces, place)
        parts = [torch.empty_like(flat) for _ in place]
        dist.all_gather(parts, flat, group=group)
        ctx.my_boxes = my_boxes
        return _assemble(parts, place, shape)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, None, *(grad[:, :, t0:t0 + s[2], h0:h0 + s[3]] for (t0, h0), s in ctx.my_boxes))


def gather_pieces(pieces: Sequence, keys: Sequence, split: VAESplit, everywhere: bool = True):
    """Assemble the whole output (B, C, T, H, W) from every rank's pieces. keys[j] = (chunk index, spatial index)
    of pieces[j]; a piece's place follows from every rank's keys and shapes (one all_gather_object). everywhere:
    every rank gets the whole tensor (differentiable); else rank 0 of the group gets it and the others None."""
    mine = [(k, tuple(p.shape)) for k, p in zip(keys, pieces)]
    every = [None] * dist.get_world_size(split.group)
    dist.all_gather_object(every, mine, group=split.group)
    frames, rows = {}, {}
    for boxes in every:
        for (c, si), s in boxes:
            frames[c], rows[si] = s[2], s[3]
    t_at = {c: sum(frames[j] for j in sorted(frames) if j < c) for c in frames}
    h_at = {si: sum(rows[j] for j in sorted(rows) if j < si) for si in rows}
    B, C, _, _, W = pieces[0].shape
    shape = (B, C, sum(frames.values()), sum(rows.values()), W)
    place = [[((t_at[c], h_at[si]), s) for (c, si), s in boxes] for boxes in every]
    my_boxes = [((t_at[c], h_at[si]), tuple(p.shape)) for (c, si), p in zip(keys, pieces)]
    if everywhere:
        return _GatherPieces.apply((shape, place), my_boxes, split.group, *pieces)
    flat = _flat(pieces, place)
    parts = [torch.empty_like(flat) for _ in place] if split.rank_of(split.ti, split.si) == 0 else None
    dist.gather(flat, parts, dst=0, group=split.group)   # the vae group's rank 0 is global rank 0
    return None if parts is None else _assemble(parts, place, shape)


def check_same_vae(split: VAESplit, what: str, value) -> None:
    """ParallelError unless every rank of the VAE group passes the same `value` (checked up front, so disagreeing
    ranks fail with a message instead of hanging in a transfer)."""
    _agree(f"VAE ranks disagree on {what}", value, split.group)


def reduce_vae_gradients(parameters, pm: ParallelMesh | None) -> None:
    """Sum every parameter's gradient over the VAE group after a split encode / decode backward (each rank saw only
    its pieces), in place; then they equal one process's. No-op without a mesh, with vae=1, or outside the group."""
    if pm is None or pm.settings.vae == 1 or pm.vae_group is None:
        return
    _sum_grads(parameters, pm.vae_group)
