"""Triton helpers that several kernels share.

INTERPRETED: whether @triton.jit yields interpreter functions in this process. Triton decides that when a kernel
is decorated, from the same knob (TRITON_INTERPRET), so a module-level constant read at import agrees with every
kernel imported after it. As a global tl.constexpr it takes part in the compile cache key, and GPU builds (and the
AOT sm_90 builds of kernels._aot, which run without TRITON_INTERPRET) compile the branch it guards away.
"""
from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def cast_rtne(y, DTYPE: tl.constexpr):
    """fp32 y -> DTYPE as the GPU converts it: round to nearest even, NaN stays NaN, inf stays inf.

    Use it for every store of a computed value into a low-precision buffer. On the GPU it is the plain cast. The
    interpreter's fp32 -> bf16 cast truncates (its "rtne" option is wrong too, and it flushes subnormals), so there
    bf16 is rounded by hand on the bits and bitcast: adding 0x7FFF + lsb carries into the exponent exactly when
    RTNE rounds up, so inf stays inf and the largest finite values round to inf, as on the GPU; a NaN keeps its
    upper bits with the quiet bit set (a NaN with payload only in the low 16 bits would otherwise become inf).
    fp16 casts round correctly in both.
    """
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = tl.where(y != y, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(DTYPE)
