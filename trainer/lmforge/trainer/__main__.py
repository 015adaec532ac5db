"""`python -m lmforge.trainer run --config run.json`: the workload of a training pod."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from lmforge.trainer.progress import TERMINATION_LOG

from lmforge.api.runconfig import (
    EXIT_BAD_CONFIG,
    EXIT_BAD_DATA,
    EXIT_OUT_OF_MEMORY,
    RunConfig,
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors in a cluster expect."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "rank": int(os.environ.get("RANK", "0")),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    if "KUBERNETES_SERVICE_HOST" in os.environ or not sys.stderr.isatty():
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def fail(code: int, reason: str, message: str) -> int:
    """Report a user-facing failure: stderr, and the pod's termination message."""
    print(f"error: {message}", file=sys.stderr)
    if TERMINATION_LOG.exists():
        with contextlib.suppress(OSError):
            TERMINATION_LOG.write_text(json.dumps({"reason": reason, "message": message[:3500]}))
    return code


def run(config_path: Path) -> int:
    from lmforge.trainer.launch import torchrun_command

    try:
        config = RunConfig.load(config_path)
    except ValueError as err:
        return fail(EXIT_BAD_CONFIG, "InvalidRunConfig", str(err))
    command = torchrun_command(
        config_path, config.spec.distributed.processes_per_node or 1, os.environ
    )
    if command:
        return subprocess.call(command)

    import torch
    from lmforge.trainer.data import DataError
    from lmforge.trainer.finetune import run as finetune
    from lmforge.trainer.model import MethodError

    try:
        finetune(config)
    except DataError as err:
        return fail(EXIT_BAD_DATA, "BadData", str(err))
    except MethodError as err:
        return fail(EXIT_BAD_CONFIG, "InvalidMethod", str(err))
    except torch.OutOfMemoryError as err:
        return fail(EXIT_OUT_OF_MEMORY, "OutOfMemory", f"CUDA out of memory: {err}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a training job from its resolved run config")
    run_parser.add_argument("--config", required=True, type=Path, help="run config JSON")
    args = parser.parse_args(argv)
    setup_logging()
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
