"""Padding-free attention over packed records with PyTorch's own varlen kernel.

A packed batch goes to the model as one joined row with its position ids (collate.py): each
record starts where its position id is 0. Flash-attention kernels run such a row record by
record ("varlen"): no padding, no [L, L] mask, and no work on the blocked pairs across
records. transformers runs them through the `flash-attn` package, which the trainer image
does not carry (it builds against one CUDA toolkit); PyTorch has the same kernels built in
(`torch.nn.attention.varlen.varlen_attn`: Flash Attention, or cuDNN where it is eligible).
`VARLEN` registers them with transformers as one more attention implementation:

- a batch without a mask (padding-free packed rows, or rows without padding): the records
  (or rows) are the sequences, found from `cu_seq_lens_q`/`max_length_q` when the collator
  gives them, else from the position ids; on CUDA the varlen kernel, causal, runs them; on
  other devices each record through SDPA, causal (the same result, for tests and CPUs);
- a batch with a mask (padding, or the 4-D block mask of packed rows): SDPA with that mask,
  as transformers' "sdpa" implementation does; so do decoding steps with a cache.

`attention_for` decides where it is used: on CUDA, in half precision, for models whose
attention it covers (causal, no sliding window, no logit soft-capping, no dropout).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from lmforge.trainer.data.collate import record_bounds
from transformers import AttentionInterface
from transformers.integrations.flash_attention import get_target_dtype
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

VARLEN = "lmforge_varlen"


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [batch, heads, length, head_dim], key and
    value [batch, kv_heads, length, head_dim]; returns [batch, length, heads, head_dim]."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    unsupported = [
        name
        for name, value_ in (
            ("dropout", dropout),
            ("sliding_window", kwargs.get("sliding_window")),
            ("softcap", kwargs.get("softcap")),
            ("s_aux", kwargs.get("s_aux")),
        )
        if value_
    ]
    if unsupported or not (is_causal if is_causal is not None else module.is_causal):
        raise NotImplementedError(
            f"{VARLEN} attention runs causal attention only; this layer asks for "
            f"{', '.join(unsupported) or 'non-causal attention'} (attention_for() should not "
            "have chosen it for this model)"
        )
    batch, heads, length, _ = query.shape
    bounds, longest = _sequence_bounds(kwargs, batch, length, query.device)
    q, k, v = (
        t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3])
        for t in (query, key, value)
    )
    gqa = key.shape[1] != heads
    if query.is_cuda:
        target = get_target_dtype(q, module)  # autocast leaves RoPE's output in fp32
        if target is not None:
            q, k, v = q.to(target), k.to(target), v.to(target)
    if query.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        gqa_kwargs: dict[str, bool] = {}
        if gqa and _kernel_takes_gqa():
            gqa_kwargs["enable_gqa"] = True
        elif gqa:  # an older kernel: each query head gets its own copy of its key/value head
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        out = varlen_attn(
            q, k, v, bounds, bounds, longest, longest,
            scale=scaling, window_size=(-1, 0), **gqa_kwargs,
        )  # fmt: skip
    else:  # not CUDA, or fp32 weights outside autocast (the kernel takes 16 bits only)
        out = _records_through_sdpa(q, k, v, bounds.tolist(), scaling, gqa)
    return out.view(batch, length, heads, value.shape[3]), None


@functools.cache
def _kernel_takes_gqa() -> bool:
    """Whether this PyTorch's varlen kernel groups query heads itself (`enable_gqa`)."""
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _sequence_bounds(
    kwargs: dict[str, Any], batch: int, length: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The sequences' bounds in the joined rows and the longest: the collator's, else found
    from the position ids (else the rows)."""
    given = kwargs.get("cu_seq_lens_q")
    if given is not None and kwargs.get("max_length_q") is not None:
        return given.to(device=device, dtype=torch.int32), int(kwargs["max_length_q"])
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(length, device=device)
    return record_bounds(positions.expand(batch, length).to(device))


def _records_through_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: list[int],
    scaling: float | None,
    gqa: bool,
) -> torch.Tensor:
    """What the varlen kernel computes, one record at a time ([tokens, heads, head_dim])."""
    outputs = [
        F.scaled_dot_product_attention(
            *(t[start:end].transpose(0, 1) for t in (q, k, v)),
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        ).transpose(0, 1)
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs)


def _varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
    """No mask where the varlen kernel runs (no padding); SDPA's mask where there is padding."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, _varlen_mask)


def padding_free(model: Any) -> bool:
    """Packed batches go padding-free only where a varlen kernel runs the records apart
    (flash attention, VARLEN). SDPA and eager would attend over the whole joined
    row, masked: a measured 3x slower step on the CPU benchmark than the per-row block mask.
    Prompt, prefix and p-tuning adapters never do (PEFT drops the position ids that tell
    records apart)."""
    adapters = getattr(model, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in adapters.values()):
        return False
    config = getattr(model, "config", None)
    implementation = str(getattr(config, "_attn_implementation", None) or "")
    return "flash" in implementation or implementation == VARLEN


def attention_for(model: Any, dtype: torch.dtype) -> str | None:
    """VARLEN where it runs and covers the model's attention, else None (keep transformers'
    default). `dtype`: what the layers compute in (the autocast dtype in mixed precision)."""
    if not torch.cuda.is_available() or dtype not in (torch.bfloat16, torch.float16):
        return None
    config = model.config
    reasons = []
    if not getattr(model, "_supports_attention_backend", False):
        reasons.append(f"{type(model).__name__} takes no registered attention implementation")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
        getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    ):
        reasons.append("sliding-window layers")
    reasons += [
        n for n in ("attn_logit_softcapping", "attention_dropout") if getattr(config, n, None)
    ]
    if reasons:
        log.info("attention: transformers' default, not %s (%s)", VARLEN, "; ".join(reasons))
        return None
    return VARLEN
