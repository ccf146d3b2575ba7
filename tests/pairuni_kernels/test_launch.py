"""A compiled Triton launch refuses host memory with an error naming the argument, before Triton's own
"cannot be accessed" error; the interpreter takes CPU tensors."""

import pytest
import torch

from pairuni_kernels import _launch, clipped_policy_loss
from pairuni_kernels._launch import check_gpu_tensors


def test_cpu_tensor_for_a_compiled_kernel_names_the_argument():
    args = {"logp_ptr": torch.zeros(2, device="meta"), "old_ptr": torch.zeros(2), "n": 2}
    with pytest.raises(ValueError, match=r"^logp: .*CUDA tensor.*meta"):
        check_gpu_tensors(args, interpret=False)
    with pytest.raises(ValueError, match=r"^old: .*cpu"):
        check_gpu_tensors({"old_ptr": torch.zeros(2), "n": 2}, interpret=False)
    check_gpu_tensors(args, interpret=True)  # the interpreter reads host memory


def test_launchers_check_before_launching(triton_backend, monkeypatch, gen):
    monkeypatch.setattr(_launch, "interpreted", lambda: False)
    lp = -torch.rand(2, 5, generator=gen)
    with pytest.raises(ValueError, match=r"^logp: "):
        clipped_policy_loss(lp, lp + 0.1, torch.randn(2, generator=gen), torch.ones(2, 5, dtype=torch.bool))
