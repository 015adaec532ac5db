"""`python -m lmforge.trainer run --config run.json`: the workload of a training pod."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.trainer.console import setup_logging
from lmforge.trainer.progress import TERMINATION_LOG

from lmforge.api.runconfig import (
    EXIT_BAD_CONFIG,
    EXIT_BAD_DATA,
    EXIT_OUT_OF_MEMORY,
    RunConfig,
)

FAILURE_FILE_ENV = "LMFORGE_FAILURE_FILE"


def fail(code: int, reason: str, message: str) -> int:
    """Report a user-facing failure: stderr, the pod's termination message, and (under
    torchrun) a file the launcher reads to exit with the worker's code."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    report = {"reason": reason, "message": message[:3500], "code": code}
    for path in (TERMINATION_LOG, Path(os.environ.get(FAILURE_FILE_ENV, "/nonexistent/x"))):
        if path.exists() or (path.parent.is_dir() and path != TERMINATION_LOG):
            with contextlib.suppress(OSError):
                path.write_text(json.dumps(report))
    return code


def launch(command: list[str]) -> int:
    """Run torchrun; exit with the code a worker reported (torchrun's own is always 1)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:
        failure = Path(tmp) / "failure.json"
        proc = subprocess.Popen(
            command,
            env=os.environ | {FAILURE_FILE_ENV: str(failure)},
            stderr=subprocess.PIPE,
            text=True,
        )
        held = _pass_through_stderr(proc)
        code = proc.wait()
        if code != 0 and failure.exists():
            with contextlib.suppress(ValueError, KeyError):
                # A worker already explained itself; torchrun's traceback adds nothing.
                return int(json.loads(failure.read_text())["code"])
        sys.stderr.writelines(held)
        return code


def _pass_through_stderr(proc: subprocess.Popen[str]) -> list[str]:
    """Copy the workers' stderr through; from the first traceback on, hold the rest back
    until the outcome is known (a worker's clean error makes torchrun's traceback noise)."""
    held: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        if held or line.startswith("Traceback (most recent call last)"):
            held.append(line)
        else:
            sys.stderr.write(line)
    return held


def run(config_path: Path) -> int:
    from lmforge.trainer.launch import (
        resolve_auto_strategy,
        strategy_problem,
        torchrun_command,
        under_torchrun,
    )

    try:
        config = RunConfig.load(config_path)
        config, choice = resolve_auto_strategy(config)
    except ValueError as err:
        return fail(EXIT_BAD_CONFIG, "InvalidRunConfig", str(err))
    if choice is not None and not under_torchrun(os.environ):
        # The run's first line: the memory estimate and what `auto` chose from it.
        level = logging.INFO if choice.fits else logging.WARNING
        logging.getLogger("lmforge.trainer").log(level, "%s", choice.describe())
    strategy = config.spec.distributed.strategy
    if strategy.startswith("zero") and config.spec.distributed.processes > 1:
        import torch

        problem = strategy_problem(config, torch.cuda.is_available())
        if problem:
            return fail(EXIT_BAD_CONFIG, "InvalidStrategy", problem)
    command = torchrun_command(
        config_path,
        config.spec.distributed.processes_per_node or 1,
        os.environ,
        always=strategy.startswith("zero"),
    )
    if command:
        return launch(command)

    import torch
    from lmforge.trainer.data import DataError
    from lmforge.trainer.model import MethodError
    from lmforge.trainer.recipes import RecipeUnavailable, run_recipe

    try:
        run_recipe(config)
    except DataError as err:
        return fail(EXIT_BAD_DATA, "BadData", str(err))
    except (MethodError, RecipeUnavailable) as err:
        return fail(EXIT_BAD_CONFIG, "InvalidMethod", str(err))
    except torch.OutOfMemoryError as err:
        return fail(EXIT_OUT_OF_MEMORY, "OutOfMemory", f"CUDA out of memory: {err}")
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """End this rank's part in the process group before the interpreter exits.

    Left to the interpreter's teardown, gloo's worker threads can outlive it and abort the
    process (SIGABRT, "terminate called without an active exception") after a run that
    succeeded; NCCL warns the same way."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a training job from its resolved run config")
    run_parser.add_argument("--config", required=True, type=Path, help="run config JSON")
    fetch_parser = sub.add_parser("fetch", help="download hf:// or s3:// inputs (init container)")
    fetch_parser.add_argument("--uri", required=True)
    fetch_parser.add_argument("--dest", required=True, type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "fetch":
        from lmforge.trainer.fetch import FetchError, fetch

        try:
            fetch(args.uri, args.dest)
        except FetchError as err:
            return fail(1, "FetchFailed", str(err))
        return 0
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
