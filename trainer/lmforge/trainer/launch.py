"""Starting the training processes: one process, or torchrun workers.

A training pod runs `python -m lmforge.trainer run --config /etc/lmforge/run.json`
with the standard torchrun environment that the operator injects (MASTER_ADDR,
MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE). When that asks for more than
one process, the entry point re-launches itself under torchrun; `lmforge run`
does the same on one machine.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.api.memory import StrategyChoice, plan_strategy
from lmforge.api.runconfig import RunConfig


def under_torchrun(env: Mapping[str, str]) -> bool:
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def torchrun_command(
    config_path: Path,
    processes_per_node: int,
    env: Mapping[str, str],
    *,
    always: bool = False,
) -> list[str]:
    """The torchrun command for this node, or [] when one plain process will do.

    `always`: launch through torchrun even for one process (DeepSpeed needs its
    process-group environment).
    """
    nnodes = int(env.get("NNODES", "1"))
    nproc = int(env.get("NPROC_PER_NODE", processes_per_node))
    if under_torchrun(env) or (nnodes * nproc <= 1 and not always):
        return []
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1 or "MASTER_ADDR" in env:
        command += [
            f"--nnodes={nnodes}",
            f"--node-rank={env.get('NODE_RANK', '0')}",
            f"--master-addr={env.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master-port={env.get('MASTER_PORT', '29500')}",
        ]
    else:
        command += ["--standalone"]
    return [*command, "-m", "lmforge.trainer", "run", "--config", str(config_path)]


def rank(env: Mapping[str, str] = os.environ) -> int:
    return int(env.get("RANK", "0"))


def node_rank(env: Mapping[str, str] = os.environ) -> int:
    """This node's rank: torchrun's GROUP_RANK in a worker, the operator's NODE_RANK before."""
    return int(env.get("GROUP_RANK", env.get("NODE_RANK", "0")))


def model_config(path: str) -> dict[str, Any] | None:
    """The base model's config.json, or None when it is not a readable local file."""
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def gpu_memory() -> int | None:
    """Bytes of memory of this node's first GPU; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def resolve_auto_strategy(config: RunConfig) -> tuple[RunConfig, StrategyChoice | None]:
    """Replace `strategy: auto` by what fits this model on this node's GPUs.

    The launcher and every worker decide alike (same config.json, same GPU model).
    """
    if config.spec.distributed.strategy != "auto":
        return config, None
    source = str(Path(config.paths.model) / "config.json")
    # torch only where GPUs are asked for: a CPU launcher stays light.
    memory = gpu_memory() if config.spec.distributed.gpus_per_node > 0 else None
    choice = plan_strategy(model_config(config.paths.model), config.spec, memory, source)
    resolved = config.model_copy(deep=True)
    resolved.spec.distributed.strategy = choice.strategy
    return resolved, choice


def strategy_problem(config: RunConfig, cuda: bool) -> str | None:
    """Why this machine cannot run the config's strategy, or None."""
    strategy, processes = config.spec.distributed.strategy, config.spec.distributed.processes
    if strategy.startswith("zero") and not cuda and processes > 1:
        # accelerate gives a DeepSpeed run without CUDA no process group: every rank
        # would silently train alone.
        return (
            f"distributed.strategy {strategy} without GPUs runs one process only (this run "
            f"has {processes}); use fsdp or ddp on CPU"
        )
    return None
