"""What a kernel compiles to on Hopper (sm_90), read from the build a real launch would make, without a GPU.

`inspect_launcher(launcher, *args)` runs one of the host launchers (`causal_pad3d_fwd`, `expert_adaln_bwd`, ...) on
meta tensors with every @triton.jit kernel of `kernels` replaced by a recorder, so the launcher computes its real
grid, block sizes, warps and scalar arguments (its own launch_config / tiling functions, num_sms = 132 as on an
H100 SXM) and launches nothing. Each recorded launch is then built for sm_90 the way triton 3.9's launcher builds
it (runtime/jit.py: `create_function_from_signature` -> `native_specialize_impl` -> `_pack_args`): integer
arguments equal to 1 become constants, integers and pointers divisible by 16 get `tt.divisibility = 16` (pointers
from the view's byte offset: a CUDA allocation itself is 512-byte aligned), floats and bools are not specialized.
The build runs in kernels._aot's compiler child (no TRITON_INTERPRET), and the report per launch is:
- registers, spills (stack / local bytes), static shared memory and warps, from the cubin (cuobjdump -res-usage);
- programs resident per SM on an H100: min over 65,536 registers (allocated per warp in units of 256), 228 KB of
  shared memory (1 KB reserved per block), 64 warps and 32 blocks;
- the global load / store instructions in the SASS by width (LDG / LDGSTS / STG: 128, 64, 32, 16 or 8 bits);
- which pointer arguments the kernel loads blocks from and stores blocks to (from the TTIR: the roots of the
  pointer blocks that reach tt.load / tt.store; scalar loads, one element a program, are left out), hence the
  bytes the launch moves: one pass = every element of that argument's tensor once. Repeated reads of the same
  element inside one launch (served by L2) are not counted.
"""
from __future__ import annotations

import importlib
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ._aot import SM90, call_in_child, cuobjdump

H100 = {"sms": 132, "regs": 65536, "smem": 228 * 1024, "smem_reserved": 1024, "warps": 64, "blocks": 32}
WIDTHS = (128, 64, 32, 16, 8)


@dataclass
class Launch:
    """One recorded launch: the kernel (module, name), its grid and its arguments, tensors described as JSON."""
    module: str
    name: str
    grid: list
    args: list
    kwargs: dict


@dataclass
class Built:
    """One launch built for sm_90 (see the module docstring)."""
    name: str
    grid: list
    num_warps: int
    n_regs: int
    stack_bytes: int
    local_bytes: int
    shared: int
    ldg: dict                      # width in bits -> count of global load instructions in the SASS
    stg: dict
    reads: dict                    # pointer argument -> bytes of its tensor (one pass)
    writes: dict
    specialized: dict = field(default_factory=dict)   # arg -> "D" (divisible by 16) or "1" (constant)
    ttir: str = field(default="", repr=False)

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0

    @property
    def resident(self) -> int:
        return resident_programs(self.n_regs, self.shared, self.num_warps)

    @property
    def bytes_moved(self) -> int:
        return sum(self.reads.values()) + sum(self.writes.values())


