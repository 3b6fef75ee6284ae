"""TRITON_INTERPRET is read the way Triton reads it: every spelling that turns the
interpreter on lets the kernels run on CPU tensors with their float8 rounding exact, and
every spelling that leaves it off is refused on CPU tensors with a clear error."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ep_fp8.ops import kernel_choice
from tests._paths import ROOT


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("On", True), ("0", False), ("false", False),
                                       ("off", False), ("2", False)])
def test_spellings_of_triton_interpret_decide_cpu_launches_as_triton_does(monkeypatch, value, on):
    from triton.backends import backends

    monkeypatch.setenv("TRITON_INTERPRET", value)
    gpu_driver = object.__new__(backends["nvidia"].driver)  # a GPU machine: no launches on CPU tensors
    monkeypatch.setattr(kernel_choice, "driver", SimpleNamespace(active=gpu_driver))
    cpu = torch.zeros(2)
    if on:
        assert kernel_choice.use_triton("triton", cpu)
    else:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            kernel_choice.use_triton("triton", cpu)


_CHECK = """
import torch
from ep_fp8.ops import quant_kernels as K, quant_ref as R
x = (torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
for exact in (False, True):
    got, want = K.quantize_rows_triton(x, exact), R.quantize_rows_ref(x, exact)
    assert all(torch.equal(g.float(), w.float()) for g, w in zip(got, want)), exact
"""


def test_kernels_under_triton_interpret_true_match_the_reference_bit_for_bit():
    # The interpreter's own float8 cast rounds some values wrongly; the kernels' workaround
    # must be on for TRITON_INTERPRET=true as for TRITON_INTERPRET=1.
    env = dict(os.environ, TRITON_INTERPRET="true", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
