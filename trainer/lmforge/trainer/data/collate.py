"""Batch token records into tensors: padding, and block-diagonal masks for packed sequences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lmforge.trainer.data.tokenization import IGNORE


class DataCollator:
    """Pads a list of token records into a batch for a causal LM (a Trainer data_collator).

    Unpacked records get right padding (the pad token, else EOS), labels padded with -100 and a
    2-D attention_mask. Packed records (those with position_ids; each original record starts
    where its position id is 0, and its first token is never a target: nothing before it in
    the row belongs to it) come in one of two forms:

    - padding-free (`padding_free=True`): the batch's rows joined into one row with their
      position ids and no attention mask, as transformers' DataCollatorWithFlattening does.
      transformers finds the records from the position ids: flash-attention kernels run
      varlen over them (cu_seq_lens_q/max_length_q, transformers' names, say where the
      records start), SDPA and eager get a block mask transformers builds. No padding, no
      dense float mask. `use_cache=False` goes with the batch: with a cache transformers
      does not look for packed records.
    - a 4-D additive mask [batch, 1, L, L] (without a varlen kernel: SDPA, eager): 0 where a
      token may attend and the dtype's minimum elsewhere, causal within each record.
      transformers passes a 4-D mask to the attention unchanged; the additive float form is
      correct for eager and sdpa alike (eager adds the mask to the scores, so a bool mask
      would be silently wrong there). Pass the model's dtype as `mask_dtype` to halve its
      memory. Flash-attention kernels take no 4-D mask at all.
    """

    def __init__(
        self,
        tokenizer: Any,
        pad_to_multiple_of: int | None = None,
        *,
        mask_dtype: torch.dtype = torch.float32,
        padding_free: bool = False,
    ) -> None:
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_token_id: int = pad if pad is not None else 0
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_dtype = mask_dtype
        self.padding_free = padding_free

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate records (lists or tensors of ints) into a batch of tensors."""
        if self.padding_free and "position_ids" in features[0]:
            return self._flattened(features)
        # Rows are filled in numpy (a slice assignment per row costs a microsecond; torch's
        # indexing costs several), then handed to torch without a copy.
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(features), width)
        input_ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        labels = np.full(shape, IGNORE, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64) if "position_ids" in features[0] else None
        for i, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            input_ids[i, :length] = feature["input_ids"]
            labels[i, :length] = feature["labels"] if "labels" in feature else feature["input_ids"]
            if positions is not None:
                positions[i, :length] = feature["position_ids"]
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if positions is None:
            filled = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
            batch["attention_mask"] = torch.from_numpy(filled.astype(np.int64))
            return batch

        position_ids = torch.from_numpy(positions)
        batch["position_ids"] = position_ids
        batch["labels"] = batch["labels"].masked_fill(record_starts(position_ids, lengths), IGNORE)
        batch["attention_mask"] = block_causal_mask(position_ids, lengths, self.mask_dtype)
        return batch

    def _flattened(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Every row of the batch in one row, with its position ids; padded (to
        pad_to_multiple_of) by a record of its own that is never a target."""
        input_ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        labels = torch.cat(
            [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long) for f in features]
        )
        position_ids = torch.cat(
            [torch.as_tensor(f["position_ids"], dtype=torch.long) for f in features]
        )
        labels = labels.masked_fill(position_ids == 0, IGNORE)
        length = len(input_ids)
        if self.pad_to_multiple_of and length % self.pad_to_multiple_of:
            extra = self.pad_to_multiple_of - length % self.pad_to_multiple_of
            input_ids = torch.cat([input_ids, torch.full((extra,), self.pad_token_id)])
            labels = torch.cat([labels, torch.full((extra,), IGNORE)])
            position_ids = torch.cat([position_ids, torch.arange(extra)])
        # where each record starts, for varlen kernels (flash attention, attention.py's):
        # given here once, not found from the position ids again in every layer
        bounds, longest = record_bounds(position_ids[None])
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "use_cache": False,
            "cu_seq_lens_q": bounds,
            "cu_seq_lens_k": bounds,
            "max_length_q": longest,
            "max_length_k": longest,
        }


def record_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The records of rows [batch, width] joined end to end: their cumulative bounds (int32,
    [n + 1], as varlen kernels take them) and the longest. A record starts where its
    position id is 0 and at every row's start."""
    batch, width = position_ids.shape
    starts = position_ids.reshape(-1) == 0
    starts[::width] = True
    total = torch.tensor([batch * width], device=position_ids.device)
    bounds = torch.cat([starts.nonzero().flatten(), total]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def record_starts(position_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """True at the first token of every record of packed rows (padding excluded)."""
    starts = position_ids == 0
    for i, length in enumerate(lengths):
        starts[i, length:] = False
    return starts


def block_causal_mask(
    position_ids: torch.Tensor, lengths: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive [batch, 1, L, L] mask: causal inside each record of a packed row, else blocked.

    A record starts wherever its position id is 0. Padding attends only to itself, so that no
    row of the mask is fully blocked (which gives NaNs in some attention kernels).
    """
    batch, width = position_ids.shape
    segments = record_starts(position_ids, lengths).long().cumsum(dim=1)
    for i, length in enumerate(lengths):
        # Distinct negative ids make every padding position its own segment.
        segments[i, length:] = -torch.arange(1, width - length + 1)
    same_record = segments[:, :, None] == segments[:, None, :]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    allowed = same_record & causal
    mask = torch.zeros((batch, 1, width, width), dtype=dtype)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