def resident_programs(n_regs: int, shared: int, num_warps: int, sm: dict = H100) -> int:
    """Blocks of num_warps warps an SM holds at once, limited by registers, shared memory, warps and blocks."""
    regs_per_warp = math.ceil(max(n_regs, 1) * 32 / 256) * 256
    by_regs = (sm["regs"] // regs_per_warp) // num_warps
    by_smem = sm["smem"] // (shared + sm["smem_reserved"])
    return min(by_regs, by_smem, sm["warps"] // num_warps, sm["blocks"])


# ---- recording the launches a host launcher makes ---------------------------------------------------------------

def _describe(a):
    if isinstance(a, torch.Tensor):
        return {"tensor": str(a.dtype).replace("torch.", ""), "addr": a.storage_offset() * a.element_size(),
                "nbytes": a.numel() * a.element_size()}
    if isinstance(a, torch.dtype):
        raise TypeError("dtype arguments are not recorded")
    return a


class _Recorder:
    def __init__(self, module: str, name: str, launches: list):
        self.module, self.name, self.launches = module, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            self.launches.append(Launch(self.module, self.name, [int(n) for n in g], [_describe(a) for a in args],
                                        {k: _describe(v) for k, v in kwargs.items()}))
        return launch


def _is_kernel(obj) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return isinstance(obj, (JITFunction, InterpretedFunction))


@contextmanager
def recording(n_sm: int = H100["sms"]):
    """Within: every kernel of the `kernels` modules records its launches into the yielded list; num_sms() is
    n_sm for every device (the launchers size persistent grids by it)."""
    launches: list = []
    saved = []
    for mod_name, mod in list(sys.modules.items()):
        if not (mod_name == "kernels" or mod_name.startswith("kernels.")) or mod is None:
            continue
        for attr, obj in list(vars(mod).items()):
            if _is_kernel(obj):
                saved.append((mod, attr, obj))
                setattr(mod, attr, _Recorder(mod_name, attr, launches))
            elif attr == "num_sms" and callable(obj):
                saved.append((mod, attr, obj))
                setattr(mod, attr, lambda device, n=n_sm: n)
    try:
        yield launches
    finally:
        for mod, attr, obj in saved:
            setattr(mod, attr, obj)


def record(launcher, *args, **kwargs) -> list[Launch]:
    """The launches launcher(*args, **kwargs) makes (pass meta tensors: nothing is allocated or run)."""
    with recording() as launches:
        launcher(*args, **kwargs)
    return launches


# ---- the build (runs in the compiler child) ---------------------------------------------------------------------

class _FakeTensor:
    """What triton's launcher reads from a tensor argument: its dtype and data_ptr()."""

    def __init__(self, dtype: str, addr: int):
        self.dtype, self._addr = getattr(torch, dtype), addr

    def data_ptr(self):
        return 512 + self._addr          # CUDA's caching allocator hands out 512-byte aligned blocks


def _sass_widths(sass: str) -> tuple[dict, dict]:
    ldg, stg = {w: 0 for w in WIDTHS}, {w: 0 for w in WIDTHS}
    for op, mods in re.findall(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)", sass):
        m = set(mods.split(".")[1:])
        width = 128 if "128" in m else 64 if "64" in m else 16 if m & {"U16", "S16"} else \
            8 if m & {"U8", "S8"} else 32
        (stg if op == "STG" else ldg)[width] += 1
    return ldg, stg


_SSA = re.compile(r"%[A-Za-z0-9_]+")


def _pointer_roots(ttir: str, arg_names: list) -> tuple[set, set]:
    """(arguments loaded from, arguments stored to): every pointer value is traced back to the pointer arguments
    it was computed from (addptr, splat, broadcast, select, loop-carried values ...), then tt.load / tt.store
    operands are looked up."""
    body = [re.sub(r"loc\(.*?\)$", "", ln) for ln in ttir.splitlines()]
    roots = {f"%{a}": {a} for a in arg_names}
    changed = True
    while changed:
        changed = False
        for ln in body:
            if "tt.load" in ln or "tt.store" in ln or "!tt.ptr" not in ln:
                continue
            pairs = re.findall(r"(%[A-Za-z0-9_]+) = (%[A-Za-z0-9_]+)", ln)     # scf.for iter_args(%a = %b)
            m = re.match(r"\s*(%[A-Za-z0-9_]+)(?::\d+)? = (.*)", ln)
            if m:
                pairs.append((m.group(1), " ".join(_SSA.findall(m.group(2)))))
            for lhs, rhs in pairs:
                found = set().union(*(roots.get(tok, set()) for tok in _SSA.findall(rhs)))
                if found - roots.get(lhs, set()):
                    roots[lhs] = roots.get(lhs, set()) | found
                    changed = True
    loads, stores = set(), set()
    for ln in body:
        for kind, target in (("tt.load", loads), ("tt.store", stores)):
            m = re.search(rf"{kind} (%[A-Za-z0-9_]+).* : (tensor<)?", ln)
            if m and m.group(2):        # a block of pointers; a scalar load (one element a program) is no pass
                target |= roots.get(m.group(1), set())
    return loads, stores


def _build_job(module: str, name: str, args: list, kwargs: dict) -> dict:
    import triton
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = getattr(importlib.import_module(module), name)
    backend = make_backend(SM90)
    binder = create_function_from_signature(fn.signature, fn.params, backend)

    def real(a):
        return _FakeTensor(a["tensor"], a["addr"]) if isinstance(a, dict) and "tensor" in a else a
    bound, specialization, options = binder(*map(real, args), **{k: real(v) for k, v in kwargs.items()})
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs), target=SM90,
                              options=options.__dict__)
    usage = cuobjdump(compiled.asm["cubin"], "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    ldg, stg = _sass_widths(cuobjdump(compiled.asm["cubin"], "-sass"))
    names = fn.arg_names
    loads, stores = _pointer_roots(compiled.asm["ttir"], names)
    spec = {}
    for arg, (_, key) in zip(names, specialization):
        if key == "D":
            spec[arg] = "D"
    for (idx,), val in constexprs.items():
        if not fn.params[idx].is_constexpr and val == 1:
            spec[names[idx]] = "1"
    desc = dict(zip(names, args))
    desc.update(kwargs)

    def nbytes(arg):
        d = desc.get(arg)
        return d["nbytes"] if isinstance(d, dict) else 0
    return {"n_regs": int(m.group(1)), "stack_bytes": int(m.group(2)), "shared": int(compiled.metadata.shared),
            "local_bytes": int(m.group(4)), "num_warps": int(compiled.metadata.num_warps),
            "ldg": ldg, "stg": stg, "reads": {a: nbytes(a) for a in names if a in loads},
            "writes": {a: nbytes(a) for a in names if a in stores}, "specialized": spec,
            "ttir": compiled.asm["ttir"]}


_built: dict = {}


def build(launch: Launch) -> Built:
    """Build one recorded launch for sm_90 (cached per process: a build takes seconds)."""
    key = repr((launch.module, launch.name, launch.args, sorted(launch.kwargs.items())))
    if key not in _built:
        reply = call_in_child("kernels._static", "_build_job", launch.module, launch.name, launch.args,
                              launch.kwargs)
        reply["ldg"] = {int(k): v for k, v in reply["ldg"].items()}
        reply["stg"] = {int(k): v for k, v in reply["stg"].items()}
        _built[key] = reply
    return Built(name=launch.name, grid=launch.grid, **_built[key])


def inspect_launcher(launcher, *args, **kwargs) -> list[Built]:
    """Every kernel launch launcher(*args, **kwargs) makes, built for sm_90 as that launch would build it."""
    return [build(launch) for launch in record(launcher, *args, **kwargs)]


def passes(builds: list[Built]) -> dict:
    """Pointer argument -> (reads, writes): how many launches of one op load / store it."""
    out: dict = {}
    for b in builds:
        for arg in b.reads:
            out.setdefault(arg, [0, 0])[0] += 1
        for arg in b.writes:
            out.setdefault(arg, [0, 0])[1] += 1
    return {k: tuple(v) for k, v in out.items()}


def widths(counts: dict) -> str:
    """{128: 4, 16: 2, ...} -> '128x4 16x2' (widths with no instruction left out)."""
    return " ".join(f"{w}x{n}" for w, n in sorted(counts.items(), reverse=True) if n) or "-"
