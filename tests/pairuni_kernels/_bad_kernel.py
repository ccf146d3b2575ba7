"""A kernel the interpreter runs and the compiler rejects (a plain float global): the compile check
must report it, not pass it."""

import torch
import triton
import triton.language as tl

from pairuni_kernels._launch import KernelLaunch

CLAMP = 20.0


@triton.jit
def _clamp_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, tl.minimum(x, CLAMP), mask=offs < n)


def launch() -> KernelLaunch:
    return KernelLaunch.build(_clamp_kernel, (1,), (torch.empty(4, device="meta"), 4), {"BLOCK": 16})
