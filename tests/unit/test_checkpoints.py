"""Atomic checkpoints: only complete ones are ever resumed from."""

from __future__ import annotations

from pathlib import Path

from lmforge.trainer import checkpoints


def _stage(root: Path, step: int, size: int = 100) -> Path:
    staged = root / checkpoints.STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"x" * size)
    (staged / "optimizer.pt").write_bytes(b"y" * size)
    return staged


def test_publish_makes_a_complete_checkpoint(tmp_path: Path) -> None:
    final = checkpoints.publish(_stage(tmp_path, 10), tmp_path)
    assert final == tmp_path / "checkpoint-10"
    assert checkpoints.is_complete(final)
    assert not (tmp_path / checkpoints.STAGING / "checkpoint-10").exists()
    assert checkpoints.latest_complete_checkpoint(tmp_path) == final


def test_latest_skips_truncated_and_unpublished(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        checkpoints.publish(_stage(tmp_path, step), tmp_path)
    # checkpoint-30 gets truncated after the fact; checkpoint-40 never got its manifest.
    (tmp_path / "checkpoint-30" / "model.safetensors").write_bytes(b"x" * 7)
    half = tmp_path / "checkpoint-40"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    # A crash left a staged, unpublished checkpoint-50.
    _stage(tmp_path, 50)
    assert checkpoints.latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    checkpoints.clear_staging(tmp_path)
    assert not (tmp_path / checkpoints.STAGING).exists()


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        checkpoints.publish(_stage(tmp_path, step), tmp_path)
    removed = checkpoints.prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["checkpoint-5", "checkpoint-10"]
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == [
        "checkpoint-15",
        "checkpoint-20",
    ]


def test_missing_folder_has_no_checkpoint(tmp_path: Path) -> None:
    assert checkpoints.latest_complete_checkpoint(tmp_path / "nope") is None
