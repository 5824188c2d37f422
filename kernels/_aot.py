"""Ahead-of-time compilation of a Triton kernel for Hopper (sm_90) on a machine without a GPU.

Used by the tests to prove that every kernel compiles for the lent GPUs at the block sizes it uses for CogVideoX
shapes, with no register spills, and that index arithmetic that can exceed 2^31 is 64-bit (visible in the TTIR).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
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
    shared_bytes: int = 0   # shared memory per program (Triton allocates it dynamically: not in cuobjdump's SHARED)

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                 divisible_by_16: tuple = ()) -> CompiledInfo:
    """Compile `fn` (a @triton.jit function) for sm_90 and read its resource usage from the cubin.

    signature: {arg name: "*bf16" | "*fp32" | "i32" | "i64" | "fp32" | "constexpr"}; constexprs: {name: value}.
    divisible_by_16: names of pointer / int args that the launcher's JIT would specialize as multiples of 16 (16-byte
    aligned pointers, strides such as H*Dh): without them the AOT build cannot vectorize loads as the real one does.

    Under TRITON_INTERPRET=1 (as in the tests) @triton.jit yields interpreter objects that cannot be compiled, so
    the build runs in a child process without the interpreter (one, reused by every call), which imports `fn` by
    its module and name: call this directly from tests, interpreter or not.
    """
    if os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(fn, "cache_key"):
        py_fn = getattr(fn, "fn", fn)
        reply = call_in_child("kernels._aot", "_compile_sm90_job", py_fn.__module__, py_fn.__name__, signature,
                              constexprs, num_warps, num_stages, list(divisible_by_16))
        return CompiledInfo(**reply)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})
    return _info(compiled)


SM90 = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cuobjdump(cubin: bytes, flag: str) -> str:
    """`cuobjdump <flag>` (e.g. -res-usage, -sass) of a cubin; the tool ships in triton's wheel."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([CUOBJDUMP, flag, path], capture_output=True, text=True, check=True).stdout


def _info(compiled) -> CompiledInfo:
    usage = cuobjdump(compiled.asm["cubin"], "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"could not read resource usage from cuobjdump:\n{usage}")
    return CompiledInfo(int(m.group(1)), int(m.group(2)), int(m.group(3)), compiled.asm["ttir"], compiled.asm["ptx"],
                        compiled.metadata.shared)


def _compile_sm90_job(module, name, signature, constexprs, num_warps, num_stages, divisible_by_16) -> dict:
    from dataclasses import asdict
    import importlib
    fn = getattr(importlib.import_module(module), name)
    return asdict(compile_sm90(fn, signature, constexprs, num_warps, num_stages, tuple(divisible_by_16)))


# The child: one per process that asks, started on the first compile and reused (each start imports torch and
# triton, seconds on a loaded CI box), reading one JSON job a line (a module, a function and its JSON arguments)
# and answering one JSON line (the function's dict). Replies go to a private copy of stdout, because the compiler
# may print to stdout itself.
_CHILD = """
import importlib, json, os, sys, traceback
replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
for line in sys.stdin:
    mod, name, args = json.loads(line)
    try:
        reply = {"ok": getattr(importlib.import_module(mod), name)(*args)}
    except Exception:
        reply = {"error": traceback.format_exc()}
    replies.write(json.dumps(reply) + "\\n")
    replies.flush()
"""
_child = None


def call_in_child(module: str, name: str, *args):
    """module.name(*args) in the compiler child (no TRITON_INTERPRET): JSON arguments in, a JSON value back."""
    global _child
    if _child is None or _child.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        _child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
        atexit.register(_child.stdin.close)   # the child ends at EOF
    _child.stdin.write(json.dumps([module, name, list(args)]) + "\n")
    _child.stdin.flush()
    line = _child.stdout.readline()
    if not line:
        raise RuntimeError(f"sm_90 compile ({module}.{name}): the compiler process died (exit {_child.wait()})")
    reply = json.loads(line)
    if "error" in reply:
        raise RuntimeError(f"sm_90 compile ({module}.{name}) failed:\n{reply['error'][-4000:]}")
    return reply["ok"]
