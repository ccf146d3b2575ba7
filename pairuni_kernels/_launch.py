"""One description of a Triton launch, shared by the launchers and the compile check.

Each launcher builds a `KernelLaunch` (kernel, grid, runtime arguments, constexprs) and calls it.
Each kernel module also has `kernel_variants()`, which drives the same launch builders over every
knob, dtype and block size they can see (on meta tensors, so nothing runs) and returns the launches;
`tests/pairuni_kernels/test_compile.py` compiles those for real GPU targets. Adding a constexpr to a
launcher therefore adds its variants to the compile check without touching the test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

#: Floating dtypes the Triton kernels read directly; other float inputs are converted by the launchers.
KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_POINTER_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
    torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "i1",
}


def interpreted() -> bool:
    """True when Triton runs kernels in its numpy interpreter (CPU tensors are then fine)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")


def scalar_type(value) -> str:
    """The Triton type the JIT gives a Python scalar argument (ints: i32 when they fit, else i64)."""
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a {type(value).__name__} argument")


def argument_label(arg_name: str) -> str:
    """`logp_ptr` -> `logp`: the name a caller knows the tensor by."""
    return arg_name[:-len("_ptr")] if arg_name.endswith("_ptr") else arg_name


def check_gpu_tensors(args: dict, *, interpret: bool | None = None) -> None:
    """A compiled kernel can only dereference device memory: name the first tensor that is not on a GPU."""
    if interpret is None:
        interpret = interpreted()
    if interpret:
        return
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and value.device.type != "cuda":
            raise ValueError(f"{argument_label(name)}: a compiled Triton kernel needs a CUDA tensor, got one on "
                             f"{value.device} (CPU tensors run the reference, or set TRITON_INTERPRET=1)")


@dataclass
class KernelLaunch:
    """A kernel with everything one launch needs; `args` maps each runtime parameter name to its value."""

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def build(cls, kernel, grid, runtime_args: tuple, constexprs: dict, num_warps: int | None = None,
              options: dict | None = None):
        """`options`: other compile options passed with the launch, e.g. {"maxnreg": 128}."""
        names = [n for n in kernel.arg_names if n not in constexprs]
        if len(names) != len(runtime_args):
            raise TypeError(f"{kernel.__name__}: {len(names)} runtime parameters, {len(runtime_args)} values given")
        return cls(kernel, grid, dict(zip(names, runtime_args)), dict(constexprs), num_warps, dict(options or {}))

    def launch_options(self) -> dict:
        """The compile options passed with the launch (num_warps and `options`); the rest are Triton's defaults."""
        return {**self.options, **({} if self.num_warps is None else {"num_warps": self.num_warps})}

    def __call__(self) -> None:
        check_gpu_tensors(self.args)
        self.kernel[self.grid](**self.args, **self.constexprs, **self.launch_options())

    def signature(self) -> dict:
        """Parameter name -> Triton type (`*bf16`, `i32`, `constexpr`), in the kernel's order."""
        sig = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
                continue
            value = self.args[name]
            sig[name] = "*" + _POINTER_TYPES[value.dtype] if isinstance(value, torch.Tensor) else scalar_type(value)
        return sig

    def key(self) -> tuple:
        """What makes two launches the same compiled binary (up to Triton's value specialisations)."""
        return (self.kernel.__name__, tuple(self.signature().items()), tuple(sorted(self.constexprs.items())),
                self.num_warps, tuple(sorted(self.options.items())))

    def label(self) -> str:
        ptrs = ",".join(f"{argument_label(n)}:{t[1:]}" for n, t in self.signature().items() if t.startswith("*"))
        knobs = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        warps = "" if self.num_warps is None else f" warps={self.num_warps}"
        warps += "".join(f" {k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.kernel.__name__}[{knobs}{warps}]({ptrs})"


def unique(launches) -> list[KernelLaunch]:
    """Distinct compiled variants, in first-seen order."""
    seen, out = set(), []
    for launch in launches:
        key = launch.key()
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out
