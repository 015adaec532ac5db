"""Sharded models (FSDP, DeepSpeed ZeRO-3): engaging FSDP on CPU, and the full weights back.

accelerate turns its FSDP plugin on only for accelerator backends (MULTI_GPU and
friends): under torchrun on CPU (gloo) it drops the plugin and trains plain DDP
without a word. FSDP2 (`fully_shard`) itself runs on CPU with gloo, so
`engage_fsdp_on_cpu` switches the state to FSDP exactly as accelerate does on a
GPU. A sharded model has no full weights on any rank; `full_state_dict` gathers
them (a collective: every rank calls it) for the final export, and `on_every_rank`
shares a scoring pass out (a sharded model's forward is a collective too).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def engage_fsdp_on_cpu(trainer: Any) -> None:
    """Make an FSDP run on CPU really shard (called right after the Accelerator exists)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState re-reads PartialState on every construction; accelerate records
    # the final type there too.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    log.info("FSDP on CPU: %d processes over gloo", state.num_processes)


def _zero_stage(trainer: Any) -> int:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return 0
    plugin = trainer.accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage or 0)


def is_sharded(trainer: Any) -> bool:
    """True when no rank holds the full weights (FSDP, ZeRO-3)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False)) or _zero_stage(trainer) == 3


def strategy_in_use(trainer: Any) -> str:
    """What the run really trains with (reported in metrics.json)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp"
    stage = _zero_stage(trainer)
    if stage:
        zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        offload = str(zero.get("offload_param", {}).get("device", "none")) != "none"
        return f"zero{stage}" + ("-offload" if offload else "")
    return "ddp" if trainer.args.world_size > 1 else "single"


def full_state_dict(trainer: Any, model: Any = None) -> dict[str, Any] | None:
    """The full weights on rank 0 of a sharded model (None elsewhere, and when unsharded):
    the trainer's, or `model` made from it (FSDP: a PEFT model merged in place).

    Every rank must call it: gathering the shards is a collective.
    """
    if not is_sharded(trainer):
        return None
    if _zero_stage(trainer) == 3:
        model = trainer.model_wrapped
    state = trainer.accelerator.get_state_dict(model if model is not None else trainer.model)
    return state if trainer.args.process_index == 0 else None


def on_every_rank(
    score: Callable[[list[Item]], list[Result]], items: Sequence[Item]
) -> list[Result]:
    """`score(items)`, the work shared out over the ranks: each scores every world-size-th
    item, and every rank gets all the results back, in the order of `items`.

    Every rank must call it with the same items: a sharded model's forward pass is a
    collective, so each rank runs as many forwards as the others (a shorter share is
    padded with the first item, its result dropped). Unsharded models gain the speed-up.
    """
    if not items:
        return []
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return score(list(items))
    here = dist.get_rank()
    share = list(items[here::world])
    length = math.ceil(len(items) / world)
    results = score(share + [items[0]] * (length - len(share)))[: len(share)]
    shares: list[list[Result]] = [[] for _ in range(world)]
    dist.all_gather_object(shares, results)
    return [shares[i % world][i // world] for i in range(len(items))]
