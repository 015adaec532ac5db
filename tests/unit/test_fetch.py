"""The fetch init container: clear errors, and an existing complete copy is reused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from lmforge.trainer.fetch import MARKER, FetchError, fetch, parse_hf


def test_parse_hf_reference() -> None:
    assert parse_hf("hf://meta-llama/Llama-3.1-8B@main") == ("meta-llama/Llama-3.1-8B", "main")
    assert parse_hf("hf://org/name") == ("org/name", None)


def test_complete_copy_is_reused(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / MARKER).write_text("hf://org/name\n")
    assert fetch("hf://org/name", dest) == dest  # no download attempted


def test_unreachable_hub_names_the_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError, match=r"hf://org/missing-model: download .* failed"):
        fetch("hf://org/missing-model", tmp_path / "model")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_cli_exit_code_and_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge.trainer",
            "fetch",
            "--uri",
            "gs://bucket/x",
            "--dest",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "gs://bucket/x: only hf:// and s3:// locations are fetched" in proc.stderr
