"""Cost model of context parallelism (cogvideox/parallel.py): communication volume, exact, and step time, predicted.

    shape = SHAPES["5b"]                                     # 480x720x49: 226 text + 13 x 30 x 45 vision tokens
    p = predict(shape, Scheme(ulysses=4, cfg=2), single_step_s=1.3, link=H100_NVLINK, itemsize=2)
    p.step_s, p.speedup, p.bytes_per_rank                    # a prediction, never a measurement
    python -m bench.cost_model --model 5b --step-s 1.3       # the plan for 2 .. 64 GPUs

Notation: one guided step of B samples (B = 2: [uncond | cond]), C = cfg degree, Bc = B / C samples per CFG rank;
S = L + N joint tokens (L text, N vision), D = H * Dh; U = ulysses, R = ring, n = U * R sequence ranks. Shards are
contiguous, sizes s_i = S // n or S // n + 1 (the first S % n one longer), rank i = r * U + u; ring chunk r holds
S_r = s_{rU} + ... + s_{rU+U-1} tokens; head groups h_u = H // U or H // U + 1 (30 heads on 4: 8, 8, 7, 7). The
global rank is c * R * U + r * U + u (the DeviceMesh ("cfg", "ring", "ulysses"), Ulysses innermost).

Communication volume per rank and step, in elements (bytes = elements x itemsize), derived from the collectives
cogvideox/parallel.py calls (tests/test_cost_model.py counts what those calls really move and checks it equals
these formulas, rank by rank, so the volume is exact, not estimated):
- split (`shard`): 0. Every rank holds the whole input and slices it (only the backward all-reduces).
- Ulysses, per block, two all-to-alls (`_ulysses_exchange`):
    q, k, v -> head groups: passes 3 Bc s_i H Dh; sends 3 Bc s_i (H - h_u) Dh, receives 3 Bc h_u Dh (S_r - s_i);
    output -> token shards: passes Bc S_r h_u Dh; sends Bc h_u Dh (S_r - s_i), receives Bc s_i (H - h_u) Dh.
  Even sizes (s = S / n): 4 Bc s D (U - 1) / U leave each rank per block.
- Ring, per block, R - 1 shifts of the K/V pair held (`_RingAttention`; at step t rank r holds chunk (r - t) mod R):
    sends 2 Bc h_u Dh (S - S_{(r+1) mod R}), receives 2 Bc h_u Dh (S - S_r); (h_u = H without Ulysses).
  Even sizes: 2 Bc s D (R - 1) per block, which is 2 Bc S D (R - 1) / R with U = 1: every rank sees all K and V.
- gather (`gather`, once per step): an all-gather of the head's output padded to the longest vision share
  V = max_i (vision tokens of shard i), P = out_channels x patch_size^2 x patch_size_t values per token:
  passes Bc V P, receives (n - 1) Bc V P, sends (n - 1) Bc V P (a ring all-gather forwards every other chunk).
- CFG (`cfg_combine`, once per step): an all-gather of the Bc N P output over the 2 CFG ranks: passes, sends and
  receives Bc N P.
The ring's shift and the gathers' "sent" depend on NCCL's algorithm only for all-gather (assumed ring); everything
received is exact whatever the algorithm.

Step time, predicted from the one-GPU step T1 (the same B, measured or quoted; never from a formula alone):
- Split T1 into attention, T_a = f T1, and the rest, T_o = (1 - f) T1, with f = attention FLOPs / all FLOPs
  (bench/flops.py): ASSUMES attention and GEMMs run at the same FLOP/s (flash attention on H100 is within tens of
  percent of GEMM throughput); `attn_fraction` overrides it.
- Rank work: the rest scales with its tokens, T_o (Bc / B) s_i / S (per-token ops; the text/vision split and the
  time embedding are neglected); attention with its queries and heads, T_a (Bc / B) (S_r / S) (h_u / H): every rank
  attends over all S keys. Imbalance is the busiest rank's share over the mean: uneven head groups (8 / 7.5 for 30
  heads on 4 ranks) and uneven shards. ASSUMES compute time is proportional to work at every size (no loss of GPU
  efficiency on smaller shards: optimistic at high degrees, e.g. 277 tokens per rank at 64).
- A collective of m bytes (the larger of sent and received, links being full duplex) takes latency + m / bandwidth,
  with the bandwidth measured for that collective (all-to-all, point-to-point shift, all-gather: bench/suites/
  parallel.py probes them at the start of a run) or quoted (H100_NVLINK, labelled).
- Eager copies around the collectives, with `memory_bw` (bytes read + written per second: the run's measured copy
  ceiling, or HBM from a datasheet): per block, Ulysses' stack / cat of q, k, v and of the output,
  2 x itemsize x (6 Bc s H Dh + 3 Bc S_r h Dh + Bc S_r h Dh + Bc s H Dh) bytes, and the ring's K/V stack
  (4 itemsize E) and fp32 log-sum-exp merges, (itemsize + 32) E per merge after the first chunk (o.float(),
  out * w_old, o * w_new, the sum) plus 2 (itemsize + 4) E for the first chunk's cast and the final one,
  E = Bc h S_r Dh (counted from _ulysses_exchange and _RingAttention.forward). memory_bw None: not counted.
- Overlap: ring shifts run while the chunk in hand is attended (functional collectives are asynchronous on CUDA),
  so each ring step costs max(attention of the chunk + its merge, shift); Ulysses' all-to-alls, the gather and the
  CFG gather are on the critical path (the next op needs their result). `overlap=False` (CPU / gloo) adds everything.
- Per block: rest + ring steps + Ulysses; step = blocks x that + gather + CFG, for every rank; the prediction is
  the slowest rank (a collective finishes when its slowest member arrives).
- Nodes: with gpus_per_node, a group whose ranks span more than one node uses `Link.inter` (Ulysses innermost,
  so Ulysses stays in a node first, then the ring, then CFG), ASSUMING one NIC per GPU (DGX H100: 8 x 400 Gb/s).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace

from .flops import DiTShape, dit_attention_flops, dit_step_flops

BATCH = 2   # one guided (CFG) step: [uncond | cond]

# The paper's shapes (configs: cogvideox/config.py presets; tests check these equal DiTShape.from_config).
# 480x720x49 -> latents 13 x 60 x 90; 1.5 at 768x1360x81 -> 21 latent frames padded to 22 (patch_size_t 2, as
# diffusers' 1.5 pipeline does) x 96 x 170.
SHAPES = {
    "2b": DiTShape(batch=BATCH, frames=13, height=60, width=90, num_layers=30, heads=30),
    "5b": DiTShape(batch=BATCH, frames=13, height=60, width=90, num_layers=42, heads=48),
    "1.5": DiTShape(batch=BATCH, frames=22, height=96, width=170, num_layers=42, heads=48, patch_size_t=2),
}
RESOLUTIONS = {"2b": "480x720x49", "5b": "480x720x49", "1.5": "768x1360x81"}

# The issue's figure (issue 8), not measured here: "5B 480x720x49 about 1.3 s per step on one H100" (a guided step).
ISSUE_5B_STEP_S = 1.3


@dataclass(frozen=True)
class Link:
    """Bandwidths in bytes per second per rank (the larger of its sent and received bytes over the time) and a
    latency per collective call. `inter`: the link between nodes when gpus_per_node is set."""
    a2a: float
    p2p: float
    all_gather: float
    latency: float = 0.0
    source: str = ""
    gpus_per_node: int | None = None
    inter: "Link | None" = None

    def __post_init__(self):
        for name in ("a2a", "p2p", "all_gather"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"Link.{name} must be a finite bandwidth > 0 bytes/s, got {v!r}")
        if not (self.latency >= 0 and math.isfinite(self.latency)):
            raise ValueError(f"Link.latency must be >= 0 s, got {self.latency!r}")
        if self.gpus_per_node is not None and (self.gpus_per_node < 1 or self.inter is None):
            raise ValueError("Link.gpus_per_node needs a positive count and an inter-node Link")

    def bandwidth(self, op: str) -> float:
        return {"all_to_all": self.a2a, "p2p": self.p2p, "all_gather": self.all_gather}[op]

    def for_span(self, span: int) -> "Link":
        """The link a group of `span` consecutive ranks uses: this one inside a node, `inter` across nodes."""
        if self.gpus_per_node is None or span <= self.gpus_per_node:
            return self
        return self.inter


# H100 SXM datasheet: NVLink 4, 900 GB/s bidirectional per GPU = 450 GB/s per direction. Not measured here, and an
# upper bound: NCCL reaches less (nccl-tests on DGX H100 report about 360-480 GB/s bus bandwidth depending on op).
# Latency 15 us per collective: an assumption (NCCL small-message latency on NVLink is of that order).
# Inter-node: one 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100) = 50 GB/s per direction, 25 us: assumptions.
IB_NDR = Link(a2a=50e9, p2p=50e9, all_gather=50e9, latency=25e-6,
              source="assumed: 400 Gb/s NDR InfiniBand per GPU = 50 GB/s per direction, 25 us (not measured)")
H100_NVLINK = Link(a2a=450e9, p2p=450e9, all_gather=450e9, latency=15e-6,
                   source="H100 SXM datasheet: NVLink 450 GB/s per direction; 15 us per collective assumed "
                          "(not measured)")
# H100 SXM datasheet: HBM3 3.35 TB/s (not measured; a device copy reaches less).
H100_HBM_BPS = 3.35e12
H100_CLUSTER = replace(H100_NVLINK, gpus_per_node=8, inter=IB_NDR,
                       source=H100_NVLINK.source + "; 8 GPUs per node, " + IB_NDR.source)


@dataclass(frozen=True)
class Scheme:
    """Degrees of one layout (cogvideox.parallel.Parallel without the VAE's)."""
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self):
        for k in ("ulysses", "ring", "cfg"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Scheme.{k} must be a positive int, got {v!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"Scheme.cfg must be 1 or 2, got {self.cfg}")

    @property
    def seq(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.seq * self.cfg

    @property
    def label(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("ulysses", "ring", "cfg") if getattr(self, k) > 1]
        return ",".join(parts) or "1-gpu"

    def coords(self, rank: int) -> tuple[int, int, int]:
        """Global rank -> (cfg, ring, ulysses) rank: the mesh is row-major over ("cfg", "ring", "ulysses")."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must lie in [0, {self.world}), got {rank}")
        U, R = self.ulysses, self.ring
        return rank // (R * U), (rank // U) % R, rank % U


def shard_sizes(n_tokens: int, n: int) -> list[int]:
    """cogvideox.parallel.shard_sizes (the same numbers; restated so that the model imports no model code)."""
    return [(n_tokens + n - 1 - i) // n for i in range(n)]


def head_groups(heads: int, n: int) -> list[int]:
    """cogvideox.parallel.head_groups: the first heads % n ranks one head more."""
    return [heads // n + (i < heads % n) for i in range(n)]


@dataclass(frozen=True)
class Collective:
    """One kind of collective on one rank, summed over a step: `calls` calls, elements passed in, sent, received."""
    kind: str        # "ulysses", "ring", "gather", "cfg"
    op: str          # "all_to_all", "p2p" (ring shift, an all_to_all with one split), "all_gather"
    calls: int
    passed: int
    sent: int
    recv: int


def _geometry(shape: DiTShape, scheme: Scheme, rank: int) -> dict:
    c, r, u = scheme.coords(rank)
    if shape.batch % scheme.cfg:
        raise ValueError(f"cfg={scheme.cfg} needs a batch divisible by it, got {shape.batch}")
    U, R, n = scheme.ulysses, scheme.ring, scheme.seq
    S, L = shape.seq_len, shape.text_len
    sizes = shard_sizes(S, n)
    chunks = [sum(sizes[j * U:(j + 1) * U]) for j in range(R)]
    i = r * U + u
    heads = head_groups(shape.heads, U)[u]
    starts = [sum(sizes[:k]) for k in range(n)]
    vision = [max(a + z - max(a, L), 0) for a, z in zip(starts, sizes)]   # vision rows of each shard
    return dict(c=c, r=r, u=u, i=i, Bc=shape.batch // scheme.cfg, S=S, sizes=sizes, chunks=chunks, s=sizes[i],
                h=heads, vision=vision, out_patch=shape.out_channels * shape.patch_size ** 2 * shape.patch_size_t)


def rank_collectives(shape: DiTShape, scheme: Scheme, rank: int) -> list[Collective]:
    """Every collective `rank` joins in one forward step (module docstring), in elements."""
    g = _geometry(shape, scheme, rank)
    Bc, H, Dh, layers = g["Bc"], shape.heads, shape.head_dim, shape.num_layers
    U, R, n = scheme.ulysses, scheme.ring, scheme.seq
    s, h, S_r, r = g["s"], g["h"], g["chunks"][g["r"]], g["r"]
    out = []
    if U > 1:   # per block: q, k, v to head groups, then the output back to token shards
        passed = 3 * Bc * s * H * Dh + Bc * S_r * h * Dh
        sent = 3 * Bc * s * (H - h) * Dh + Bc * h * Dh * (S_r - s)
        recv = 3 * Bc * h * Dh * (S_r - s) + Bc * s * (H - h) * Dh
        out.append(Collective("ulysses", "all_to_all", 2 * layers, layers * passed, layers * sent, layers * recv))
    if R > 1:   # per block: R - 1 shifts of the (2, Bc, h, chunk, Dh) K/V pair held at that step
        chunks = g["chunks"]
        sent = sum(2 * Bc * h * Dh * chunks[(r - t) % R] for t in range(R - 1))
        recv = sum(2 * Bc * h * Dh * chunks[(r - t - 1) % R] for t in range(R - 1))
        out.append(Collective("ring", "p2p", (R - 1) * layers, layers * sent, layers * sent, layers * recv))
    if n > 1:   # the head's output, padded to the longest vision share
        piece = Bc * max(g["vision"]) * g["out_patch"]
        out.append(Collective("gather", "all_gather", 1, piece, (n - 1) * piece, (n - 1) * piece))
    if scheme.cfg > 1:
        v = Bc * shape.vision_tokens * g["out_patch"]
        out.append(Collective("cfg", "all_gather", 1, v, (scheme.cfg - 1) * v, (scheme.cfg - 1) * v))
    return out


def group_span(kind: str, scheme: Scheme) -> int:
    """Consecutive global ranks a collective's group covers (Ulysses innermost): decides intra- or inter-node."""
    return {"ulysses": scheme.ulysses, "ring": scheme.seq, "gather": scheme.seq, "cfg": scheme.world}[kind]


@dataclass(frozen=True)
class Prediction:
    scheme: Scheme
    step_s: float               # predicted step time (the slowest rank)
    compute_s: float            # that rank's compute
    comm_s: float               # communication left on its critical path (step - compute)
    speedup: float              # one-GPU step / step
    efficiency: float           # speedup / world
    bytes_per_rank: int         # bytes the busiest rank sends per step (all collectives)
    bytes_by_kind: dict = field(default_factory=dict)   # that rank's sent bytes per collective kind
    imbalance: float = 1.0      # the slowest rank's compute over the mean rank's
    link_source: str = ""

    @property
    def world(self) -> int:
        return self.scheme.world

    def as_dict(self) -> dict:
        return {"scheme": self.scheme.label, "world": self.world, "predicted_ms": 1e3 * self.step_s,
                "compute_ms": 1e3 * self.compute_s, "comm_ms": 1e3 * self.comm_s, "speedup": self.speedup,
                "efficiency": self.efficiency, "bytes_per_rank": self.bytes_per_rank,
                "bytes_by_kind": dict(self.bytes_by_kind), "imbalance": self.imbalance}


def attention_fraction(shape: DiTShape) -> float:
    """Attention FLOPs over all FLOPs of the step: the share of the one-GPU time attributed to attention."""
    return dit_attention_flops(shape) / dit_step_flops(shape)


def _collective_s(nbytes: float, op: str, link: Link) -> float:
    return link.latency + nbytes / link.bandwidth(op)


def _ring_copy_bytes(g: dict, shape: DiTShape, itemsize: int) -> tuple[float, float]:
    """Ring attention's eager copies per block: (before the ring steps and after them, per merge)."""
    E = g["Bc"] * g["h"] * g["chunks"][g["r"]] * shape.head_dim
    return 4 * itemsize * E + 2 * (itemsize + 4) * E, (itemsize + 32) * E


def _ulysses_copy_bytes(g: dict, shape: DiTShape, itemsize: int) -> float:
    """Ulysses' eager copies per block (stack and cat on both exchanges)."""
    Bc, H, Dh, s, h, S_r = g["Bc"], shape.heads, shape.head_dim, g["s"], g["h"], g["chunks"][g["r"]]
    return 2 * itemsize * (6 * Bc * s * H * Dh + 3 * Bc * S_r * h * Dh + Bc * S_r * h * Dh + Bc * s * H * Dh)


def _rank_time(shape, scheme, rank, t_attn, t_rest, link, itemsize, overlap, memory_bw) -> tuple[float, float]:
    """-> (step seconds, compute seconds) of one rank."""
    g = _geometry(shape, scheme, rank)
    S, H, layers, R = g["S"], shape.heads, shape.num_layers, scheme.ring
    frac_b = g["Bc"] / shape.batch
    rest = t_rest * frac_b * g["s"] / S
    attn = t_attn * frac_b * (g["chunks"][g["r"]] / S) * (g["h"] / H)    # my queries x all S keys, my heads
    copy_s = (lambda b: layers * b / memory_bw) if memory_bw else (lambda b: 0.0)
    step = rest
    colls = {c.kind: c for c in rank_collectives(shape, scheme, rank)}
    if R > 1:   # per ring step: attend the chunk in hand (and merge it) while the next one arrives
        ring_link = link.for_span(group_span("ring", scheme))
        fixed, merge = _ring_copy_bytes(g, shape, itemsize)
        step += copy_s(fixed)
        per_token = 2 * g["Bc"] * g["h"] * shape.head_dim * itemsize * layers   # K/V bytes per token, all blocks
        chunks, r = g["chunks"], g["r"]
        for t in range(R):
            a = attn * chunks[(r - t) % R] / S + (copy_s(merge) if t > 0 else 0.0)
            if t == R - 1:
                step += a
                continue
            x = layers * ring_link.latency + per_token * max(chunks[(r - t) % R], chunks[(r - t - 1) % R]) / (
                ring_link.p2p)
            step += max(a, x) if overlap else a + x
    else:
        step += attn
    if scheme.ulysses > 1:
        step += copy_s(_ulysses_copy_bytes(g, shape, itemsize))
    for kind in ("ulysses", "gather", "cfg"):
        if kind in colls:
            c, lk = colls[kind], link.for_span(group_span(kind, scheme))
            step += c.calls * lk.latency + max(c.sent, c.recv) * itemsize / lk.bandwidth(c.op)
    return step, rest + attn


def predict(shape: DiTShape, scheme: Scheme, single_step_s: float, link: Link, itemsize: int,
            attn_fraction: float | None = None, overlap: bool = True,
            memory_bw: float | None = None) -> Prediction:
    """Predicted step time of `scheme` from the one-GPU step (module docstring for every assumption)."""
    if not (single_step_s > 0 and math.isfinite(single_step_s)):
        raise ValueError(f"single_step_s must be a positive time, got {single_step_s!r}")
    if itemsize not in (1, 2, 4, 8):
        raise ValueError(f"itemsize must be 1, 2, 4 or 8 bytes, got {itemsize!r}")
    f = attention_fraction(shape) if attn_fraction is None else attn_fraction
    if not 0 <= f <= 1:
        raise ValueError(f"attn_fraction must lie in [0, 1], got {f}")
    t_attn, t_rest = f * single_step_s, (1 - f) * single_step_s
    if memory_bw is not None and not (memory_bw > 0 and math.isfinite(memory_bw)):
        raise ValueError(f"memory_bw must be a bandwidth > 0 bytes/s or None, got {memory_bw!r}")
    times = [_rank_time(shape, scheme, k, t_attn, t_rest, link, itemsize, overlap, memory_bw)
             for k in range(scheme.world)]
    slow = max(range(scheme.world), key=lambda k: times[k][0])
    step, compute = times[slow]
    mean_compute = sum(t[1] for t in times) / len(times)
    sent = [sum(c.sent for c in rank_collectives(shape, scheme, k)) for k in range(scheme.world)]
    busiest = max(range(scheme.world), key=lambda k: sent[k])
    by_kind = {c.kind: c.sent * itemsize for c in rank_collectives(shape, scheme, busiest)}
    speedup = single_step_s / step
    return Prediction(scheme, step, compute, step - compute, speedup, speedup / scheme.world,
                      sent[busiest] * itemsize, by_kind, max(t[1] for t in times) / mean_compute, link.source)


def link_busy_pct(shape: DiTShape, scheme: Scheme, link: Link, itemsize: int, step_s: float) -> float:
    """% of a (measured) step the busiest rank's link carries data at `link`'s bandwidths: its bytes of every
    collective over that collective's bandwidth, summed, over the step (no latency; 100% = communication-bound)."""
    worst = 0.0
    for k in range(scheme.world):
        t = sum(max(c.sent, c.recv) * itemsize / link.for_span(group_span(c.kind, scheme)).bandwidth(c.op)
                for c in rank_collectives(shape, scheme, k))
        worst = max(worst, t)
    return 100 * worst / step_s


def schemes(world: int, heads: int, batch: int = BATCH) -> list[Scheme]:
    """Every layout of `world` ranks: cfg 1 or 2 (when the batch splits), then every ulysses x ring of the rest with
    ulysses <= heads (more would leave ranks with no head)."""
    out = []
    for cfg in (1, 2):
        if world % cfg or batch % cfg:
            continue
        seq = world // cfg
        for u in range(1, min(seq, heads) + 1):
            if seq % u == 0:
                out.append(Scheme(ulysses=u, ring=seq // u, cfg=cfg))
    return out


PLAN_WORLDS = (2, 3, 4, 5, 6, 7, 8, 16, 32, 64)


def plan(shape: DiTShape, single_step_s: float, link: Link, itemsize: int, worlds=PLAN_WORLDS,
         **kwargs) -> list[Prediction]:
    """Predictions for every scheme of every world size, fastest first within each world size."""
    out = []
    for w in worlds:
        out += sorted((predict(shape, s, single_step_s, link, itemsize, **kwargs) for s in schemes(w, shape.heads)),
                      key=lambda p: p.step_s)
    return out


def best(predictions: list[Prediction]) -> dict[int, Prediction]:
    """world size -> its fastest predicted scheme."""
    out = {}
    for p in predictions:
        if p.world not in out or p.step_s < out[p.world].step_s:
            out[p.world] = p
    return out


def format_table(predictions: list[Prediction]) -> list[str]:
    lines = ["| GPUs | scheme | predicted ms | speedup | efficiency | MB sent / rank / step | exposed comm ms | "
             "imbalance |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in predictions:
        lines.append(f"| {p.world} | {p.scheme.label} | {1e3 * p.step_s:.1f} (predicted) | {p.speedup:.2f}x | "
                     f"{100 * p.efficiency:.0f}% | {p.bytes_per_rank / 1e6:.1f} | {1e3 * p.comm_s:.1f} | "
                     f"{p.imbalance:.3f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cost_model", description="Print the predicted plan.")
    ap.add_argument("--model", choices=sorted(SHAPES), default="5b")
    ap.add_argument("--step-s", type=float, default=None,
                    help="one-GPU guided step in seconds (default: the issue's 5B figure, 1.3 s on one H100, scaled "
                         "by FLOPs to the chosen model)")
    ap.add_argument("--worlds", default="2,3,4,5,6,7,8,16,32,64")
    ap.add_argument("--all", action="store_true", help="every scheme, not only the fastest per GPU count")
    args = ap.parse_args(argv)
    shape = SHAPES[args.model]
    if args.step_s is None:
        step = ISSUE_5B_STEP_S * dit_step_flops(shape) / dit_step_flops(SHAPES["5b"])
        origin = f"the issue's 5B figure (1.3 s on one H100) scaled by FLOPs: {step:.3f} s (not measured)"
    else:
        step, origin = args.step_s, f"{args.step_s:.3f} s (given)"
    preds = plan(shape, step, H100_CLUSTER, 2, worlds=[int(w) for w in args.worlds.split(",")],
                 memory_bw=H100_HBM_BPS)
    print(f"{args.model} {RESOLUTIONS[args.model]}, {shape.seq_len} tokens, {shape.heads} heads, bf16, batch "
          f"{shape.batch}; one-GPU step: {origin}; link: {H100_CLUSTER.source}; copies at the H100 datasheet's "
          f"HBM 3.35 TB/s (not measured)")
    print("\n".join(format_table(preds if args.all else list(best(preds).values()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
