"""Atomic checkpoints: written under a staging name, renamed only when complete.

A checkpoint directory `checkpoints/checkpoint-<step>` exists only once every
file in it has been written: the trainer writes into
`checkpoints/.staging/checkpoint-<step>`, records a manifest of file sizes,
fsyncs, and renames. `latest_complete_checkpoint` additionally checks the
manifest, so a directory damaged later (a truncated file) is skipped too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STAGING = ".staging"
MANIFEST = "lmforge-checkpoint.json"


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` directory, None for other names."""
    if not path.name.startswith(PREFIX):
        return None
    tail = path.name[len(PREFIX) :]
    return int(tail) if tail.isdigit() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int) -> None:
    """Record every file's size; written last, fsynced, so it vouches for the rest."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(path.relative_to(directory))] = path.stat().st_size
    manifest = directory / MANIFEST
    with open(manifest, "w") as fh:
        json.dump({"step": step, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(directory: Path) -> bool:
    """True when the manifest exists and every file it lists has its recorded size."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, size in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(files)


def publish(staged: Path, checkpoints_dir: Path) -> Path:
    """Turn a fully written staging directory into a complete checkpoint (atomic rename)."""
    step = checkpoint_step(staged)
    if step is None:
        raise ValueError(f"{staged} is not a checkpoint directory")
    write_manifest(staged, step)
    final = checkpoints_dir / staged.name
    if final.exists():  # a stale copy from before a crash; the new one wins
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_dir(checkpoints_dir)
    return final


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; damaged ones are reported and left out."""
    found = []
    if not checkpoints_dir.is_dir():
        return found
    for path in checkpoints_dir.iterdir():
        step = checkpoint_step(path)
        if step is None or not path.is_dir():
            continue
        if is_complete(path):
            found.append((step, path))
        else:
            log.warning("skipping incomplete checkpoint %s", path)
    return [p for _, p in sorted(found)]


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that is safe to resume from, or None."""
    complete = complete_checkpoints(checkpoints_dir)
    return complete[-1] if complete else None


def prune(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, plus stale staging dirs."""
    removed = complete_checkpoints(checkpoints_dir)[:-keep] if keep > 0 else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def clear_staging(checkpoints_dir: Path) -> None:
    """Remove half-written checkpoints left by a crash (called before training starts)."""
    shutil.rmtree(checkpoints_dir / STAGING, ignore_errors=True)
