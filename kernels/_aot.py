"""Ahead-of-time compilation of a Triton kernel for Hopper (sm_90) on a machine without a GPU.

Used by the tests to prove that every kernel compiles for the lent GPUs at the block sizes it uses for CogVideoX
shapes, with no register spills, and that index arithmetic that can exceed 2^31 is 64-bit (visible in the TTIR).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget


@dataclass
class CompiledInfo:
    n_regs: int
    stack_bytes: int    # per-thread stack frame; spills land here or in local memory
    local_bytes: int
    ttir: str
    ptx: str

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3) -> CompiledInfo:
    """Compile `fn` (a @triton.jit function) for sm_90 and read its resource usage from the cubin.

    signature: {arg name: "*bf16" | "*fp32" | "i32" | "i64" | "fp32" | "constexpr"}; constexprs: {name: value}.
    """
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"could not read resource usage from cuobjdump:\n{usage}")
    return CompiledInfo(int(m.group(1)), int(m.group(2)), int(m.group(3)), compiled.asm["ttir"], compiled.asm["ptx"])
