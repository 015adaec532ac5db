"""Starting the training processes: one process, or torchrun workers.

A training pod runs `python -m lmforge.trainer run --config /etc/lmforge/run.json`
with the standard torchrun environment that the operator injects (MASTER_ADDR,
MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE). When that asks for more than
one process, the entry point re-launches itself under torchrun; `lmforge run`
does the same on one machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def under_torchrun(env: Mapping[str, str]) -> bool:
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def torchrun_command(
    config_path: Path, processes_per_node: int, env: Mapping[str, str]
) -> list[str]:
    """The torchrun command for this node, or [] when one plain process will do."""
    nnodes = int(env.get("NNODES", "1"))
    nproc = int(env.get("NPROC_PER_NODE", processes_per_node))
    if under_torchrun(env) or nnodes * nproc <= 1:
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
